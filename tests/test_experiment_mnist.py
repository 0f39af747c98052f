"""`mnist` at smoke size: the four models of Chen et al. (2018) on a few real images, one step."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from neuralode.experiments import apply_overrides, get_experiment, train
from neuralode.experiments.mnist import MNIST, MNISTConfig
from shared_data import SHARED_DATA

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "mnist"
needs_data = pytest.mark.skipif(not (DATA / "t10k-images-idx3-ubyte.gz").exists(), reason="needs ../shared/data/mnist")


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="resolving the config locates the data: needs ../shared/data")
def test_full_settings_are_the_papers():
    c = MNIST.resolve(apply_overrides(MNISTConfig(), ["train_size=0", "test_size=0", "epochs=160"]))
    assert (c.lr, c.momentum, c.batch_size, c.lr_decay_epochs, c.crop_padding) == (0.1, 0.9, 128, (60, 100, 140), 4)
    assert (c.rtol, c.atol) == (1e-3, 1e-3) and c.eval_every == 60_000 // 128
    assert (c.recipe, c.epochs, c.lr_schedule, c.warmup, c.weight_decay) == ("paper", 160, "step", 0.0, 0.0)
    exp = MNIST(c)
    assert [exp._lr(e) for e in (0, 59, 60, 100, 140)] == pytest.approx([0.1, 0.1, 0.01, 0.001, 0.0001])
    assert get_experiment("mnist") is MNIST
    assert MNIST.references["odenet_parameters"].value == 220_000


@needs_data
def test_one_step_all_models_and_parameter_counts_printed(tmp_path, capsys):
    from neuralode.cli import main

    rc = main(["run", "mnist", "--out", str(tmp_path), "--no-progress", "--set", f"data_dir={DATA}",
               "train_size=16", "test_size=20", "batch_size=16", "channels=8", "eval_batch=20"])
    assert rc == 0
    out = capsys.readouterr().out
    for name, paper in (("mlp", 240000), ("resnet", 600000), ("rknet", 220000), ("odenet", 220000)):
        line = next(l for l in out.splitlines() if l.startswith(f"{name}_parameters "))
        assert f"(seed: {paper})" in line
    import json

    m = json.loads((tmp_path / "summary.json").read_text())["metrics"]
    for name in ("mlp", "resnet", "rknet", "odenet"):
        assert 0 <= m[f"{name}_test_error"] <= 1 and math.isfinite(m[f"{name}_test_ce"])
        assert m[f"{name}_activation_mib"] > 0
    assert m["mlp_parameters"] == 238_510  # the MLP does not depend on channels
    assert m["odenet_nfe_forward_per_epoch"][0] > 0 and m["odenet_nfe_backward_per_epoch"][0] > 0
    assert len(m["mlp_confusion"]) == 10
    # one step: one logged loss, which is no curve, so no loss.png
    assert {p.name for p in (tmp_path / "plots").glob("*.png")} >= {"confusion.png", "learning_curves.png"}


# -- recipes: the paper's schedule and the short one (issue 15, item 4) -------------------------

def _recipe(*overrides):
    from neuralode.experiments.mnist import apply_recipe

    return apply_recipe(apply_overrides(MNISTConfig(), list(overrides)))


def test_paper_recipe_is_the_default_and_keeps_the_step_schedule():
    c = _recipe()
    assert c.recipe == "paper"
    assert (c.epochs, c.lr_schedule, c.warmup, c.weight_decay) == (1, "step", 0.0, 0.0)
    assert _recipe("epochs=160").epochs == 160


def test_fast_recipe_sets_the_schedule_and_keeps_the_papers_model_and_optimiser():
    fast, paper = _recipe("recipe=fast"), _recipe("recipe=paper")
    assert (fast.epochs, fast.lr_schedule, fast.warmup) == (15, "cosine", 0.05)
    same = ("lr", "momentum", "batch_size", "crop_padding", "channels", "rtol", "atol", "weight_decay")
    assert [getattr(fast, k) for k in same] == [getattr(paper, k) for k in same]


@pytest.mark.parametrize("order", ["recipe first", "recipe last"])
def test_explicit_set_keys_override_the_recipe(order):
    keys = ["epochs=3", "weight_decay=1e-4", "lr_schedule=step"]
    c = _recipe(*(["recipe=fast", *keys] if order == "recipe first" else [*keys, "recipe=fast"]))
    assert (c.epochs, c.weight_decay, c.lr_schedule) == (3, 1e-4, "step")
    assert c.warmup == 0.05  # not set: the recipe's


def test_fast_learning_rate_warms_up_linearly_then_falls_as_a_half_cosine_towards_zero():
    from neuralode.experiments.mnist import learning_rate

    c = _recipe("recipe=fast")
    spe = 120
    total, warm = 15 * spe, 90  # 5% of 1,800 steps
    lrs = [learning_rate(c, s, spe) for s in range(total)]
    assert lrs[:warm] == pytest.approx([0.1 * (s + 1) / warm for s in range(warm)])
    assert lrs[warm] == pytest.approx(0.1) and max(lrs) == pytest.approx(0.1)
    after = lrs[warm:]
    assert all(a >= b for a, b in zip(after, after[1:]))
    # the same curve written as lr * cos^2(pi p / 2), p = fraction of the 1,710 post-warm-up steps done
    assert after == pytest.approx([0.1 * math.cos(math.pi * k / 1710 / 2) ** 2 for k in range(1710)])
    assert after[855] == pytest.approx(0.05) and 0 < after[-1] < 1e-6


def test_paper_learning_rate_per_step_is_its_epoch_schedule():
    from neuralode.experiments.mnist import learning_rate

    c = _recipe("epochs=160")
    spe = 469
    for epoch, lr in ((0, 0.1), (59, 0.1), (60, 0.01), (99, 0.01), (100, 0.001), (140, 0.0001), (159, 0.0001)):
        for step in (epoch * spe, epoch * spe + spe - 1):
            assert learning_rate(c, step, spe) == pytest.approx(lr)


def test_unknown_recipe_and_unusable_schedule_values_are_config_errors():
    from neuralode.experiments.config import ConfigError
    from neuralode.experiments.mnist import apply_recipe

    with pytest.raises(ConfigError, match=r"--set recipe=fats: 'fats' is not one of paper, fast; did you mean 'fast'"):
        apply_overrides(MNISTConfig(), ["recipe=fats"])
    # A Literal field refuses other values when the config is made (experiments/config.py), before apply_recipe.
    with pytest.raises(ConfigError, match=r"recipe='slow': must be one of paper, fast"):
        apply_recipe(MNISTConfig(recipe="slow"))
    with pytest.raises(ConfigError, match="warmup=1.0 is invalid"):
        _recipe("recipe=fast", "warmup=1")
    with pytest.raises(ConfigError, match="--set weight_decay=-0.1: must be a finite number >= 0"):
        _recipe("weight_decay=-0.1")
    with pytest.raises(ConfigError, match="lr_schedule='linear': must be one of step, cosine"):
        apply_recipe(MNISTConfig(lr_schedule="linear"))


@needs_data
def test_a_fast_run_trains_with_the_schedule_it_states(tmp_path):
    import json

    import torch

    from neuralode.cli import main
    from neuralode.experiments.mnist import learning_rate

    rc = main(["run", "mnist", "--out", str(tmp_path), "--no-progress", "--set", f"data_dir={DATA}", "model=odenet",
               "recipe=fast", "epochs=3", "weight_decay=1e-3", "train_size=64", "test_size=20", "batch_size=16",
               "channels=4", "eval_batch=20"])
    assert rc == 0
    saved = json.loads((tmp_path / "config.json").read_text())["config"]
    assert (saved["recipe"], saved["epochs"], saved["lr_schedule"], saved["weight_decay"]) == ("fast", 3, "cosine", 1e-3)
    config = MNIST.resolve(apply_overrides(MNISTConfig(), [f"data_dir={DATA}", "recipe=fast", "epochs=3",
                                                           "train_size=64", "batch_size=16"]))
    logged = [(r["step"], r["lr"]) for r in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines())
              if r.get("split") == "train"]
    assert [s for s, _ in logged] == list(range(1, 13))  # 3 epochs of 4 steps; a record counts the steps done
    assert [lr for _, lr in logged] == pytest.approx([learning_rate(config, s - 1, 4) for s, _ in logged])
    checkpoint = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=False)
    assert {g["weight_decay"] for g in checkpoint["optimizer"]["param_groups"]} == {1e-3}


@needs_data
def test_a_fast_run_cut_in_its_warm_up_resumes_exactly(tmp_path):
    """The schedule is a function of the step alone: a run stopped in the warm-up and resumed
    writes the same learning rates and ends with the same weights as one that never stopped."""
    import torch

    from neuralode.experiments.runner import CHECKPOINT, Hook, load_checkpoint

    class Crash(Hook):
        def after_step(self, run, position, record):
            if position.step == 3:
                raise SystemExit("simulated crash")

    # 2 epochs of 4 steps; warmup 0.3 of 8 steps is 2 steps, so the cut falls just after it
    config = MNIST.resolve(apply_overrides(MNISTConfig(), [
        f"data_dir={DATA}", "model=odenet", "recipe=fast", "epochs=2", "warmup=0.3", "train_size=64",
        "test_size=20", "batch_size=16", "channels=4", "eval_batch=20", "checkpoint_every=2"]))
    train(MNIST, config, tmp_path / "ref", progress=False)
    with pytest.raises(SystemExit):
        train(MNIST, config, tmp_path / "cut", progress=False, hooks=[Crash()])
    assert load_checkpoint(tmp_path / "cut" / CHECKPOINT)["step"] == 2
    train(MNIST, config, tmp_path / "cut", progress=False, resume=True)
    a, b = (load_checkpoint(tmp_path / d / CHECKPOINT)["model"] for d in ("ref", "cut"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "ref" / "metrics.jsonl").read_text() == (tmp_path / "cut" / "metrics.jsonl").read_text()
