"""The one training loop under ``torchrun`` with DistributedDataParallel (2 CPU processes, gloo).

The two ranks each take half of every global batch (slices of the same permutation); DDP
averages their gradients, which the experiment's loss scaling makes the gradient of the global
batch mean. So the logged loss and the final parameters must match a single-process run with
the same global batch, up to float rounding (and the ODE-Net's adaptive steps, which the solver
chooses per shard: tight tolerances keep that difference at rounding level too). The ODE-Net's
gradients come from the adjoint through autograd, so DDP's hooks see them.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from neuralode.experiments import apply_overrides, train
from neuralode.experiments.ecg import ECG, ECGConfig
from neuralode.experiments.distributed import shard
from neuralode.experiments.runner import load_checkpoint

from test_experiment_ecg import write_fake_mitbih

SETTINGS = ["train_size=0", "test_size=0", "epochs=1", "batch_size=48", "channels=4", "log_every=1",
            "model=all", "rtol=1e-6", "atol=1e-6", "eval_every=0"]


def _train_records(run_dir: Path) -> list[dict]:
    return [r for r in map(json.loads, open(run_dir / "metrics.jsonl")) if r["split"] == "train"]


def test_shard_is_the_whole_batch_in_one_process():
    import numpy as np

    idx = np.arange(10)
    assert (shard(idx) == idx).all()


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed gloo")
def test_two_processes_match_one(tmp_path):
    data = write_fake_mitbih(tmp_path / "data")
    settings = [f"data_dir={data}", *SETTINGS]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    # --standalone: torchrun picks and holds its own free port (a port looked up here could be taken before
    # torchrun binds it, by the DDP test running beside this one under pytest -n 2).
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "neuralode", "run", "ecg", "--out", str(tmp_path / "ddp"), "--no-progress", "--set", *settings]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("resnet_accuracy") == 1  # only rank 0 prints

    single = train(ECG, ECG.resolve(apply_overrides(ECGConfig(), settings)), tmp_path / "one", progress=False)

    ddp_summary = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    assert ddp_summary["metrics"]["world_size"] == 2
    assert ddp_summary["metrics"]["rank_parameter_max_diff"] == 0.0  # replicas identical
    ddp, one = _train_records(tmp_path / "ddp"), _train_records(tmp_path / "one")
    assert [r["step"] for r in ddp] == [r["step"] for r in one] == [1, 2]
    for a, b in zip(ddp, one):
        for key in ("loss", "resnet_loss", "rknet_loss", "odenet_loss"):
            assert a[key] == pytest.approx(b[key], rel=1e-4), key

    # The checkpoint holds the unwrapped module (no "module." prefix) at the global position,
    # so it loads into a single process, or any number of them.
    ck_ddp = load_checkpoint(tmp_path / "ddp" / "checkpoints" / "last.pt")
    ck_one = load_checkpoint(tmp_path / "one" / "checkpoints" / "last.pt")
    assert ck_ddp["model"].keys() == ck_one["model"].keys() and ck_ddp["step"] == ck_one["step"] == 2
    for name, p in ck_one["model"].items():
        # Fixed-step models: the same arithmetic up to reduction order. ODE-Net: the forward and
        # adjoint solves choose their steps per shard, a difference of the order of the tolerance.
        atol = 1e-3 if name.startswith("models.odenet") else 1e-5
        torch.testing.assert_close(ck_ddp["model"][name], p, rtol=0, atol=atol, msg=name)
    assert single["metrics"]["odenet_nfe_backward_per_epoch"][0] > 0

    # Resume the 2-process run in ONE process for a second epoch: it continues from the global
    # position (steps 3, 4) as the single-process run resumed the same way does. The runs are
    # extended by rewriting epochs in copies of their config.json and in the config their checkpoints
    # record (resume insists on the config the checkpoint was trained with); the weights, optimiser
    # and RNG states are untouched, as DDP and the single process wrote them.
    two_epochs = ECG.resolve(apply_overrides(ECGConfig(), [*settings, "epochs=2"]))
    for name in ("ddp", "one"):
        shutil.copytree(tmp_path / name, tmp_path / f"{name}2")
        saved = json.loads((tmp_path / f"{name}2" / "config.json").read_text())
        saved["config"]["epochs"] = 2
        (tmp_path / f"{name}2" / "config.json").write_text(json.dumps(saved))
        ckpt_path = tmp_path / f"{name}2" / "checkpoints" / "last.pt"
        ckpt = load_checkpoint(ckpt_path)
        ckpt["config"]["epochs"] = 2
        torch.save(ckpt, ckpt_path)
    resumed = train(ECG, two_epochs, tmp_path / "ddp2", resume=True, progress=False)
    reference = train(ECG, two_epochs, tmp_path / "one2", resume=True, progress=False)
    assert "world_size" not in resumed["metrics"]
    ddp, one = _train_records(tmp_path / "ddp2"), _train_records(tmp_path / "one2")
    assert [r["step"] for r in ddp] == [r["step"] for r in one] == [1, 2, 3, 4]
    for a, b in zip(ddp[2:], one[2:]):
        for key in ("resnet_loss", "rknet_loss"):
            assert a[key] == pytest.approx(b[key], rel=1e-4), key
        assert a["odenet_loss"] == pytest.approx(b["odenet_loss"], rel=1e-2)
    assert load_checkpoint(tmp_path / "ddp2" / "checkpoints" / "last.pt")["step"] == 4
    assert resumed["metrics"]["resnet_parameters"] == reference["metrics"]["resnet_parameters"]
