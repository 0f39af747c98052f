"""`physionet` at smoke size on the real PhysioNet 2012 archive (skipped without it)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from neuralode.experiments import ConfigError, apply_overrides, get_experiment, train
from neuralode.experiments.physionet import PhysioNet, PhysioNetConfig, holdout_mask

from shared_data import SHARED_DATA, shared  # noqa: E402  (tests/shared_data.py)

DATA = SHARED_DATA / "physionet2012" / "set-a.tar.gz"
SMOKE = ["max_records=8", "iters=2", "batch_size=4", "step_size=0.25", "latent_dim=2", "encoder_hidden=4",
         "dynamics_hidden=4", "decoder_hidden=4", "rnn_hidden=4", "log_every=1", f"data_path={DATA}"]


def test_holdout_mask_is_a_seeded_subset():
    mask = torch.rand(3, 50, 37) < 0.3
    a = holdout_mask(mask, 0.2, np.random.default_rng(0))
    b = holdout_mask(mask, 0.2, np.random.default_rng(0))
    assert torch.equal(a, b) and not (a & ~mask).any()
    assert 0.1 < a.sum().item() / mask.sum().item() < 0.3


def test_missing_data_names_the_setting(tmp_path):
    config = PhysioNet.resolve(apply_overrides(PhysioNetConfig(), [*SMOKE[:-1], f"data_path={tmp_path}/none.tar.gz"]))
    with pytest.raises(ConfigError, match="data_path"):
        train(PhysioNet, config, tmp_path / "run", progress=False)


def test_end_to_end(tmp_path):
    shared("physionet2012", "set-a.tar.gz")  # skip only without ../shared/data; fail if the file is missing
    assert get_experiment("physionet") is PhysioNet
    config = PhysioNet.resolve(apply_overrides(PhysioNetConfig(), SMOKE))
    summary = train(PhysioNet, config, tmp_path, progress=False)
    m = summary["metrics"]
    for kind in ("latent_ode", "rnn", "mean"):
        assert math.isfinite(m[f"test_mse/{kind}"])
    assert m["data/records"] == 8 and m["data/train_records"] + m["data/test_records"] == 8
    assert m["nfe_per_iter/latent_ode"] > 0
    assert summary["references"]["test_mse/latent_ode"]["value"] == 2e-3
    assert {p.name for p in (tmp_path / "plots").glob("*.png")} == {"loss.png", "interpolation.png", "mse.png"}
