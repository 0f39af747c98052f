"""`latent_spiral` at smoke size: the spiral generator and a run end to end."""

from __future__ import annotations

import math

import json

import numpy as np
import pytest
import torch

from neuralode.experiments import ConfigError, apply_overrides, get_experiment, train
from neuralode.experiments.runner import CHECKPOINT, Hook, load_checkpoint
from neuralode.experiments.latent_spiral import (
    LatentSpiral,
    LatentSpiralConfig,
    generate_spirals,
    observation_mask,
)
from neuralode.models import count_parameters

SMOKE = ["n_spirals=8", "nsample=10", "ntotal=30", "obs_counts=4,10", "iters=2", "batch_size=3",
         "step_size=0.5", "encoder_hidden=4", "dynamics_hidden=4", "decoder_hidden=4", "rnn_hidden=4",
         "n_plot=2", "log_every=1"]


def test_generator_shapes_seeding_and_half_clockwise():
    s = generate_spirals(20, np.random.default_rng(1))
    assert s.times.shape == (200,) and s.truth.shape == (20, 200, 2) and s.noisy.shape == (20, 200, 2)
    assert s.clockwise.sum() == 10 and s.clockwise.dtype == bool
    assert ((s.start >= 100) & (s.start <= 300)).all()
    assert np.allclose(s.times, np.linspace(0, 6 * np.pi, 500)[:200])
    t = generate_spirals(20, np.random.default_rng(1))
    u = generate_spirals(20, np.random.default_rng(2))
    assert np.array_equal(s.noisy, t.noisy) and not np.array_equal(s.noisy, u.noisy)
    # noise of the stated size around the truth; clockwise spirals are centred at x = -5
    assert abs((s.noisy - s.truth).std() - 0.3) < 0.02
    assert (s.truth[s.clockwise, :, 0].mean() < 0) and (s.truth[~s.clockwise, :, 0].mean() > 0)
    assert generate_spirals(7, np.random.default_rng(0)).clockwise.sum() == 3


def test_observation_mask():
    m = observation_mask(5, 100, 30, np.random.default_rng(0))
    assert m.shape == (5, 100) and (m.sum(1) == 30).all()
    assert not np.array_equal(m[0], m[1])


def test_bad_config():
    with pytest.raises(ConfigError, match="obs_counts"):
        LatentSpiral.resolve(apply_overrides(LatentSpiralConfig(), ["obs_counts=101"]))
    with pytest.raises(ConfigError, match="rnn_hidden"):
        LatentSpiral.resolve(apply_overrides(LatentSpiralConfig(), ["rnn_hidden=-1"]))
    with pytest.raises(ConfigError, match="models"):
        LatentSpiral.resolve(apply_overrides(LatentSpiralConfig(), ["models=ode"]))
    with pytest.raises(ConfigError, match="min_lr"):
        LatentSpiral.resolve(apply_overrides(LatentSpiralConfig(), ["lr=1e-3", "min_lr=1e-2"]))
    with pytest.raises(ConfigError, match="lr_schedule"):
        apply_overrides(LatentSpiralConfig(), ["lr_schedule=step"])
    with pytest.raises(ConfigError, match="rnn_roll"):
        apply_overrides(LatentSpiralConfig(), ["rnn_roll=grid"])


@pytest.mark.parametrize("schedule", ["cosine", "exponential", "constant"])
def test_lr_schedule_runs_from_lr_to_min_lr(schedule):
    c = LatentSpiral.resolve(apply_overrides(LatentSpiralConfig(), [f"lr_schedule={schedule}", "iters=100",
                                                                    "lr=1e-2", "min_lr=1e-4"]))
    lrs = [LatentSpiral(c).lr_at(s) for s in range(101)]
    assert lrs[0] == pytest.approx(1e-2)
    assert lrs[100] == pytest.approx(1e-2 if schedule == "constant" else 1e-4)
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))  # never increases
    if schedule == "cosine":
        assert lrs[50] == pytest.approx((1e-2 + 1e-4) / 2)
    if schedule == "exponential":
        assert lrs[50] == pytest.approx(1e-3)


def test_default_rnn_is_size_matched_to_the_latent_ode():
    config = LatentSpiral.resolve(apply_overrides(LatentSpiralConfig(), ["obs_counts=30"]))
    assert config.rnn_hidden == 0
    exp = LatentSpiral(config)
    exp.members = [("latent_ode", 30), ("rnn", 30)]  # build_model needs no data
    models = exp.build_model()
    assert count_parameters(models["latent_ode_n30"]) == 3354
    assert models["rnn_n30"].hidden_dim == 19 and count_parameters(models["rnn_n30"]) == 3270
    fixed = LatentSpiral(LatentSpiral.resolve(apply_overrides(LatentSpiralConfig(), ["rnn_hidden=7"])))
    fixed.members = [("rnn", 30)]
    assert fixed.build_model()["rnn_n30"].hidden_dim == 7


@pytest.mark.parametrize("rnn_roll", ["all", "own"])
def test_rnn_is_trained_and_evaluated_over_the_times_rnn_roll_names(rnn_roll):
    config = LatentSpiral.resolve(apply_overrides(LatentSpiralConfig(), [*SMOKE, "models=rnn", f"rnn_roll={rnn_roll}"]))
    assert LatentSpiralConfig().rnn_roll == "all"
    exp = LatentSpiral(config)
    exp.setup()
    models = exp.build_model()
    batch = torch.arange(3)
    _, logs = exp.loss(models, batch, None)
    net, n = models["rnn_n4"], 4
    out = net(exp.obs_times, exp.noisy[batch], exp.masks_t[n][batch], roll=rnn_roll)
    assert logs["loss/rnn_n4"] == pytest.approx(out.loss().item() / (2 * n))
    # obs_rmse's predictions at the observed times are the ones the training loss scores.
    mask = exp.masks_t[n][batch]
    at_obs = exp.predict(models, "rnn", n, batch, own_times=True)
    assert torch.equal(at_obs[mask], out.pred[mask])
    if rnn_roll == "all":  # interp_rmse's window predictions are the same roll
        assert torch.allclose(exp.predict(models, "rnn", n, batch)[:, :config.nsample], out.pred)


def test_end_to_end(tmp_path):
    assert get_experiment("latent_spiral") is LatentSpiral
    config = LatentSpiral.resolve(apply_overrides(LatentSpiralConfig(), SMOKE))
    summary = train(LatentSpiral, config, tmp_path, progress=False)
    m = summary["metrics"]
    for kind in ("latent_ode", "rnn"):
        for n in (4, 10):
            assert all(math.isfinite(m[f"{what}_rmse/{kind}_n{n}"]) for what in ("interp", "extrap", "obs"))
    assert summary["references"]["interp_rmse/latent_ode_n30"]["value"] == 0.164
    assert summary["references"]["interp_rmse/rnn_n100"]["value"] == 0.181
    assert {p.name for p in (tmp_path / "plots").glob("*.png")} == {"loss.png", "reconstructions.png", "rmse.png"}


class _Crash(Hook):
    def after_step(self, run, position, record):
        if position.step == 3:
            raise SystemExit("simulated crash")


def test_schedule_is_applied_and_resume_is_exact(tmp_path):
    # One model kind and one n_obs at a time; the logged lr follows the schedule; a run cut at
    # step 3 (checkpoint at 2) and resumed ends bit-identical to one never stopped.
    args = [*SMOKE, "iters=6", "checkpoint_every=2", "obs_counts=10", "models=latent_ode",
            "lr_schedule=cosine", "lr=1e-2", "min_lr=1e-3"]
    config = LatentSpiral.resolve(apply_overrides(LatentSpiralConfig(), args))
    ref = train(LatentSpiral, config, tmp_path / "ref", progress=False)
    assert set(ref["metrics"]) >= {"interp_rmse/latent_ode_n10", "extrap_rmse/latent_ode_n10"}
    assert not any("rnn" in k for k in ref["metrics"])
    records = [json.loads(line) for line in (tmp_path / "ref" / "metrics.jsonl").read_text().splitlines()]
    lrs = [r["lr"] for r in records if r["split"] == "train"]
    exp = LatentSpiral(config)
    assert lrs == pytest.approx([exp.lr_at(s) for s in range(6)])
    assert lrs[0] == pytest.approx(1e-2) and lrs[-1] < 2e-3

    with pytest.raises(SystemExit):
        train(LatentSpiral, config, tmp_path / "cut", progress=False, hooks=[_Crash()])
    assert load_checkpoint(tmp_path / "cut" / CHECKPOINT)["step"] == 2
    cut = train(LatentSpiral, config, tmp_path / "cut", progress=False, resume=True)
    a, b = (load_checkpoint(tmp_path / d / CHECKPOINT) for d in ("ref", "cut"))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert a["optimizer"]["param_groups"][0]["lr"] == b["optimizer"]["param_groups"][0]["lr"]
    assert (tmp_path / "ref" / "metrics.jsonl").read_text() == (tmp_path / "cut" / "metrics.jsonl").read_text()
    assert cut["metrics"]["interp_rmse/latent_ode_n10"] == ref["metrics"]["interp_rmse/latent_ode_n10"]
