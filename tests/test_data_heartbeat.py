"""Tests for the MIT-BIH Kaggle-layout heartbeat loader and the inter-patient split."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch

from neuralode.data import (
    DE_CHAZAL_DS1,
    DE_CHAZAL_DS2,
    HeartbeatData,
    inter_patient_split,
    load_heartbeat,
)

from shared_data import shared  # noqa: E402  (tests/shared_data.py)


def write_csv(path: Path, rows: list[str], gz: bool = False) -> Path:
    text = "".join(r + "\n" for r in rows).encode()
    path.write_bytes(gzip.compress(text) if gz else text)
    return path


def row(label, n=187, value=0.5) -> str:
    return ",".join([str(value)] * n + [str(label)])


# --------------------------------------------------------------------------- format variants


@pytest.mark.parametrize("gz", [False, True])
def test_small_file_plain_and_gzip(tmp_path, gz):
    rng = np.random.default_rng(0)
    table = rng.random((5, 187)).round(6)
    labels = [0, 1, 2, 3, 4]
    rows = [",".join(f"{v:.6f}" for v in r) + f",{lab}.0" for r, lab in zip(table, labels)]
    path = write_csv(tmp_path / ("b.csv.gz" if gz else "b.csv"), rows, gz=gz)
    data = load_heartbeat(path)
    assert data.x.shape == (5, 1, 187) and data.x.dtype == torch.float32
    assert data.y.dtype == torch.int64 and data.y.tolist() == labels
    assert data.records is None
    np.testing.assert_allclose(data.x[:, 0].numpy(), table, rtol=1e-6)


def test_gzip_detected_from_content_not_suffix(tmp_path):
    path = write_csv(tmp_path / "looks_plain.csv", [row(1)], gz=True)
    assert load_heartbeat(str(path)).y.tolist() == [1]


def test_records_and_subset(tmp_path):
    path = write_csv(tmp_path / "b.csv", [row(0), row(1), row(2)])
    (tmp_path / "r.txt").write_text("100\n101\n100\n")
    data = load_heartbeat(path, tmp_path / "r.txt")
    assert data.records.tolist() == [100, 101, 100]
    sub = data.subset(torch.tensor([2, 0]))
    assert sub.y.tolist() == [2, 0] and sub.records.tolist() == [100, 100] and len(sub) == 2


# --------------------------------------------------------------------------- errors


def test_missing_file_names_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.csv.*does not exist; put the MIT-BIH heartbeat CSV"):
        load_heartbeat(tmp_path / "nope.csv")


def test_directory_instead_of_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="is a directory; pass the file itself"):
        load_heartbeat(tmp_path)


def test_path_type_error():
    with pytest.raises(TypeError, match="path must be a path"):
        load_heartbeat(None)  # type: ignore[arg-type]


def test_ragged_row_reports_row_and_count(tmp_path):
    path = write_csv(tmp_path / "b.csv", [row(0), row(0), row(1, n=186)])
    with pytest.raises(ValueError, match="row 3 has 187 comma-separated columns, expected 188"):
        load_heartbeat(path)


def test_consistent_wrong_width(tmp_path):
    path = write_csv(tmp_path / "b.csv", [row(0, n=10), row(1, n=10)], gz=True)
    with pytest.raises(ValueError, match="row 1 has 11 comma-separated columns, expected 188"):
        load_heartbeat(path)


def test_non_numeric_token(tmp_path):
    path = write_csv(tmp_path / "b.csv", [row(0), row(0).replace("0.5", "abc", 1)])
    with pytest.raises(ValueError, match=r"row 2, column 1 is not a number: 'abc'"):
        load_heartbeat(path)


@pytest.mark.parametrize("label, shown", [("5", "5.0"), ("-1", "-1.0"), ("1.5", "1.5"), ("nan", "nan")])
def test_bad_labels(tmp_path, label, shown):
    path = write_csv(tmp_path / "b.csv", [row(0), row(label)])
    with pytest.raises(ValueError, match=rf"row 2 has label {shown} in column 188; labels must be integers 0\.\.4"):
        load_heartbeat(path)


def test_empty_file(tmp_path):
    path = write_csv(tmp_path / "b.csv", [])
    with pytest.raises(ValueError, match="holds no rows"):
        load_heartbeat(path)


def test_missing_records_file(tmp_path):
    path = write_csv(tmp_path / "b.csv", [row(0)])
    with pytest.raises(FileNotFoundError, match="records_path=.*per-row record-id file"):
        load_heartbeat(path, tmp_path / "missing.txt")


def test_records_count_mismatch(tmp_path):
    path = write_csv(tmp_path / "b.csv", [row(0), row(1)])
    (tmp_path / "r.txt").write_text("100\n101\n102\n")
    with pytest.raises(ValueError, match="has 3 record ids but the heartbeat file has 2 rows"):
        load_heartbeat(path, tmp_path / "r.txt")


def test_records_non_integer_and_blank(tmp_path):
    path = write_csv(tmp_path / "b.csv", [row(0), row(1)])
    (tmp_path / "r.txt").write_text("100\nabc\n")
    with pytest.raises(ValueError, match="line 2 is not an integer record id: 'abc'"):
        load_heartbeat(path, tmp_path / "r.txt")
    (tmp_path / "r.txt").write_text("100\n\n101\n")
    with pytest.raises(ValueError, match="line 2 is blank"):
        load_heartbeat(path, tmp_path / "r.txt")
    # A trailing blank line is harmless.
    (tmp_path / "r.txt").write_text("100\n101\n\n")
    assert load_heartbeat(path, tmp_path / "r.txt").records.tolist() == [100, 101]


# --------------------------------------------------------------------------- inter-patient split


def test_split_is_disjoint_deterministic_and_covers():
    records = torch.tensor([5, 5, 7, 9, 9, 9, 11, 13, 7, 5])
    tr, te = inter_patient_split(records, test_fraction=0.4, seed=3)
    tr2, te2 = inter_patient_split(records, test_fraction=0.4, seed=3)
    assert torch.equal(tr, tr2) and torch.equal(te, te2)
    assert sorted(tr.tolist() + te.tolist()) == list(range(10))
    assert set(records[tr].tolist()).isdisjoint(records[te].tolist())
    assert len(set(records[te].tolist())) == 2  # round(0.4 * 5 records)
    # The documented recipe: permutation of the sorted unique ids with default_rng(seed).
    expected = set(np.random.default_rng(3).permutation(np.array([5, 7, 9, 11, 13]))[:2].tolist())
    assert set(records[te].tolist()) == expected


def test_split_explicit_records_and_errors():
    records = torch.tensor([1, 2, 3, 1])
    tr, te = inter_patient_split(records, test_records=[1])
    assert te.tolist() == [0, 3] and tr.tolist() == [1, 2]
    with pytest.raises(ValueError, match=r"do not occur in records: \[4\]"):
        inter_patient_split(records, test_records=[4])
    with pytest.raises(ValueError, match="test_fraction must be in"):
        inter_patient_split(records, test_fraction=1.0)
    with pytest.raises(ValueError, match="at least two"):
        inter_patient_split(torch.tensor([1, 1]))
    with pytest.raises(TypeError, match="records_path"):
        inter_patient_split(None)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="integer tensor"):
        inter_patient_split(torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="must be 1-D"):
        inter_patient_split(torch.tensor([[1, 2]]))


# --------------------------------------------------------------------------- real data


def test_real_mitbih_test_file():
    data = load_heartbeat(
        shared("mitbih", "mitbih_test.csv.gz"), shared("mitbih", "mitbih_test_records.txt")
    )
    assert data.x.shape == (21890, 1, 187)
    assert data.class_counts().tolist() == [18118, 556, 1447, 161, 1608]
    assert float(data.x.min()) >= 0.0 and float(data.x.max()) <= 1.0
    assert len(torch.unique(data.records)) == 48
    # The de Chazal sets are disjoint and, with the paced records, cover all 48 records.
    paced = {102, 104, 107, 217}
    assert set(DE_CHAZAL_DS1) | set(DE_CHAZAL_DS2) | paced == set(torch.unique(data.records).tolist())
    tr, te = inter_patient_split(data.records, test_records=DE_CHAZAL_DS2)
    assert set(data.records[te].tolist()) == set(DE_CHAZAL_DS2)
    assert isinstance(data.subset(te), HeartbeatData)
