"""Every file-system, checkpoint, config, data and disk fault a user can meet ends `neuralode run`
with exit status 2 and one line naming the file and what to do, never a traceback, and loses or
corrupts nothing already saved (docs/experiments.md, "Faults and what the command does").

Runs use the spiral smoke config (about 4 s each); one reference run is shared by the module.
"""

from __future__ import annotations

import errno
import gzip
import json
import math
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from neuralode.cli import main
from neuralode.experiments import runner
from neuralode.experiments.runner import CHECKPOINT, load_checkpoint

SMOKE = ["data_size=60", "batch_time=5", "batch_size=5", "epochs=2", "eval_every=11",
         "checkpoint_every=4", "snapshots=2"]


def _run(out, *extra, resume=False):
    argv = ["run", "spiral", "--out", str(out), "--no-progress"]
    return main(argv + (["--resume"] if resume else ["--set", *SMOKE, *extra]))


def _one_line_error(capsys, *needles):
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("neuralode: error: ")]
    assert len(lines) == 1, err
    assert "Traceback" not in err and "weights_only=False" not in err, err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def _tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A finished smoke run: the result every interrupted-and-resumed run must reproduce."""
    out = tmp_path_factory.mktemp("ref") / "run"
    assert _run(out) == 0
    return out


# -- the run directory ----------------------------------------------------------------


def test_out_naming_a_file(tmp_path, capsys):
    target = tmp_path / "file.txt"
    target.write_text("keep me")
    assert _run(target) == 2
    _one_line_error(capsys, str(target), "is a file")
    assert target.read_text() == "keep me"


def test_out_below_a_file(tmp_path, capsys):
    (tmp_path / "file.txt").write_text("keep me")
    assert _run(tmp_path / "file.txt" / "run") == 2
    _one_line_error(capsys, "Not a directory", "choose another path")


def _read_only_dir(tmp_path):
    """A directory no one may write into: a read-only tmpfs as root (chmod does not stop root),
    else chmod 0o555."""
    ro = tmp_path / "ro"
    ro.mkdir()
    if os.geteuid() == 0:
        if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(ro)],
                          capture_output=True).returncode != 0:
            pytest.skip("running as root and cannot mount a read-only tmpfs here")
        return ro, lambda: subprocess.run(["umount", str(ro)], check=False)
    ro.chmod(0o555)
    return ro, lambda: ro.chmod(0o755)


def test_read_only_output_directory(tmp_path, capsys):
    ro, cleanup = _read_only_dir(tmp_path)
    try:
        assert _run(ro / "run") == 2
        _one_line_error(capsys, str(ro / "run"), "writable", "--out")
    finally:
        cleanup()


# -- checkpoints ----------------------------------------------------------------------


class _Evil:
    """Unpickling this would create a file: a checkpoint must never be loaded that way."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def _damage(kind, path: Path, marker: Path):
    good = path.read_bytes()
    if kind == "truncated":
        path.write_bytes(good[: len(good) // 2])
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "garbage":
        path.write_bytes(os.urandom(4096))
    elif kind == "pickle":  # a torch zip whose pickle needs more than tensors and plain values
        torch.save({"step": 4, "payload": _Evil(marker)}, path)
    elif kind == "plain-pickle":
        path.write_bytes(pickle.dumps({"payload": _Evil(marker)}))


@pytest.mark.parametrize("kind, why", [
    ("truncated", "it is empty or truncated"), ("empty", "it is empty or truncated"),
    # QA D13: random bytes were reported as "objects other than tensors"
    ("garbage", "it is not a torch checkpoint (damaged, or a file of another kind)"),
    ("pickle", "it holds objects other than tensors and plain values"),
    ("plain-pickle", "it is not a torch checkpoint"),
])
def test_damaged_checkpoint(tmp_path, capsys, reference, kind, why):
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    marker = tmp_path / "pwned"
    _damage(kind, run / CHECKPOINT, marker)
    before = _tree(run)
    assert _run(run, resume=True) == 2
    _one_line_error(capsys, str(run / CHECKPOINT), "cannot be loaded", "Delete it", why)
    assert not marker.exists()  # the pickle was never executed
    assert _tree(run) == before  # nothing was touched


def test_damaged_checkpoint_deleted_then_resume_restarts_from_step_0(tmp_path, capsys, reference):
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    (run / "summary.json").unlink()  # killed after the last checkpoint, before the summary
    (run / CHECKPOINT).write_bytes(b"junk")
    assert _run(run, resume=True) == 2
    (run / CHECKPOINT).unlink()
    assert _run(run, resume=True) == 0
    assert (run / "metrics.jsonl").read_text() == (reference / "metrics.jsonl").read_text()


@pytest.mark.parametrize("damage", ["truncated", "not-a-run"])
def test_damaged_config_json_on_resume(tmp_path, capsys, reference, damage):
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    text = (run / "config.json").read_text()
    (run / "config.json").write_text(text[: len(text) // 2] if damage == "truncated" else "[1, 2]")
    before = _tree(run)
    assert _run(run, resume=True) == 2
    _one_line_error(capsys, str(run / "config.json"))
    assert _tree(run) == before


# -- data ------------------------------------------------------------------------------


def _heartbeat_csv(path: Path, rows: list[list[str]]):
    path.write_text("".join(",".join(r) + "\n" for r in rows))


def _beat(label="0", n=187):
    return ["0.5"] * n + [label]


@pytest.mark.parametrize("fault, rows, needle", [
    ("label out of range", [_beat(), _beat("7")], "row 2 has label 7.0"),
    ("wrong column count", [_beat(), _beat(n=100)], "row 2"),
    ("empty CSV", [], "holds no rows"),
    ("NaN sample", [_beat(), ["0.5"] * 40 + ["nan"] + ["0.5"] * 146 + ["1"]], "row 2, column 41"),
])
def test_heartbeat_data_faults(tmp_path, capsys, fault, rows, needle):
    data = tmp_path / "mitbih"
    data.mkdir()
    _heartbeat_csv(data / "mitbih_train.csv", rows)
    _heartbeat_csv(data / "mitbih_test.csv", [_beat(), _beat("1")])
    out = tmp_path / "run"
    assert main(["run", "ecg", "--out", str(out), "--no-progress", "--set", f"data_dir={data}"]) == 2
    _one_line_error(capsys, str(data / "mitbih_train.csv"), needle)
    assert not out.exists()  # found before anything is written: no stuck directory


def _idx(dims, data: bytes) -> bytes:
    return bytes([0, 0, 8, len(dims)]) + b"".join(d.to_bytes(4, "big") for d in dims) + data


def test_truncated_mnist_idx(tmp_path, capsys):
    data = tmp_path / "mnist"
    data.mkdir()
    n = 200
    for split in ("train", "t10k"):
        (data / f"{split}-images-idx3-ubyte").write_bytes(_idx([n, 28, 28], bytes(n * 784)))
        (data / f"{split}-labels-idx1-ubyte").write_bytes(_idx([n], bytes(n)))
    bad = data / "train-images-idx3-ubyte"
    bad.write_bytes(bad.read_bytes()[: 16 + 784 * 3 + 5])
    bad.rename(bad.with_suffix(".gz"))  # gzip it, as the files are distributed
    (data / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress((data / "train-images-idx3-ubyte.gz").read_bytes()))
    out = tmp_path / "run"
    argv = ["run", "mnist", "--out", str(out), "--no-progress", "--set", f"data_dir={data}",
            "train_size=128", "test_size=100"]
    assert main(argv) == 2
    _one_line_error(capsys, "train-images-idx3-ubyte.gz", "download the file again")
    # the directory left behind holds no checkpoint, so the same command can use it again
    assert main(argv) == 2
    _one_line_error(capsys, "train-images-idx3-ubyte.gz")


def test_cut_physionet_archive_names_the_file(tmp_path, capsys):
    # tarfile and gzip say only "Compressed file ended before the end-of-stream marker was reached"
    from test_data_damaged import _physionet_tar_gz

    archive = tmp_path / "set-a.tar.gz"
    archive.write_bytes(_physionet_tar_gz())
    archive.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    out = tmp_path / "run"
    assert main(["run", "physionet", "--out", str(out), "--no-progress", "--set", f"data_path={archive}",
                 "max_records=0", "iters=1"]) == 2
    _one_line_error(capsys, str(archive), "truncated or damaged", "download it again")


def test_missing_data_names_every_place_and_leaves_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("NEURALODE_DATA", str(tmp_path / "env"))
    out = tmp_path / "run"
    assert main(["run", "ecg", "--out", str(out), "--no-progress", "--set", f"data_dir={tmp_path / 'none'}"]) == 2
    _one_line_error(capsys, "data_dir=", "mitbih_train.csv", "docs/data.md")
    assert not out.exists()


# -- disk full -------------------------------------------------------------------------


def _enospc_on(monkeypatch, predicate, after_bytes=100):
    """Make the atomic writer fail like a full disk (half a file written, then ENOSPC) for the
    paths ``predicate`` accepts."""
    real = runner._atomic_write

    def full(path, write):
        if not predicate(Path(path)):
            return real(path, write)

        def torn(f):
            f.write(b"\0" * after_bytes)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

        return real(path, torn)

    monkeypatch.setattr(runner, "_atomic_write", full)


def test_disk_full_while_checkpointing(tmp_path, capsys, monkeypatch, reference):
    run = tmp_path / "run"
    calls = []

    def second_checkpoint(path):
        if path.name == "last.pt":
            calls.append(path)
            return len(calls) == 2
        return False

    _enospc_on(monkeypatch, second_checkpoint)
    assert _run(run) == 2
    _one_line_error(capsys, "No space left on device", f"--resume --out {run}")
    monkeypatch.undo()
    assert load_checkpoint(run / CHECKPOINT)["step"] == 4  # the first checkpoint is intact
    assert not list(run.rglob(".*.tmp"))
    assert _run(run, resume=True) == 0
    assert (run / "metrics.jsonl").read_text() == (reference / "metrics.jsonl").read_text()


def test_disk_full_while_plotting_then_resume_logs_nothing_twice(tmp_path, capsys, monkeypatch, reference):
    run = tmp_path / "run"
    _enospc_on(monkeypatch, lambda p: p.name == "phase_portrait.png")
    assert _run(run) == 2
    _one_line_error(capsys, "phase_portrait.png", "No space left on device", "--resume")
    monkeypatch.undo()
    assert not (run / "summary.json").exists()
    for png in (run / "plots").glob("*.png"):  # no torn picture
        assert png.read_bytes().startswith(b"\x89PNG") and png.read_bytes().endswith(b"IEND\xaeB`\x82")
    assert not (run / "plots" / "phase_portrait.png").exists()
    assert _run(run, resume=True) == 0
    assert (run / "metrics.jsonl").read_text() == (reference / "metrics.jsonl").read_text()
    json.loads((run / "summary.json").read_text(), parse_constant=_no_constants)


def _mount_tmpfs(where: Path, size: str) -> bool:
    where.mkdir()
    return os.geteuid() == 0 and subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True).returncode == 0


def test_a_real_full_disk(tmp_path, capsys, reference):
    """The same on a real 160 KiB file system (root only): the plots do not fit."""
    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, "160k"):
        pytest.skip("needs root and tmpfs to make a small file system")
    try:
        run = disk / "run"
        assert _run(run) == 2
        _one_line_error(capsys, "No space left on device", "--resume")
        assert load_checkpoint(run / CHECKPOINT)["step"] == 22
        assert not list(run.rglob(".*.tmp"))
        subprocess.run(["mount", "-o", "remount,size=4m", str(disk)], check=True)
        assert _run(run, resume=True) == 0
        assert (run / "metrics.jsonl").read_text() == (reference / "metrics.jsonl").read_text()
    finally:
        subprocess.run(["umount", str(disk)], check=False)


# -- metrics and JSON ------------------------------------------------------------------


def _no_constants(token):
    raise AssertionError(f"{token} in JSON")


def test_finished_run_with_deleted_metrics_is_refused(tmp_path, capsys, reference):
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    (run / "metrics.jsonl").unlink()
    summary = (run / "summary.json").read_text()
    assert _run(run, resume=True) == 2
    _one_line_error(capsys, str(run / "metrics.jsonl"), "records were lost")
    assert (run / "summary.json").read_text() == summary


def test_resuming_a_finished_run_rewrites_the_report_only(tmp_path, reference):
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    assert _run(run, resume=True) == 0
    assert (run / "metrics.jsonl").read_text() == (reference / "metrics.jsonl").read_text()
    a = json.loads((run / "summary.json").read_text())
    b = json.loads((reference / "summary.json").read_text())
    assert a["metrics"] == b["metrics"]


def test_json_files_never_hold_nan(tmp_path):
    ctx = runner.RunContext(run_dir=tmp_path, device=torch.device("cpu"))
    ctx.write_json("summary.json", {"loss": float("nan"), "inf": [float("inf"), 1.0], "n": {"x": -float("inf")}})
    data = json.loads((tmp_path / "summary.json").read_text(), parse_constant=_no_constants)
    assert data == {"loss": None, "inf": [None, 1.0], "n": {"x": None}}
    writer = runner._MetricsWriter(tmp_path / "metrics.jsonl", True)
    writer.write({"step": 1, "loss": float("nan")})
    writer.close()
    assert runner.read_metrics(tmp_path) == [{"step": 1, "loss": None}]
    # the experiments' view (plots, summaries) gets the NaN back
    history = ctx.history()
    assert history[0]["step"] == 1 and math.isnan(history[0]["loss"])


def test_a_diverged_loss_is_plotted_and_summarised_as_null(tmp_path):
    """A run whose loss turns non-finite (lr far too large) finishes with strict JSON everywhere."""
    sys.path.insert(0, str(Path(__file__).parent))
    from test_runner_toy import Toy, ToyConfig

    from neuralode.experiments import train

    summary = train(Toy, ToyConfig(steps=20, lr=1e30, eval_every=0), tmp_path / "run", progress=False)
    assert summary["status"] == "completed" and not math.isfinite(summary["metrics"]["mse"])
    saved = json.loads((tmp_path / "run" / "summary.json").read_text(), parse_constant=_no_constants)
    assert saved["metrics"]["mse"] is None
    records = [json.loads(line, parse_constant=_no_constants)
               for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("loss") is None for r in records)
    assert (tmp_path / "run" / "plots" / "loss.png").is_file()


def test_a_torn_metrics_line_is_named(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2, "lo')
    with pytest.raises(runner.CheckpointError, match="line 2"):
        runner.read_metrics(tmp_path)


# -- stuck run directories -------------------------------------------------------------


def _killed_before_first_checkpoint(run: Path):
    """What SIGKILL before the first checkpoint leaves: config.json and an early metrics line."""
    from neuralode.experiments import apply_overrides, train
    from neuralode.experiments.runner import Hook
    from neuralode.experiments.spiral import Spiral, SpiralConfig

    class Die(Hook):
        def after_step(self, run_ctx, position, record):
            if position.step == 2:
                raise SystemExit("killed")

    config = Spiral.resolve(apply_overrides(SpiralConfig(), SMOKE))
    with pytest.raises(SystemExit):
        train(Spiral, config, run, progress=False, hooks=[Die()])
    assert (run / "config.json").exists() and not (run / CHECKPOINT).exists()


def test_no_checkpoint_yet_resume_starts_afresh(tmp_path, reference):
    run = tmp_path / "run"
    _killed_before_first_checkpoint(run)
    assert _run(run, resume=True) == 0
    assert (run / "metrics.jsonl").read_text() == (reference / "metrics.jsonl").read_text()


def test_no_checkpoint_yet_run_reuses_the_directory(tmp_path, reference):
    run = tmp_path / "run"
    _killed_before_first_checkpoint(run)
    assert _run(run) == 0
    assert (run / "metrics.jsonl").read_text() == (reference / "metrics.jsonl").read_text()


def test_finished_run_is_still_never_overwritten(tmp_path, capsys, reference):
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    before = _tree(run)
    assert _run(run) == 2
    _one_line_error(capsys, "already holds a run", "--resume")
    assert _tree(run) == before


# -- threads and device ----------------------------------------------------------------


def test_threads_zero_means_torchs_default(tmp_path):
    default = torch.get_num_threads()
    assert _run(tmp_path / "run", "threads=0") == 0
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["threads"] == default


def test_device_auto_is_the_default_and_recorded(tmp_path, monkeypatch):
    from neuralode import cli

    assert cli._parser().parse_args(["run", "spiral"]).device == "auto"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert cli._device("auto") == "cuda"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cli._device("auto") == "cpu"


def test_summary_names_the_device(reference):
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert json.loads((reference / "summary.json").read_text())["device"].startswith(expected)


def test_a_failed_solve_is_one_line(tmp_path, capsys, monkeypatch):
    """A model whose ODE blows up mid-training (the solver raises NonFiniteError): one line, the
    checkpoints written so far intact."""
    import neuralode
    from neuralode.experiments.spiral import Spiral

    real = Spiral.loss

    def blow_up(self, model, batch, position):
        if position.step == 6:
            raise neuralode.NonFiniteError("the state became non-finite at t=0.5; try a smaller step.", t=0.5)
        return real(self, model, batch, position)

    monkeypatch.setattr(Spiral, "loss", blow_up)
    assert _run(tmp_path / "run") == 2
    _one_line_error(capsys, "a solve failed", "non-finite", "smaller lr")
    assert load_checkpoint(tmp_path / "run" / CHECKPOINT)["step"] == 4


def test_a_run_recorded_before_data_paths_were_resolved_still_resumes(tmp_path, reference):
    """Older versions recorded pendulum/ecg/mnist data_dir as given (relative); resolving both
    sides before comparing keeps such runs resumable."""
    from neuralode.experiments import train
    from neuralode.experiments.pendulum import Pendulum, PendulumConfig
    from shared_data import shared

    shared("pendulum", "real_pend_h_1.txt")
    config = Pendulum.resolve(PendulumConfig(steps=2, checkpoint_every=1, eval_every=0, hidden=4))
    run = tmp_path / "run"
    train(Pendulum, config, run, progress=False)
    saved = json.loads((run / "config.json").read_text())
    saved["config"]["data_dir"] = os.path.relpath(saved["config"]["data_dir"])
    (run / "config.json").write_text(json.dumps(saved))
    (run / "summary.json").unlink()
    assert main(["run", "pendulum", "--resume", "--out", str(run), "--no-progress", "--device", "cpu"]) == 0


def test_a_checkpoint_without_config_json_is_never_overwritten(tmp_path, capsys, reference):
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    (run / "config.json").unlink()
    (run / "summary.json").unlink()
    before = _tree(run)
    assert _run(run, resume=True) == 2
    _one_line_error(capsys, "has a checkpoint but no config.json", "restore")
    assert _run(run) == 2
    _one_line_error(capsys, "already holds a run")
    assert _tree(run) == before


def test_a_config_json_with_wrong_types_on_resume(tmp_path, capsys, reference):
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    saved = json.loads((run / "config.json").read_text())
    saved["config"]["log_every"] = "ten"
    (run / "config.json").write_text(json.dumps(saved))
    assert _run(run, resume=True) == 2
    _one_line_error(capsys, "config.json")


# -- QA round: config values, interrupts, resume consistency, concurrent runs --------------


@pytest.mark.parametrize("argv, needle", [
    (["run", "spiral", "--set", "hidden=-3"], "--set hidden=-3: must be a non-negative integer"),
    (["run", "spiral", "--seed", "-1"], "--seed -1: must be an integer in [0, 4294967295]"),
    (["run", "spiral", "--set", "noise_std=nan"], "--set noise_std=nan: must be a finite number >= 0"),
    (["run", "spiral", "--set", "rtol=0", "atol=0"], "rtol and atol are both 0"),
    (["run", "spiral", "--set", "t_end=inf"], "--set t_end=inf: must be a finite number > 0"),
    (["run", "cnf", "--set", "extent=-1"], "--set extent=-1: must be a finite number > 0"),
    (["run", "mnist", "--set", "batch_size=0"], "--set batch_size=0: must be a positive integer"),
    (["run", "latent_spiral", "--set", "n_plot=0"], "--set n_plot=0: must be a positive integer"),
    (["run", "ecg", "--set", "model=rknet", "rk_step=-0.5"], "--set rk_step=-0.5: must be a finite number > 0"),
])
def test_bad_set_values_are_one_line_before_any_directory(tmp_path, capsys, argv, needle):
    """QA D1: values outside a field's declared range: exit 2, one line naming the option, nothing made."""
    out = tmp_path / "run"
    assert main(argv + ["--out", str(out), "--no-progress"]) == 2
    _one_line_error(capsys, needle)
    assert not out.exists()


def test_an_empty_out_is_refused(tmp_path, capsys, monkeypatch):
    """QA D12: --out "" was Path("."): the run went into the working directory."""
    monkeypatch.chdir(tmp_path)
    assert main(["run", "spiral", "--out", "", "--no-progress", "--set", *SMOKE]) == 2
    _one_line_error(capsys, "--out is an empty path")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("where", ["setup", "finish"])
def test_ctrl_c_outside_the_step_loop_is_one_line(tmp_path, capsys, monkeypatch, reference, where):
    """QA D2: Ctrl-C during start-up or the final plots: one line, exit 130, the resume hint when a
    checkpoint exists; the resumed run is the run never stopped."""
    from neuralode.experiments.spiral import Spiral

    def interrupt(self, *args):
        raise KeyboardInterrupt

    monkeypatch.setattr(Spiral, where, interrupt)
    run = tmp_path / "run"
    assert _run(run) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("neuralode: interrupted") == 1, err
    if where == "finish":
        assert f"neuralode run spiral --resume --out {run}" in err, err
    else:
        assert "before the first checkpoint" in err and not (run / CHECKPOINT).exists(), err
    monkeypatch.undo()
    assert _run(run, resume=True) == 0
    assert (run / "metrics.jsonl").read_text() == (reference / "metrics.jsonl").read_text()


def _edit_config(run: Path, **changes):
    saved = json.loads((run / "config.json").read_text())
    for key, value in changes.items():
        if value is _DELETE:
            del saved["config"][key]
        else:
            saved["config"][key] = value
    (run / "config.json").write_text(json.dumps(saved))


_DELETE = object()


def _resume_with_edited_config_is_refused(tmp_path, capsys, reference, changes, *needles):
    """Resume a copy of the finished reference run (its summary removed) after editing config.json: exit 2,
    one line holding ``needles`` (each formatted with ``run``, the copy), and nothing in the directory touched."""
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    (run / "summary.json").unlink()
    _edit_config(run, **changes)
    before = _tree(run)
    assert _run(run, resume=True) == 2
    _one_line_error(capsys, *(needle.format(run=run) for needle in needles))
    assert _tree(run) == before


@pytest.mark.parametrize("changes, needle", [
    ({"epochs": "x"}, "field epochs: expected int, got 'x'"),
    ({"lr": "abc"}, "field lr: expected a number"),
    ({"variant": "nope"}, "field variant: must be one of cubic, linear, linear_hard"),
    ({"batch_size": 2.5}, "field batch_size: expected int"),
    ({"seed": True}, "field seed: expected int"),
    ({"method": 5}, "field method: expected a string"),
    ({"data_size": [1]}, "field data_size: expected int"),
    ({"rtol": None}, "field rtol: expected a number"),
    ({"epochs": _DELETE}, "field epochs is missing"),
])
def test_config_json_values_are_type_checked_on_resume(tmp_path, capsys, reference, changes, needle):
    """QA D4: a config.json edited to a wrong type, or missing a field, is named before anything runs."""
    _resume_with_edited_config_is_refused(tmp_path, capsys, reference, changes,
                                          "{run}/config.json is not a valid spiral config", needle, "restore it")


def test_an_empty_config_object_is_not_resumed_with_defaults(tmp_path, capsys, reference):
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    saved = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**saved, "config": {}}))
    assert _run(run, resume=True) == 2
    _one_line_error(capsys, "is not a valid spiral config", "is missing")


@pytest.mark.parametrize("changes, needle", [
    ({"epochs": 3}, "epochs: 3 in config.json, 2 when trained"),  # valid, but another schedule
    ({"hidden": 20}, "hidden: 20 in config.json, 50 when trained"),
])
def test_a_config_json_other_than_the_trained_one_is_refused(tmp_path, capsys, reference, changes, needle):
    """QA D3/D4: the checkpoint records the config it was trained with; resume compares against it."""
    _resume_with_edited_config_is_refused(tmp_path, capsys, reference, changes,
                                          "checkpoint {run}/" + str(CHECKPOINT) + " does not match", needle,
                                          "another --out")


def test_a_config_json_of_another_architecture_with_an_old_checkpoint(tmp_path, capsys, reference):
    """QA D3: checkpoints written before they recorded their config: the model's shapes are compared on
    loading (load_state_dict's RuntimeError), and named as a mismatch, not a traceback."""
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    (run / "summary.json").unlink()
    ckpt = load_checkpoint(run / CHECKPOINT)
    del ckpt["config"]
    torch.save(ckpt, run / CHECKPOINT)
    _edit_config(run, hidden=20)
    assert _run(run, resume=True) == 2
    _one_line_error(capsys, f"checkpoint {run / CHECKPOINT} does not match", "size mismatch", "another --out")


def test_a_linear_variants_config_json_on_a_cubic_checkpoint(tmp_path, capsys, reference):
    run = tmp_path / "run"
    linear = tmp_path / "linear"
    assert _run(linear, "variant=linear", "epochs=1") == 0
    shutil.copytree(reference, run)
    (run / "summary.json").unlink()
    shutil.copy(linear / "config.json", run / "config.json")
    assert _run(run, resume=True) == 2
    _one_line_error(capsys, "does not match", "variant")


def test_a_damaged_metrics_line_before_the_checkpoint_is_found_before_training(tmp_path, capsys, reference):
    """QA D11: the line is named at once (not after the whole resumed training), with a fix that works."""
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    (run / "summary.json").unlink()
    lines = (run / "metrics.jsonl").read_text().splitlines(keepends=True)
    lines[1] = "x" * (len(lines[1]) - 1) + "\n"  # same length: the offset check alone does not see it
    (run / "metrics.jsonl").write_text("".join(lines))
    before = _tree(run)
    assert _run(run, resume=True) == 2
    line = _one_line_error(capsys, f"{run / 'metrics.jsonl'} line 2", "cannot be resumed exactly",
                           "another --out")
    assert "resume the run with --resume" not in line
    assert _tree(run) == before


def test_a_second_run_into_a_busy_directory_is_refused(tmp_path, capsys, reference):
    """QA D6: one process at a time in a run directory (an flock, released when the holder ends)."""
    run = tmp_path / "run"
    holder = runner._RunLock(run)  # another process's lock (flock is per open file, so this conflicts)
    try:
        assert _run(run) == 2
        _one_line_error(capsys, f"{run} is in use by another neuralode process (pid {os.getpid()})")
        assert not (run / "config.json").exists()
    finally:
        holder.release()
    assert _run(run) == 0
    assert not (run / ".lock").exists()
    assert (run / "metrics.jsonl").read_text() == (reference / "metrics.jsonl").read_text()


def test_a_run_killed_while_holding_the_lock_leaves_no_stale_lock(tmp_path, reference):
    run = tmp_path / "run"
    code = ("import os, sys; from neuralode.experiments.runner import _RunLock; "
            f"_RunLock(__import__('pathlib').Path({str(run)!r})); os.kill(os.getpid(), 9)")
    subprocess.run([sys.executable, "-c", code], check=False)
    assert (run / ".lock").exists()  # left behind by SIGKILL, but no longer locked
    assert _run(run) == 0
    assert (run / "metrics.jsonl").read_text() == (reference / "metrics.jsonl").read_text()


def test_atomic_write_failures_name_the_target_not_the_temporary_file(tmp_path, monkeypatch):
    """QA D14: `.config.json.PID.tmp: Operation not permitted` named a file the user never sees."""
    def refuse(src, dst):
        raise PermissionError(errno.EPERM, "Operation not permitted", str(src), None, str(dst))

    monkeypatch.setattr(runner.os, "replace", refuse)
    with pytest.raises(PermissionError) as info:
        runner._atomic_write_bytes(tmp_path / "config.json", b"{}")
    assert info.value.filename == str(tmp_path / "config.json")
    assert list(tmp_path.iterdir()) == []


def test_a_failed_solve_before_any_checkpoint_does_not_claim_one(tmp_path, capsys, monkeypatch):
    import neuralode
    from neuralode.experiments.spiral import Spiral

    def blow_up(self, model, batch, position):
        raise neuralode.NonFiniteError("the state became non-finite at t=0.5; try a smaller step.", t=0.5)

    monkeypatch.setattr(Spiral, "loss", blow_up)
    assert _run(tmp_path / "run") == 2
    line = _one_line_error(capsys, "a solve failed", "No checkpoint was written")
    assert "is intact" not in line


def test_a_diverged_encoder_is_a_failed_solve_not_a_traceback(tmp_path, capsys):
    # lr=1e10 turns the latent ODE's encoder output to NaN after the first update: the decoder's solve is
    # handed a NaN initial state, a ValueError (NonFiniteInputError) that used to escape as a traceback.
    argv = ["run", "latent_spiral", "--out", str(tmp_path / "run"), "--no-progress", "--set", "n_spirals=20",
            "iters=5", "obs_counts=30", "nsample=50", "ntotal=150", "lr=1e10"]
    assert main(argv) == 2
    _one_line_error(capsys, "a solve failed", "y0 contains NaN", "smaller lr")


def test_an_error_in_finish_says_how_to_recover_and_resume_redoes_only_the_report(tmp_path, capsys, monkeypatch,
                                                                                     reference):
    """QA D15: training is kept (the final checkpoint), the message says so, and once the cause is gone
    --resume writes the report without training or logging anything again."""
    from neuralode.experiments.spiral import Spiral

    def broken(self, model, run):
        raise ValueError("a plot went wrong")

    monkeypatch.setattr(Spiral, "finish", broken)
    run = tmp_path / "run"
    assert _run(run) == 2
    _one_line_error(capsys, "training finished", "a plot went wrong", "--resume")
    monkeypatch.undo()
    assert _run(run, resume=True) == 0
    assert (run / "metrics.jsonl").read_text() == (reference / "metrics.jsonl").read_text()
    assert json.loads((run / "summary.json").read_text())["status"] == "completed"


# -- QA round 3: CLI defects -------------------------------------------------------------------


def test_a_diverging_model_stops_within_the_step_cap(tmp_path, capsys):
    """QA: lr=1e10 made the first solve shrink its steps for 100,000 steps (the solver's default), keeping
    every step's graph (~12 MB/s) for many minutes; training solves are capped by max_steps (2000)."""
    import time

    start = time.perf_counter()
    assert _run(tmp_path / "run", "lr=1e10") == 2
    assert time.perf_counter() - start < 60
    _one_line_error(capsys, "a solve failed", "max_num_steps=2000", "smaller lr", "--set max_steps")


@pytest.mark.parametrize("name, sets", [
    ("spiral", []), ("cubic", ["spread_sets=0", "resnet_sweep=", "odenet_sweep="]), ("cnf", ["n_test=10"]),
    ("poisson", ["method=dopri5", "step_size=0"]), ("tolerance", []), ("ecg", ["model=odenet"]),
    ("mnist", ["model=odenet"]),
])
def test_every_adaptive_training_solve_takes_max_steps(name, sets):
    from neuralode.experiments import apply_overrides, get_experiment

    experiment = get_experiment(name)
    assert experiment.Config().max_steps == 2000
    config = apply_overrides(experiment.Config(), sets + ["max_steps=7"])
    if name in ("spiral", "cubic", "cnf"):  # synthetic data; their models are made from what setup makes
        config = experiment.resolve(config)
    exp = experiment(config, torch.device("cpu"))
    if name in ("spiral", "cubic", "cnf"):
        exp.setup()
    if name == "spiral":  # the model is the vector field; the cap is in the loss's solve
        captured = {}
        import neuralode

        def fake(func, y0, t, **kwargs):
            captured.update(kwargs)
            return y0.expand(len(t), *y0.shape)

        with pytest.MonkeyPatch.context() as m:
            m.setattr(neuralode, "odeint", fake)
            exp.loss(exp.build_model(), exp.batch(runner._position(0, 1)), runner._position(0, 1))
        assert captured["options"] == {"max_num_steps": 7}
        return
    options = [m.options for m in exp.build_model().modules() if getattr(m, "options", None)]
    assert options and all(o.get("max_num_steps") == 7 for o in options), options


def test_a_run_written_before_max_steps_existed_resumes(tmp_path, reference):
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    for name in ("config.json",):
        saved = json.loads((run / name).read_text())
        del saved["config"]["max_steps"]
        (run / name).write_text(json.dumps(saved))
    ckpt = torch.load(run / CHECKPOINT, weights_only=True)
    del ckpt["config"]["max_steps"]
    runner.save_checkpoint(run / CHECKPOINT, ckpt)
    (run / "summary.json").unlink()
    assert _run(run, resume=True) == 0


@pytest.mark.parametrize("argv, needle", [
    # QA: a raw "Overflow when unpacking long long" traceback; 1e14 overflowed the derived seeds
    # (seed * 1_000_003 + crc32) of cnf, cubic, poisson, tolerance, latent_spiral and physionet.
    (["--seed", "99999999999999999999"], "--seed 99999999999999999999: must be an integer in [0, 4294967295]"),
    (["--seed", "100000000000000"], "--seed 100000000000000: must be an integer in [0, 4294967295]"),
    (["--set", "seed=4294967296"], "--set seed=4294967296: must be an integer in [0, 4294967295]"),
    # QA: threads=100000 crashed torch's thread pool (SIGSEGV, exit 139).
    (["--set", "threads=100000"], "--set threads=100000: must be an integer in [0, 1024]"),
])
def test_seed_and_threads_are_bounded_before_any_directory(tmp_path, capsys, argv, needle):
    out = tmp_path / "run"
    assert main(["run", "cubic", *argv, "--out", str(out), "--no-progress"]) == 2
    _one_line_error(capsys, needle)
    assert not out.exists()


def test_the_largest_seed_derives_seeds_torch_takes():
    from neuralode.experiments.spiral import SpiralConfig

    seed = SpiralConfig(seed=2**32 - 1).seed
    torch.Generator().manual_seed(seed * 1_000_003 + 2**32 - 1 + 10**9)  # the experiments' largest derived seed


def test_an_absurd_size_is_one_line_naming_memory(tmp_path, capsys):
    """QA: data_size=1e10 was a raw RuntimeError traceback from torch's allocator (spiral's setup)."""
    assert _run(tmp_path / "run", "data_size=1000000000000000") == 2
    _one_line_error(capsys, "spiral: memory ran out", "bytes failed", "no checkpoint was written", "smaller sizes")


@pytest.mark.parametrize("error", [
    MemoryError("Unable to allocate 37.3 GiB for an array with shape (5000000000,) and data type float64"),
    RuntimeError("CUDA out of memory. Tried to allocate 20.00 GiB (GPU 0; 79.35 GiB total capacity)"),
])
def test_running_out_of_memory_mid_training_is_one_line(tmp_path, capsys, monkeypatch, error):
    from neuralode.experiments.spiral import Spiral

    real = Spiral.loss

    def hungry(self, model, batch, position):
        if position.step == 6:
            raise error
        return real(self, model, batch, position)

    monkeypatch.setattr(Spiral, "loss", hungry)
    assert _run(tmp_path / "run") == 2
    _one_line_error(capsys, "memory ran out", "GiB failed", "the last checkpoint in", "is intact")


def test_other_runtime_errors_still_raise(tmp_path, monkeypatch):
    from neuralode.experiments.spiral import Spiral

    def bug(self, model, batch, position):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    monkeypatch.setattr(Spiral, "loss", bug)
    with pytest.raises(RuntimeError, match="shapes"):
        _run(tmp_path / "run")


def test_a_read_only_file_system_keeps_the_writes_own_error(tmp_path, monkeypatch):
    """QA: on a read-only mount, removing the temporary file raised EROFS inside the except block and
    replaced the write's error (and its file name)."""
    def refuse(src, dst):
        raise OSError(errno.EROFS, "Read-only file system", str(src), None, str(dst))

    def unlink(self, missing_ok=False):
        raise OSError(errno.EROFS, "Read-only file system", str(self))

    monkeypatch.setattr(runner.os, "replace", refuse)
    monkeypatch.setattr(runner.Path, "unlink", unlink)
    with pytest.raises(OSError) as info:
        runner._atomic_write_bytes(tmp_path / "summary.json", b"{}")
    assert info.value.errno == errno.EROFS and info.value.filename == str(tmp_path / "summary.json")


def test_a_full_disk_names_the_file_and_claims_no_checkpoint_before_the_first(tmp_path, capsys, monkeypatch):
    """QA: a failing write() raises ENOSPC with no file name ("a file: No space left on device"), and the
    line said the last checkpoint was intact when none had been written."""
    real = runner._atomic_write

    def full(path, write):
        def torn(f):
            f.write(b"\0" * 100)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # as write() raises it: no filename

        return real(path, torn if Path(path).name == "last.pt" else write)

    monkeypatch.setattr(runner, "_atomic_write", full)
    run = tmp_path / "run"
    assert _run(run) == 2
    line = _one_line_error(capsys, f"{run / CHECKPOINT}: No space left on device", "no checkpoint was written yet",
                           "run the command again")
    assert "intact" not in line and "a file" not in line and "--resume" not in line
    assert not list(run.rglob(".*.tmp"))


class _FullDisk:
    """A file on a full disk: write, flush and close raise ENOSPC without a file name, as a real one does."""

    def _full(self, *args):
        raise OSError(errno.ENOSPC, "No space left on device")

    write = flush = close = _full


def test_a_full_disk_under_metrics_jsonl_names_it(tmp_path):
    path = tmp_path / "metrics.jsonl"
    writer = runner._MetricsWriter(path, True)
    writer._file.close()
    writer._file = _FullDisk()
    with pytest.raises(OSError) as info:
        writer.write({"step": 1, "loss": 0.5})
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(path)
    with pytest.raises(OSError) as info:  # the line left in the buffer is written again on closing
        writer.close()
    assert info.value.filename == str(path)


def test_sigterm_stops_like_ctrl_c_and_the_handlers_are_restored(tmp_path, capsys, monkeypatch, reference):
    """QA: SIGTERM (kill, a scheduler's stop) ended the run at once (exit 143) without a fresh checkpoint."""
    import signal

    from neuralode.experiments.spiral import Spiral

    real = Spiral.loss

    def terminated(self, model, batch, position):
        if position.step == 6:
            signal.raise_signal(signal.SIGTERM)
        return real(self, model, batch, position)

    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    monkeypatch.setattr(Spiral, "loss", terminated)
    run = tmp_path / "run"
    assert _run(run) == 143
    err = capsys.readouterr().err
    assert "stopped by SIGTERM at step 7/" in err and f"neuralode run spiral --resume --out {run}" in err, err
    assert load_checkpoint(run / CHECKPOINT)["step"] == 7
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before
    monkeypatch.undo()
    assert _run(run, resume=True) == 0
    assert (run / "metrics.jsonl").read_text() == (reference / "metrics.jsonl").read_text()


def test_ctrl_c_during_the_final_evaluation_is_not_swallowed(tmp_path, capsys, monkeypatch, reference):
    """QA: one Ctrl-C during the final evaluation or checkpoint was taken as a stop request that the loop
    no longer looked at: the run finished its report and exited 0."""
    import signal

    from neuralode.experiments.spiral import Spiral

    real = Spiral.evaluate

    def interrupted(self, model, position, run):
        if position.step == self.num_steps:
            signal.raise_signal(signal.SIGINT)
        return real(self, model, position, run)

    monkeypatch.setattr(Spiral, "evaluate", interrupted)
    run = tmp_path / "run"
    assert _run(run) == 130
    err = capsys.readouterr().err
    total = load_checkpoint(reference / CHECKPOINT)["step"]
    assert f"stopped by SIGINT at step {total}/{total}" in err, err
    assert json.loads((run / "summary.json").read_text())["status"] == "interrupted"
    assert load_checkpoint(run / CHECKPOINT)["step"] == total
    monkeypatch.undo()
    assert _run(run, resume=True) == 0  # redoes only the final report
    assert (run / "metrics.jsonl").read_text() == (reference / "metrics.jsonl").read_text()


def test_resume_after_the_data_moved(tmp_path, capsys):
    """QA: config.json records the absolute data_dir, --resume refused every --set and the checkpoint's
    identity check compared data paths, so a run could not be resumed once its data moved."""
    from neuralode.experiments import train
    from neuralode.experiments.pendulum import Pendulum, PendulumConfig
    from shared_data import shared

    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(shared("pendulum", "real_pend_h_1.txt"), data / "real_pend_h_1.txt")
    config = Pendulum.resolve(PendulumConfig(steps=2, checkpoint_every=1, eval_every=0, hidden=4,
                                             data_dir=str(data)))
    run = tmp_path / "run"
    train(Pendulum, config, run, progress=False)
    (run / "summary.json").unlink()
    moved = tmp_path / "moved"
    data.rename(moved)
    resume = ["run", "pendulum", "--resume", "--out", str(run), "--no-progress", "--device", "cpu"]
    assert main(resume + ["--set", "hidden=5"]) == 2
    _one_line_error(capsys, "drop --set hidden", "data_dir and data_path")
    assert main(resume + ["--set", f"data_dir={moved}", "hidden=5"]) == 2
    capsys.readouterr()
    assert main(resume + ["--set", f"data_dir={moved}"]) == 0
    assert json.loads((run / "config.json").read_text())["config"]["data_dir"] == str(moved)
    (run / "summary.json").unlink()
    assert main(resume) == 0  # config.json now says where the data are
