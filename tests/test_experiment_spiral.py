"""`spiral` at smoke size: every variant runs end to end and writes its metrics and plots."""

from __future__ import annotations

import json

import pytest
import torch

from neuralode.experiments import ConfigError, apply_overrides, get_experiment, train
from neuralode.experiments.spiral import Spiral, SpiralConfig

SMOKE = ["data_size=60", "batch_time=5", "batch_size=5", "eval_every=11", "checkpoint_every=11", "snapshots=2"]


def _config(*overrides):
    return Spiral.resolve(apply_overrides(SpiralConfig(), [*SMOKE, *overrides]))


def test_registered():
    assert get_experiment("spiral") is Spiral


def test_variant_defaults_are_resolved():
    cubic, linear, hard = (Spiral.resolve(SpiralConfig(variant=v)) for v in ("cubic", "linear", "linear_hard"))
    assert (cubic.optimizer, cubic.lr, cubic.hidden, cubic.loss, cubic.t_end) == ("rmsprop", 1e-3, 50, "l1", 25.0)
    assert (linear.optimizer, linear.lr, linear.hidden, linear.loss, linear.epochs) == ("adam", 0.1, 0, "mse", 15)
    assert hard.noise_std > 0 and hard.lr == 1e-3 and hard.hidden > 0
    # an explicit value wins over the variant's default
    assert Spiral.resolve(SpiralConfig(variant="linear", lr=0.05)).lr == 0.05


def test_inconsistent_config_is_rejected():
    with pytest.raises(ConfigError, match="single 2x2 linear layer"):
        Spiral.resolve(SpiralConfig(variant="linear", hidden=10))
    with pytest.raises(ConfigError, match="batch_size"):
        Spiral.resolve(SpiralConfig(data_size=20, batch_size=50))


def test_the_demo_model_and_data():
    exp = Spiral(Spiral.resolve(SpiralConfig()))
    exp.setup()
    assert exp.y_true.shape == (1000, 1, 2) and exp.t[-1] == 25.0
    model = exp.build_model()
    layers = [m for m in model.net.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Tanh))]
    assert [type(m).__name__ for m in layers] == ["Linear", "Tanh", "Linear"]
    assert (layers[0].in_features, layers[0].out_features, layers[2].out_features) == (2, 50, 2)
    assert exp.steps_per_epoch == (1000 - 10) // 20
    y0, t, ys = exp.batch(exp_position(3))
    assert y0.shape == (20, 2) and t.shape == (10,) and ys.shape == (10, 20, 2)
    assert torch.equal(ys[0], y0)


def exp_position(index):
    from neuralode.experiments.base import Position

    return Position(step=index, epoch=0, index=index)


@pytest.mark.parametrize("variant", ["cubic", "linear", "linear_hard"])
def test_variant_end_to_end(tmp_path, variant):
    summary = train(Spiral, _config(f"variant={variant}", "epochs=2"), tmp_path, progress=False)
    assert summary["status"] == "completed"
    metrics = summary["metrics"]
    assert metrics["traj_mse"] >= 0
    if variant != "cubic":
        learned = torch.tensor(metrics["learned_matrix"])
        true = torch.tensor(metrics["true_matrix"])
        assert learned.shape == (2, 2)
        assert metrics["matrix_frobenius_error"] == pytest.approx(torch.linalg.norm(learned - true).item(), abs=1e-3)
    plots = {p.name for p in (tmp_path / "plots").glob("*.png")}
    assert plots == {"loss.png", "trajectories.png", "phase_portrait.png", "evaluation.png"}
    evals = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in evals if r["split"] == "eval"] == [0, 11, 22]


def test_linear_variant_recovers_the_matrix(tmp_path):
    """The single linear layer learns A (the seed: converges in about 15 epochs)."""
    cfg = Spiral.resolve(apply_overrides(SpiralConfig(), ["variant=linear", "data_size=200", "batch_size=2", "epochs=1",
                                                          "eval_every=0", "checkpoint_every=1000"]))
    summary = train(Spiral, cfg, tmp_path, progress=False)
    assert summary["metrics"]["matrix_frobenius_error"] < 0.05
