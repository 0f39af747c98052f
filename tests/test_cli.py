"""The `neuralode` command: listing, running, reporting and every user error (exit 2, one
line naming the fix, no traceback)."""

from __future__ import annotations

import base64
import json
import subprocess
import sys

import pytest
import torch

from neuralode.cli import main
from neuralode.experiments import ConfigError, experiment_names, get_experiment

SMOKE_SPIRAL = ["data_size=60", "batch_time=5", "batch_size=5", "epochs=2", "eval_every=11",
                "checkpoint_every=4", "snapshots=2"]


def _python_m(*args, cwd=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "neuralode", *args], capture_output=True,
                          text=True, cwd=cwd, timeout=timeout)


def _error(capsys, argv):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("neuralode: error: ") and "Traceback" not in err
    return err


def test_list_names_every_experiment(capsys):
    assert main(["list"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split()[0] for line in lines] == experiment_names()
    assert {"spiral", "cubic"} <= set(experiment_names())
    assert all(len(line.split()) > 2 for line in lines)  # a description on each line


def test_run_spiral_end_to_end_in_a_subprocess(tmp_path):
    out = tmp_path / "run"
    proc = _python_m("run", "spiral", "--set", *SMOKE_SPIRAL, "--out", str(out), "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert "traj_mse" in proc.stdout
    assert json.loads((out / "config.json").read_text())["config"]["data_size"] == 60
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 22
    assert summary["metrics"]["traj_mse"] >= 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {r["split"] for r in records} == {"train", "eval"}
    assert {p.name for p in (out / "plots").glob("*.png")} >= {
        "loss.png", "trajectories.png", "phase_portrait.png", "evaluation.png"}
    assert (out / "checkpoints" / "last.pt").exists()


def test_unknown_experiment_suggests_the_closest(capsys):
    err = _error(capsys, ["run", "spirl"])
    assert "unknown experiment 'spirl'" in err and "Did you mean 'spiral'" in err
    assert "cubic" in err  # the known ones are listed


def test_unknown_key_suggests_the_closest(capsys):
    err = _error(capsys, ["run", "spiral", "--set", "epoch=3"])
    assert "unknown config key 'epoch'" in err and "Did you mean 'epochs'" in err


@pytest.mark.parametrize("override, message", [
    ("epochs=three", "'three' is not an integer"),
    ("lr=fast", "'fast' is not a number"),
    ("variant=linaer", "did you mean 'linear'"),
    ("seed", "--set expects key=value"),
])
def test_bad_values_name_the_type(capsys, override, message):
    err = _error(capsys, ["run", "spiral", "--set", override])
    assert message in err


def test_bad_tuple_value_names_the_type(capsys):
    err = _error(capsys, ["run", "cubic", "--set", "resnet_sweep=0.1,x"])
    assert "'x' is not a number" in err and "tuple" in err


def test_resume_without_checkpoint(capsys, tmp_path):
    err = _error(capsys, ["run", "spiral", "--resume", "--out", str(tmp_path / "nothing")])
    assert "no checkpoint" in err and "without --resume" in err


def test_resume_refuses_config_changes(capsys, tmp_path):
    err = _error(capsys, ["run", "spiral", "--resume", "--out", str(tmp_path), "--set", "lr=1"])
    assert "drop --set" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_without_cuda(capsys, tmp_path):
    err = _error(capsys, ["run", "spiral", "--device", "cuda", "--out", str(tmp_path / "r")])
    assert "CUDA is not available" in err and "--device cpu" in err
    assert not (tmp_path / "r").exists()


def test_run_refuses_to_overwrite(capsys, tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.pt").write_bytes(b"a checkpoint")
    err = _error(capsys, ["run", "spiral", "--out", str(tmp_path)])
    assert "already holds a run" in err and "--resume" in err
    assert (tmp_path / "checkpoints" / "last.pt").read_bytes() == b"a checkpoint"


def test_resume_defaults_to_the_newest_run(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    err = _error(capsys, ["run", "spiral", "--resume"])
    assert "no runs/spiral-* directory" in err and "--out" in err


def test_report_embeds_plots_metrics_and_references(tmp_path, capsys):
    spiral, cubic = tmp_path / "spiral", tmp_path / "cubic"
    assert main(["run", "spiral", "--set", *SMOKE_SPIRAL, "variant=linear", "--out", str(spiral), "--no-progress"]) == 0
    assert main(["run", "cubic", "--set", "resnet_iters=3", "odenet_iters=2", "spread_sets=1",
                 "resnet_sweep=", "odenet_sweep=", "--out", str(cubic), "--no-progress"]) == 0
    out = tmp_path / "report.html"
    assert main(["report", str(spiral), str(cubic), "--out", str(out)]) == 0
    page = out.read_text()
    n_plots = len(list(spiral.glob("plots/*.png"))) + len(list(cubic.glob("plots/*.png")))
    assert page.count("data:image/png;base64,") == n_plots >= 6
    first = page.split("data:image/png;base64,")[1].split('"')[0]
    assert base64.b64decode(first).startswith(b"\x89PNG")
    for metric in ("traj_mse", "matrix_frobenius_error", "resnet_mse", "odenet_mse"):
        assert metric in page
    assert "4.673" in page and "7.72" in page  # the seed's figures beside ours
    assert "<img" in page and "src=\"http" not in page  # self-contained


def test_report_on_a_directory_that_is_no_run(capsys, tmp_path):
    err = _error(capsys, ["report", str(tmp_path)])
    assert "not a run directory" in err


def test_experiment_lookup_error_type():
    with pytest.raises(ConfigError, match="Known experiments"):
        get_experiment("nope")


def test_missing_plotting_dependency_names_the_extra(capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    err = _error(capsys, ["run", "spiral"])
    assert "needs matplotlib" in err and "neuralode[cli]" in err


def test_version_names_neuralode_and_torch(capsys):
    import neuralode
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"neuralode {neuralode.__version__} (torch ")
