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
