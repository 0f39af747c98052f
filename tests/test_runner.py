"""The training loop: run directory, metrics, checkpoints, exact resume."""

from __future__ import annotations

import json
import os
import signal
import threading
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from test_runner_toy import Toy, ToyConfig  # noqa: E402

from neuralode.experiments import ConfigError, train  # noqa: E402
from neuralode.experiments import runner  # noqa: E402
from neuralode.experiments.runner import CHECKPOINT, Hook, load_checkpoint, read_metrics  # noqa: E402


class Crash(Hook):
    """Simulates a process dying after ``at`` steps."""

    def __init__(self, at):
        self.at = at

    def after_step(self, run, position, record):
        if position.step == self.at:
            raise SystemExit("simulated crash")


def _params(run_dir):
    return load_checkpoint(Path(run_dir) / CHECKPOINT)["model"]


def test_run_directory_layout(tmp_path):
    summary = train(Toy, ToyConfig(), tmp_path / "run", progress=False)
    run = tmp_path / "run"
    assert summary["status"] == "completed"
    assert json.loads((run / "config.json").read_text())["config"]["steps"] == 60
    assert json.loads((run / "summary.json").read_text())["metrics"]["evals"] == 4  # 0, 20, 40, 60
    records = read_metrics(run)
    train_steps = [r["step"] for r in records if r["split"] == "train"]
    assert train_steps == list(range(1, 61))
    assert [r["step"] for r in records if r["split"] == "eval"] == [0, 20, 40, 60]
    assert {p.name for p in (run / "plots").iterdir()} == {"loss.png", "fit.png"}
    ckpt = load_checkpoint(run / CHECKPOINT)
    assert (ckpt["step"], ckpt["epoch"], ckpt["index"]) == (60, 10, 0)
    assert not list((run / "checkpoints").glob(".*tmp"))


def test_same_seed_same_result_other_seed_differs(tmp_path):
    train(Toy, ToyConfig(), tmp_path / "a", progress=False)
    train(Toy, ToyConfig(), tmp_path / "b", progress=False)
    train(Toy, ToyConfig(seed=1), tmp_path / "c", progress=False)
    a, b, c = (_params(tmp_path / n) for n in "abc")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


@pytest.mark.parametrize("crash_at", [13, 31])
def test_resume_after_crash_is_exact(tmp_path, crash_at):
    train(Toy, ToyConfig(), tmp_path / "ref", progress=False)
    with pytest.raises(SystemExit):
        train(Toy, ToyConfig(), tmp_path / "cut", progress=False, hooks=[Crash(crash_at)])
    assert not (tmp_path / "cut" / "summary.json").exists()
    summary = train(Toy, ToyConfig(), tmp_path / "cut", progress=False, resume=True)
    ref, cut = _params(tmp_path / "ref"), _params(tmp_path / "cut")
    assert all(torch.equal(ref[k], cut[k]) for k in ref)
    # metrics.jsonl is cut back to the checkpoint, so the files end up identical too
    assert (tmp_path / "ref" / "metrics.jsonl").read_text() == (tmp_path / "cut" / "metrics.jsonl").read_text()
    assert summary["metrics"] == json.loads((tmp_path / "ref" / "summary.json").read_text())["metrics"]


def test_resume_without_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="no checkpoint"):
        train(Toy, ToyConfig(), tmp_path / "none", progress=False, resume=True)


def test_refuses_to_overwrite_a_run(tmp_path):
    train(Toy, ToyConfig(steps=2), tmp_path / "r", progress=False)
    with pytest.raises(ConfigError, match="--resume"):
        train(Toy, ToyConfig(steps=2), tmp_path / "r", progress=False)


def test_crash_while_writing_checkpoint_keeps_previous(tmp_path, monkeypatch):
    """A failure half-way through writing leaves the previous checkpoint loadable."""
    run = tmp_path / "run"
    train(Toy, ToyConfig(steps=10), run, progress=False)
    before = (run / CHECKPOINT).read_bytes()

    real_save = torch.save

    def torn_save(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        f.seek(0)
        f.truncate(100)  # a torn, partial file ...
        raise OSError("disk full")  # ... and the process dies mid-write

    monkeypatch.setattr(runner.torch, "save", torn_save)
    with pytest.raises(OSError, match="disk full"):
        runner.save_checkpoint(run / CHECKPOINT, {"step": 999})
    monkeypatch.undo()
    assert (run / CHECKPOINT).read_bytes() == before
    assert load_checkpoint(run / CHECKPOINT)["step"] == 10
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["last.pt"]


def test_replace_is_the_last_step(tmp_path, monkeypatch):
    """Killed between writing the temp file and os.replace: the old file is still there."""
    path = tmp_path / "ck.pt"
    runner.save_checkpoint(path, {"step": 1})
    monkeypatch.setattr(runner.os, "replace", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        runner.save_checkpoint(path, {"step": 2})
    monkeypatch.undo()
    assert load_checkpoint(path)["step"] == 1


def test_checkpoint_has_everything_resume_needs(tmp_path):
    train(Toy, ToyConfig(steps=10), tmp_path / "r", progress=False)
    ckpt = load_checkpoint(tmp_path / "r" / CHECKPOINT)
    assert {"model", "optimizer", "rng", "step", "epoch", "index", "experiment", "metrics_offset"} <= set(ckpt)
    assert set(ckpt["rng"]) >= {"torch", "numpy", "python"}
    assert ckpt["experiment"] == {"evals": 2}
    assert ckpt["metrics_offset"] == os.path.getsize(tmp_path / "r" / "metrics.jsonl")


class CtrlC(Hook):
    def __init__(self, at):
        self.at = at

    def after_step(self, run, position, record):
        if position.step == self.at:
            os.kill(os.getpid(), signal.SIGINT)


@pytest.mark.skipif(threading.current_thread() is not threading.main_thread(),
                    reason="signal handlers can only be installed in the main thread")
def test_ctrl_c_stops_at_a_step_boundary_and_resumes_exactly(tmp_path):
    train(Toy, ToyConfig(), tmp_path / "ref", progress=False)
    summary = train(Toy, ToyConfig(), tmp_path / "cut", progress=False, hooks=[CtrlC(17)])
    assert summary["status"] == "interrupted" and summary["steps_done"] == 17
    assert load_checkpoint(tmp_path / "cut" / CHECKPOINT)["step"] == 17
    train(Toy, ToyConfig(), tmp_path / "cut", progress=False, resume=True)
    ref, cut = _params(tmp_path / "ref"), _params(tmp_path / "cut")
    assert all(torch.equal(ref[k], cut[k]) for k in ref)


def test_resume_refuses_a_changed_config(tmp_path):
    train(Toy, ToyConfig(steps=4), tmp_path / "r", progress=False)
    with pytest.raises(ConfigError, match="different config"):
        train(Toy, ToyConfig(steps=8), tmp_path / "r", progress=False, resume=True)


def test_progress_bar(tmp_path, capsys):
    train(Toy, ToyConfig(steps=5), tmp_path / "r", progress=True)
    err = capsys.readouterr().err
    assert "toy" in err and "5/5" in err
