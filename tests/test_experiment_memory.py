"""`memory`: the saved-tensor meter, and the experiment at smoke size."""

from __future__ import annotations

import torch

from neuralode.experiments import apply_overrides, get_experiment, train
from neuralode.experiments.memory import Memory, MemoryConfig, SavedTensorMeter


def test_meter_counts_saved_storages_once_and_frees_them():
    w = torch.randn(16, 16, requires_grad=True)
    x = torch.randn(4, 16)
    with SavedTensorMeter(exclude=[w]) as meter:
        h = torch.tanh(x @ w)  # saves x (w excluded) and tanh's output
        y = (h * h).sum()  # saves h twice: counted once
        held = meter.live
        y.backward()
    assert held == 2 * 4 * 16 * 4
    assert meter.peak == held and meter.live == 0


def test_end_to_end(tmp_path):
    assert get_experiment("memory") is Memory
    config = Memory.resolve(apply_overrides(MemoryConfig(), ["depths=1,4", "ode_steps=1,4", "batch=8", "width=8"]))
    summary = train(Memory, config, tmp_path, progress=False)
    m = summary["metrics"]
    # Linear growth on top of the stem and head's constant share: 3 more blocks / steps add
    # 3 times what the first one costs at least.
    assert m["resnet_4_held_bytes"] > 2 * m["resnet_1_held_bytes"]
    assert m["direct_4_peak_bytes"] > 2 * m["direct_1_peak_bytes"]
    assert m["adjoint_4_peak_bytes"] == m["adjoint_1_peak_bytes"]  # O(1)
    assert m["adjoint_4_held_bytes"] < m["direct_4_held_bytes"] / 4
    # no loss curve: every step measures another case, so a "loss" per step means nothing
    assert {p.name for p in (tmp_path / "plots").glob("*.png")} == {"memory.png"}
