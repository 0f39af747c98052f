"""Tests for the Schmidt & Lipson (2009) motion-tracking loader."""

from __future__ import annotations

import gzip
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from neuralode.data import load_pendulum

from shared_data import shared  # noqa: E402  (tests/shared_data.py)


def write(tmp_path: Path, text: str, name: str = "p.txt", gz: bool = False) -> Path:
    path = tmp_path / name
    path.write_bytes(gzip.compress(text.encode()) if gz else text.encode())
    return path


@pytest.mark.parametrize("gz", [False, True])
def test_small_file_and_trajectories(tmp_path, gz):
    text = "%o v\n0 0.0 1.0 2.0 \n0 0.1 1.5 2.5\n1 5.0 3.0 4.0\n1 5.2 3.5 4.5\n1 5.3 3.6 4.6\n"
    data = load_pendulum(write(tmp_path, text, gz=gz))
    assert data.columns == ("o", "v")
    assert data.trials.dtype == torch.int64 and data.trials.tolist() == [0, 0, 1, 1, 1]
    assert data.times.dtype == torch.float64 and data.states.shape == (5, 2)
    first, second = data.trajectories()
    assert first.trial == 0 and first.times.tolist() == [0.0, 0.1]
    assert second.trial == 1 and second.states[:, 1].tolist() == [4.0, 4.5, 4.6]
    assert second.columns == ("o", "v")


def test_unnamed_columns(tmp_path):
    doubled = load_pendulum(write(tmp_path, "% a b\n0 0 1 2 3 4\n0 1 1 2 3 4\n"))
    assert doubled.columns == ("a", "b", "da", "db")
    extra = load_pendulum(write(tmp_path, "% a\n0 0 1 2 3\n0 1 1 2 3\n"))
    assert extra.columns == ("a", "column_3", "column_4")


@pytest.mark.parametrize(
    "text, message",
    [
        ("0 0 1\n", r"first line is '0 0 1', expected a '%' line naming the state columns"),
        ("% a b c\n0 0 1 2\n", r"the header names 3 state columns \(a b c\) but rows have only 2"),
        ("% a\n0 0 1\n0 1\n", r"rows after the header line must all have the same number"),
        ("% a\n0 0 x\n", r"could not convert string 'x'"),
        ("% a\n0 0\n", r"rows have 2 columns, need at least 3"),
        ("% a\n0.5 0 1\n", r"data row 1 has trial id 0.5 in column 1; trial ids must be integers"),
        ("% a\n0 0 1\n0 1 1\n0 1 2\n", r"time does not increase in trial 0 at data row 3 \(t=1.0 after 1.0\)"),
        ("% a\n", r"has a header but no data rows"),
    ],
)
def test_errors(tmp_path, text, message):
    with pytest.raises(ValueError, match=message):
        load_pendulum(write(tmp_path, text))


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"real_pend_h_1\.txt.*does not exist; put a Schmidt & Lipson data file"):
        load_pendulum(tmp_path / "real_pend_h_1.txt")


# (file, columns, rows, trials) as documented in neuralode/data/pendulum.py.
REAL_LAYOUTS = [
    ("real_pend_h_1.txt", ("o", "v"), 556, [0]),
    ("real_pend_a_1.txt", ("o", "a", "w"), 556, [0]),
    ("real_double_pend_h_1.txt", ("o1", "o2", "w1", "w2", "do1", "do2", "dw1", "dw2"), 1520, [0, 1]),
    ("real_linear_h_1.txt", ("x", "v"), 870, [0]),
    ("real_linear_a_1.txt", ("x", "a", "v"), 870, [0]),
    ("real_double_linear_h_1.txt", ("x1", "x2", "v1", "v2"), 495, [0]),
    ("real_pend_circle_1.txt", ("x", "y"), 600, [0]),
]


@pytest.mark.parametrize("name, columns, rows, trials", REAL_LAYOUTS)
def test_real_files(name, columns, rows, trials):
    path = shared("pendulum", name)
    data = load_pendulum(path)
    assert data.columns == columns and data.states.shape == (rows, len(columns))
    assert [t.trial for t in data.trajectories()] == trials
    # Same numbers as the plain numpy.loadtxt(skiprows=1) reading the data README recommends.
    raw = np.loadtxt(path, skiprows=1)
    np.testing.assert_array_equal(data.states.numpy(), raw[:, 2:])
    np.testing.assert_array_equal(data.times.numpy(), raw[:, 1])


def test_real_double_pendulum_derivative_columns():
    data = load_pendulum(shared("pendulum", "real_double_pend_h_1.txt"))
    s = dict(zip(data.columns, data.states.T))
    # The unnamed half really is d/dt of the named half: do1 == w1 exactly, dw1 ~ gradient of w1.
    assert torch.equal(s["do1"], s["w1"]) and torch.equal(s["do2"], s["w2"])
    traj = data.trajectories()[0]
    w1 = traj.states[:, data.columns.index("w1")].numpy()
    dw1 = traj.states[:, data.columns.index("dw1")].numpy()
    assert np.corrcoef(np.gradient(w1, traj.times.numpy()), dw1)[0, 1] > 0.99


@pytest.mark.parametrize("text, message", [
    ("% a b\n0 0 1 2\n0 1 1 2\n0 2 1 2\n0 3 1 nan\n", r"data row 4, column 4 is nan, not a finite number; 1 row"),
    ("% a\n0 0 1\n0 1 inf\n0 2 -inf\n", r"data row 2, column 3 is inf, not a finite number; 2 row"),
    ("% a\n0 0 1\n0 nan 1\n0 2 1\n", r"data row 2, column 2 is nan, not a finite number"),
    ("% a\nnan 0 1\n", r"data row 1, column 1 is nan, not a finite number"),
])
def test_non_finite_values_are_named_by_row_and_column(tmp_path, text, message):
    """QA D7: NaN and infinity (which loadtxt reads) are refused with their place in the file."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # numpy's "invalid value" RuntimeWarning would fail the test
        with pytest.raises(ValueError, match=message):
            load_pendulum(write(tmp_path, text))


def test_a_one_row_trial_names_the_file_and_the_fix(tmp_path, capsys):
    """QA D8: a trial with one row has no time step; the experiment says which file and trial."""
    from neuralode.cli import main

    text = shared("pendulum", "real_pend_h_1.txt").read_text()
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "p.txt").write_text(text.rstrip("\n") + "\n7 100.0 0.1 0.2\n")
    argv = ["run", "pendulum", "--out", str(tmp_path / "run"), "--no-progress", "--set",
            f"data_dir={tmp_path / 'data'}", "file=p.txt", "steps=1", "eval_every=0", "hidden=4"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "zero-size" not in err, err
    assert "p.txt: trial 7 has only one row" in err and "drop that trial" in err, err
    assert not (tmp_path / "run" / "checkpoints").exists()
