"""`cubic` at smoke size: both models, the spread and the step-size sweeps, divergence."""

from __future__ import annotations

import math

import torch

from neuralode.experiments import apply_overrides, get_experiment, train
from neuralode.experiments.cubic import Cubic, CubicConfig

SMOKE = ["resnet_iters=6", "odenet_iters=4", "spread_sets=2", "spread_n=6", "grid_points=20", "log_every=1"]


def _config(*overrides):
    return Cubic.resolve(apply_overrides(CubicConfig(), [*SMOKE, *overrides]))


def test_registered_with_the_seed_references():
    assert get_experiment("cubic") is Cubic
    assert Cubic.references["resnet_mse"].value == 4.673
    assert Cubic.references["odenet_mse"].value == 7.72


def test_members_and_data():
    exp = Cubic(Cubic.resolve(CubicConfig()))
    exp.setup()
    names = [m.name for m in exp.members]
    assert names[:3] == ["resnet_lr0.001", "resnet_lr0.01", "resnet_lr0.1"]
    assert "odenet_lr0.005" in names and "odenet_set4" in names and len(names) == 16
    x, y = exp.data["main"]
    assert x.shape == (10, 1) and x.min() == -2.5 and x.max() == 2.5
    assert exp.data["set0"][0].shape == (20, 1) and exp.data["set0"][0].abs().max() <= 3
    model = exp.build_model()
    opt = exp.build_optimizer(model)
    assert [g["lr"] for g in opt.param_groups][:3] == [0.001, 0.01, 0.1]
    assert len(model["resnet_lr0p01"].blocks) == 3


def test_end_to_end(tmp_path):
    summary = train(Cubic, _config(), tmp_path, progress=False)
    m = summary["metrics"]
    for key in ("resnet_mse", "odenet_mse", "resnet_spread_mse_mean", "odenet_spread_mse_std",
                "resnet_lr0.1_mse", "odenet_lr0.0005_mse"):
        assert key in m
    assert math.isfinite(m["resnet_mse"]) and math.isfinite(m["odenet_mse"])
    assert summary["references"]["resnet_mse"]["value"] == 4.673
    assert {p.name for p in (tmp_path / "plots").glob("*.png")} == {"loss.png", "fits.png", "spread.png", "sweep.png"}


def test_models_train_independently(tmp_path):
    """Training all models together gives each one the update it would get alone."""
    together = train(Cubic, _config("spread_sets=0"), tmp_path / "all", progress=False)
    alone = train(Cubic, _config("spread_sets=0", "resnet_sweep=", "odenet_sweep="), tmp_path / "one", progress=False)
    assert together["metrics"]["resnet_mse"] == alone["metrics"]["resnet_mse"]


def test_divergence_is_caught_and_reported(tmp_path):
    summary = train(Cubic, _config("spread_sets=0", "resnet_sweep=50", "odenet_sweep=40"), tmp_path, progress=False)
    m = summary["metrics"]
    assert set(m["diverged"]) == {"resnet_lr50", "odenet_lr40"}
    assert math.isnan(m["resnet_lr50_mse"]) and math.isfinite(m["resnet_mse"])
    assert (tmp_path / "plots" / "sweep.png").exists()


def test_odenet_block_uses_the_public_solver():
    from neuralode.nn import ODEBlock

    exp = Cubic(_config())
    exp.setup()
    net = exp.build_model()["odenet_lr0p005"]
    assert isinstance(net.block, ODEBlock)
    out = net(torch.linspace(-1, 1, 5).unsqueeze(1))
    assert out.shape == (5, 1) and net.block.nfe_forward > 0
