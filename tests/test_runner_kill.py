"""Resume after SIGKILL: a run killed after it wrote a checkpoint and resumed with
--resume ends with exactly the parameters (torch.equal) and metrics of an uninterrupted
run with the same seed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from neuralode.cli import main
from neuralode.experiments import apply_overrides, train
from neuralode.experiments.runner import CHECKPOINT, load_checkpoint
from neuralode.experiments.spiral import Spiral, SpiralConfig

OVERRIDES = ["data_size=60", "batch_time=5", "batch_size=5", "epochs=3", "eval_every=11",
             "checkpoint_every=4", "snapshots=3", "seed=3"]

# The killed run sleeps in every step so that the kill lands mid-run (the experiment code
# itself is unchanged; the resumed run does not sleep).
SLOW_RUN = """
import sys, time
from neuralode.experiments.spiral import Spiral
loss = Spiral.loss
def slow_loss(self, *args):
    time.sleep(0.1)
    return loss(self, *args)
Spiral.loss = slow_loss
from neuralode.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_resume_after_sigkill_is_exact(tmp_path):
    ref_dir, cut_dir = tmp_path / "ref", tmp_path / "cut"
    train(Spiral, Spiral.resolve(apply_overrides(SpiralConfig(), OVERRIDES)), ref_dir, progress=False)

    proc = subprocess.Popen([sys.executable, "-c", SLOW_RUN, "run", "spiral", "--set", *OVERRIDES,
                             "--out", str(cut_dir), "--no-progress", "--device", "cpu"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ckpt = cut_dir / CHECKPOINT
    deadline = time.monotonic() + 240
    while not ckpt.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"no checkpoint before the run ended: {proc.stderr.read().decode()[-2000:]}")
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    killed_at = load_checkpoint(ckpt)["step"]
    assert 0 < killed_at < 33 and not (cut_dir / "summary.json").exists()

    # a fresh process either way: resume in this one (saves a second interpreter start)
    # the reference ran on the CPU; the command's default (auto) would pick a GPU where there is one
    assert main(["run", "spiral", "--resume", "--out", str(cut_dir), "--no-progress", "--device", "cpu"]) == 0

    ref, cut = load_checkpoint(ref_dir / CHECKPOINT), load_checkpoint(cut_dir / CHECKPOINT)
    assert cut["step"] == ref["step"] == 33
    assert ref["model"].keys() == cut["model"].keys()
    for name in ref["model"]:
        assert torch.equal(ref["model"][name], cut["model"][name]), name
    for a, b in zip(ref["optimizer"]["state"].values(), cut["optimizer"]["state"].values()):
        assert all(torch.equal(a[k], b[k]) for k in a if isinstance(a[k], torch.Tensor))
    assert (ref_dir / "metrics.jsonl").read_text() == (cut_dir / "metrics.jsonl").read_text()
    # the snapshots taken before the kill survived it
    assert sorted(cut["experiment"]["snapshots"]) == sorted(ref["experiment"]["snapshots"])
