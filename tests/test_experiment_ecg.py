"""`ecg` at smoke size: a tiny synthetic MIT-BIH folder (Kaggle CSV layout with record files),
one or two optimiser steps, every metric and plot; the patient split is record-disjoint."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from neuralode.experiments import apply_overrides, get_experiment, train
from neuralode.experiments.ecg import ECG, ECGConfig, stratified_subset

def write_fake_mitbih(root: Path, n_train: int = 96, n_test: int = 40, seed: int = 0) -> Path:
    """Random beats with all five classes and 8 records per file, in the Kaggle format."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for name, n, first_record in (("train", n_train, 100), ("test", n_test, 200)):
        y = np.arange(n) % 5
        x = rng.random((n, 187)) * 0.2 + 0.1 * y[:, None]
        np.savetxt(root / f"mitbih_{name}.csv", np.column_stack([x, y.astype(float)]), delimiter=",", fmt="%.5f")
        records = first_record + (np.arange(n) * 8) // n
        (root / f"mitbih_{name}_records.txt").write_text("".join(f"{r}\n" for r in records))
    return root


SMOKE = ["train_size=0", "test_size=0", "epochs=1", "batch_size=32", "channels=4", "log_every=1",
         "eval_batch=64"]


def _config(data_dir, *overrides):
    return ECG.resolve(apply_overrides(ECGConfig(), [f"data_dir={data_dir}", *SMOKE, *overrides]))


def test_registered_with_the_seed_references():
    assert get_experiment("ecg") is ECG
    assert ECG.references["resnet_accuracy"].value == 0.975
    assert ECG.references["odenet_test_ce"].value == 0.09


def test_stratified_subset_keeps_proportions_and_size():
    y = torch.tensor([0] * 800 + [1] * 150 + [2] * 45 + [3] * 5)
    idx = stratified_subset(y, 100, seed=0)
    assert len(idx) == 100 and len(set(idx.tolist())) == 100
    assert torch.bincount(y[idx], minlength=4).tolist() == [80, 15, 4, 1]
    assert torch.equal(idx, stratified_subset(y, 100, seed=0))
    assert len(stratified_subset(y, 0, seed=0)) == 1000


def test_end_to_end_all_models(tmp_path):
    data = write_fake_mitbih(tmp_path / "data")
    config = _config(data, "epochs=2", "batch_size=48")  # 2 steps per epoch... of 96 beats: 2 x 2
    summary = train(ECG, config, tmp_path / "run", progress=False)
    m = summary["metrics"]
    for name in ("resnet", "rknet", "odenet"):
        assert math.isfinite(m[f"{name}_test_ce"]) and 0 <= m[f"{name}_accuracy"] <= 1
        assert len(m[f"{name}_f1"]) == 5 and 0 <= m[f"{name}_macro_f1"] <= 1
        conf = torch.tensor(m[f"{name}_confusion"])
        assert conf.shape == (5, 5) and conf.sum() == 40 and conf.sum(1).tolist() == [8] * 5
        assert m[f"{name}_parameters"] > 0 and m[f"{name}_activation_mib"] > 0
    assert m["rknet_nfe_forward_per_epoch"] == [16.0, 16.0]
    assert len(m["odenet_nfe_backward_per_epoch"]) == 2 and min(m["odenet_nfe_backward_per_epoch"]) > 0
    assert "resnet_nfe_forward_per_epoch" not in m
    plots = {p.name for p in (tmp_path / "run" / "plots").glob("*.png")}
    assert plots == {"loss.png", "learning_curves.png", "confusion.png", "nfe.png"}
    evals = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl") if '"eval"' in line]
    assert [r["step"] for r in evals] == [0, 2, 4]  # untrained, then the end of every epoch


def test_patient_split_is_record_disjoint(tmp_path):
    data = write_fake_mitbih(tmp_path / "data")
    config = _config(data, "split=patient", "model=resnet", "batch_size=64", "checkpoint_every=1000")
    summary = train(ECG, config, tmp_path / "run", progress=False)
    m = summary["metrics"]
    assert m["split"] == "patient"
    train_records, test_records = set(m["train_records"]), set(m["test_records"])
    assert train_records and test_records and not train_records & test_records
    assert train_records | test_records == set(range(100, 108)) | set(range(200, 208))
    assert m["train_examples"] + m["test_examples"] == 96 + 40


def test_missing_data_names_the_setting(tmp_path):
    from neuralode.experiments import ConfigError

    with pytest.raises(ConfigError, match="data_dir"):
        ECG.resolve(apply_overrides(ECGConfig(), [f"data_dir={tmp_path}"]))


def test_parameter_counts_are_printed(tmp_path, capsys):
    from neuralode.cli import main

    data = write_fake_mitbih(tmp_path / "data")
    rc = main(["run", "ecg", "--out", str(tmp_path / "run"), "--no-progress", "--set", f"data_dir={data}",
               *SMOKE, "model=rknet", "batch_size=96"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "rknet_parameters" in out and "rknet_macro_f1" in out


def test_clipped_sgd_clips_each_group_separately():
    import torch

    from neuralode.experiments.ecg import ClippedSGD

    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    opt = ClippedSGD([{"params": [a]}, {"params": [b]}], lr=1.0, max_norm=1.0)
    a.grad, b.grad = torch.tensor([3.0, 4.0]), torch.tensor([0.3, 0.4])
    opt.step()
    torch.testing.assert_close(a.detach(), torch.tensor([-0.6, -0.8]))  # norm 5 clipped to 1
    torch.testing.assert_close(b.detach(), torch.tensor([-0.3, -0.4]))  # norm 0.5 untouched
