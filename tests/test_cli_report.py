"""`neuralode report`: one section per run with a metric | ours | seed paper table, per-class
tables, confusion matrices as grids, full-width figures that open larger on click; and the page
laid out by a real headless Chromium (skipped where no Chromium is installed) without anything
cut off at the right edge."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from neuralode.cli import main
from neuralode.experiments.runner import figure

ROOT = Path(__file__).resolve().parents[1]


def _png(path: Path, width_in: float = 6.0):
    fig = figure(figsize=(width_in, 3))
    ax = fig.subplots()
    ax.plot([0, 1, 2], [3, 1, 2])
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=150)


def _fake_run(root: Path, experiment: str, metrics: dict, references: dict, plots=("loss",)) -> Path:
    run = root / experiment
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"experiment": experiment, "config": {"seed": 0, "lr": 0.1}}))
    (run / "summary.json").write_text(json.dumps({
        "experiment": experiment, "status": "completed", "steps": 10, "epochs": 1, "seed": 0, "device": "cpu",
        "wall_time_s": 1.5, "metrics": metrics, "references": references}))
    for name in plots:
        _png(run / "plots" / f"{name}.png")
    return run


@pytest.fixture
def page(tmp_path):
    conf = [[50, 1, 0, 0, 0], [3, 9, 0, 0, 0], [1, 0, 20, 0, 0], [0, 0, 1, 2, 0], [0, 0, 0, 0, 30]]
    ecg = _fake_run(tmp_path, "ecg", {
        "resnet_accuracy": 0.91, "resnet_test_ce": float("nan") and None, "resnet_confusion": conf,
        "resnet_precision": [0.9, 0.8, 0.95, 0.5, 1.0], "odenet_nfe_forward_per_epoch": [26.0, 32.5],
        "split": "kaggle"},
        {"resnet_accuracy": {"value": 0.975, "label": "ResNet test accuracy", "source": "seed document"}},
        plots=("loss", "confusion"))
    memory = _fake_run(tmp_path, "memory", {"resnet_1_peak_bytes": 212992}, {}, plots=("loss", "memory"))
    out = tmp_path / "report.html"
    assert main(["report", str(ecg), str(memory), "--out", str(out)]) == 0
    return out


def test_sections_tables_grids_and_figures(page):
    html = page.read_text()
    assert html.count("<h2 id='run") == 2
    assert html.count("<th>metric</th><th>ours</th><th>seed paper</th>") == 2  # a 3-column table per run
    assert "0.975" in html and "ResNet test accuracy" in html  # the seed's figure beside ours
    # confusion matrix: a grid with the class names, ours and the seed paper's, not a list as text
    assert "resnet_confusion (ours)" in html and "resnet (seed paper)" in html
    assert "<th>N</th><th>S</th><th>V</th><th>F</th><th>Q</th>" in html
    assert "[50, 1" not in html and "[0.9, 0.8" not in html
    assert "<h3>Per class</h3>" in html and "<h3>Series" in html
    # figures: every one embedded, clickable to enlarge; memory's meaningless loss plot left out
    assert html.count("<figure><img") == 3 and "figure img" in html and "zoom" in html
    assert 'alt="memory"' in html and html.count('alt="loss"') == 1
    assert "src=\"http" not in html


def test_memory_draws_no_loss_curve():
    from neuralode.experiments import get_experiment

    assert get_experiment("memory").loss_plot is False
    assert get_experiment("spiral").loss_plot is True


def test_a_damaged_summary_is_one_line(tmp_path, capsys):
    run = _fake_run(tmp_path, "spiral", {}, {}, plots=())
    (run / "summary.json").write_text('{"status": "comp')
    assert main(["report", str(run)]) == 2
    err = capsys.readouterr().err
    assert "summary.json is not valid JSON" in err and "Traceback" not in err


def _screenshot_module():
    spec = importlib.util.spec_from_file_location("screenshot_report", ROOT / "scripts" / "screenshot_report.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("screenshot_report", module)
    spec.loader.exec_module(module)
    return module


def test_laid_out_by_chromium_nothing_cut_off(page, tmp_path):
    shots = _screenshot_module()
    if shots.chromium() is None:
        pytest.skip("no chromium on PATH (Debian: apt-get install -y chromium)")
    for width in (1280, 800):
        layout = shots.layout(page, width)
        assert layout["scroll_width"] <= layout["client_width"], layout  # no horizontal overflow
        assert layout["widest_table_right"] <= layout["client_width"], layout
        assert layout["figure_widths"] and max(layout["figure_widths"]) <= layout["client_width"]
    # a 6-inch figure fills the column at 1280 px (full width, not a thumbnail), and a click opens
    # it larger
    wide = shots.layout(page, 1280)
    assert max(wide["figure_widths"]) >= 850
    assert wide["zoomed"] and wide["zoom_width"] > wide["figure_widths"][0]
    png = shots.screenshot(page, tmp_path / "report.png", 1280)
    assert png.read_bytes().startswith(b"\x89PNG") and png.stat().st_size > 10_000


@pytest.mark.parametrize("file, content, needle", [
    ("config.json", [1], "config.json is not a run config (expected an object, got an array)"),
    ("config.json", "x", "config.json is not a run config (expected an object, got the string 'x')"),
    ("config.json", {"experiment": 5, "config": {}}, "experiment: expected a name"),
    ("config.json", {"experiment": "spiral", "config": "abc"}, "config: expected an object"),
    ("summary.json", [], "summary.json is not a run summary (expected an object, got an array)"),
    ("summary.json", {"metrics": [1, 2]}, "metrics: expected an object"),
    ("summary.json", {"wall_time_s": "abc"}, "wall_time_s: expected a number"),
    ("summary.json", {"device": 5}, "device: expected a string"),
    ("summary.json", {"references": {"a": 5}}, "references.a: expected an object with a numeric value"),
    ("summary.json", {"references": {"a": {"value": "x"}}}, "references.a"),
])
def test_valid_json_of_the_wrong_shape_is_one_line(tmp_path, capsys, file, content, needle):
    """QA D5: a run file that is valid JSON but not what `neuralode run` writes is named, exit 2, no traceback."""
    run = _fake_run(tmp_path, "spiral", {"loss": 0.1}, {})
    (run / file).write_text(json.dumps(content))
    assert main(["report", str(run), "--out", str(tmp_path / "r.html")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert str(run / file) in err and needle in err and "leave that run out" in err, err
    assert not (tmp_path / "r.html").exists()


def test_a_confusion_matrix_with_nan_is_drawn(tmp_path):
    """NaN tokens (accepted by Python's JSON reader) in a confusion matrix leave that cell unshaded."""
    run = _fake_run(tmp_path, "ecg", {"resnet_confusion": [[1, 0], [0, 1]]}, {})
    (run / "summary.json").write_text((run / "summary.json").read_text().replace("[[1, 0], [0, 1]]",
                                                                                  "[[1, NaN], [0, 1]]"))
    assert main(["report", str(run), "--out", str(tmp_path / "r.html")]) == 0
    assert "resnet_confusion (ours)" in (tmp_path / "r.html").read_text()


def test_an_empty_run_dir_or_out_is_refused(tmp_path, capsys):
    assert main(["report", ""]) == 2
    assert "RUN_DIR is an empty path" in capsys.readouterr().err
    run = _fake_run(tmp_path, "spiral", {"loss": 0.1}, {})
    assert main(["report", str(run), "--out", ""]) == 2
    assert "--out is an empty path" in capsys.readouterr().err


@pytest.mark.parametrize("target", ["config.json", "summary.json", "plots/loss.png", "checkpoints/last.pt",
                                    "notes.txt", "../elsewhere.json"])
def test_out_never_replaces_a_runs_files_or_a_non_html_file(tmp_path, capsys, target):
    """QA: `neuralode report RUN --out RUN/config.json` silently replaced the run's config with the page."""
    run = _fake_run(tmp_path, "spiral", {"traj_mse": 0.1}, {})
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "last.pt").write_bytes(b"PK")
    (tmp_path / "elsewhere.json").write_text("{}")
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    assert main(["report", str(run), "--out", str(run / target)]) == 2
    err = capsys.readouterr().err
    assert err.count("neuralode: error: ") == 1 and "Traceback" not in err and "--out" in err, err
    assert ".html" in err
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


def test_out_may_replace_an_html_page_in_the_run_directory(tmp_path):
    run = _fake_run(tmp_path, "spiral", {"traj_mse": 0.1}, {})
    (run / "old.html").write_text("old")
    assert main(["report", str(run), "--out", str(run / "old.html")]) == 0
    assert main(["report", str(run)]) == 0 and (run / "report.html").read_text().startswith("<!doctype html>")
    assert (run / "old.html").read_text().startswith("<!doctype html>")
