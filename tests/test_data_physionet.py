"""Tests for the PhysioNet 2012 loader, normaliser and collate function."""

from __future__ import annotations

import io
import math
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from shared_data import shared

from neuralode.data import (
    PHYSIONET_STATIC,
    PHYSIONET_VARIABLES,
    PhysioNetNormalizer,
    collate_physionet,
    load_physionet,
    load_physionet_outcomes,
)
from neuralode.data import physionet as physionet_module

V = {name: i for i, name in enumerate(PHYSIONET_VARIABLES)}
S = {name: i for i, name in enumerate(PHYSIONET_STATIC)}


def patient(record_id=1, body=(), weight="-1", age="60", extra_descr=()) -> str:
    lines = ["Time,Parameter,Value", f"00:00,RecordID,{record_id}", f"00:00,Age,{age}",
             "00:00,Gender,1", "00:00,Height,-1", "00:00,ICUType,3", f"00:00,Weight,{weight}",
             *extra_descr, *body]  # fmt: skip
    return "\n".join(lines) + "\n"


def write_tar(path: Path, files: dict[str, str], mode: str = "w:gz") -> Path:
    with tarfile.open(path, mode) as tar:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


# --------------------------------------------------------------------------- parsing rules


def test_times_values_masks_duplicates_and_weight(tmp_path):
    body = ["00:00,HR,70", "00:00,Weight,81", "00:30,HR,72", "00:30,Urine,100", "00:30,Urine,50",
            "05:00,Weight,82", "48:00,pH,7.4"]  # fmt: skip
    (tmp_path / "7.txt").write_text(patient(7, body, weight="80"))
    (record,) = load_physionet(tmp_path / "7.txt")
    assert record.record_id == 7 and record.label is None
    assert record.times.dtype == torch.float64
    assert record.times.tolist() == [0.0, 0.5, 5.0, 48.0]
    assert record.values.shape == record.mask.shape == (4, 37)
    assert record.values.dtype == torch.float32 and record.mask.dtype == torch.bool
    # The first 00:00 Weight is the static descriptor; later Weight lines are the series.
    assert record.static[S["Weight"]].item() == 80.0
    assert record.values[0, V["Weight"]].item() == 81.0 and record.values[2, V["Weight"]].item() == 82.0
    assert record.mask[:, V["Weight"]].tolist() == [True, False, True, False]
    # Duplicates at one time are averaged.
    assert record.values[1, V["Urine"]].item() == 75.0
    assert record.values[1, V["HR"]].item() == 72.0
    assert int(record.mask.sum()) == 7 - 1  # two Urine lines became one entry
    assert (record.values[~record.mask] == 0).all()
    assert torch.isnan(record.static[S["Height"]]) and record.static[S["Age"]].item() == 60.0


def test_quantization_rounds_times_and_averages_per_variable(tmp_path):
    # quantization=0.1 h = 6 min: 00:01 -> 0.0; 00:05 and 00:07 -> 0.1; 00:20 -> 0.3 (no exact halves,
    # whose rounding depends on the last bit of minutes / 60 / 0.1).
    body = ["00:01,HR,70", "00:05,HR,80", "00:05,Urine,100", "00:07,HR,90", "00:07,HR,96", "00:20,HR,60"]
    (tmp_path / "5.txt").write_text(patient(5, body))
    (raw,) = load_physionet(tmp_path / "5.txt")
    assert raw.times.tolist() == pytest.approx([1 / 60, 5 / 60, 7 / 60, 20 / 60])
    (rec,) = load_physionet(tmp_path / "5.txt", quantization=0.1)
    assert rec.times.dtype == torch.float64
    assert rec.times.tolist() == pytest.approx([0.0, 0.1, 0.3])
    # HR at 0.1 h: the mean of the three raw lines 80, 90, 96 (not of the per-minute means 80, 93).
    assert rec.values[:, V["HR"]].tolist() == pytest.approx([70.0, (80 + 90 + 96) / 3, 60.0])
    assert rec.mask[:, V["Urine"]].tolist() == [False, True, False] and rec.values[1, V["Urine"]].item() == 100.0
    assert int(rec.mask.sum()) == 4 and (rec.values[~rec.mask] == 0).all()
    # 0 is no rounding; a quantum coarser than the stay puts everything at t = 0.
    (same,) = load_physionet(tmp_path / "5.txt", quantization=0)
    assert torch.equal(same.times, raw.times) and torch.equal(same.values, raw.values)
    (one,) = load_physionet(tmp_path / "5.txt", quantization=48)
    assert one.times.tolist() == [0.0] and one.values[0, V["HR"]].item() == pytest.approx(79.2)


@pytest.mark.parametrize("bad", [-0.1, math.nan, math.inf, -math.inf])
def test_quantization_must_be_finite_and_non_negative(tmp_path, bad):
    (tmp_path / "5.txt").write_text(patient(5, ["00:01,HR,70"]))
    with pytest.raises(ValueError, match="quantization"):
        load_physionet(tmp_path / "5.txt", quantization=bad)


@pytest.mark.parametrize("bad", ["0.1", True, None])
def test_quantization_must_be_a_number(tmp_path, bad):
    (tmp_path / "5.txt").write_text(patient(5, ["00:01,HR,70"]))
    with pytest.raises(TypeError, match="quantization"):
        load_physionet(tmp_path / "5.txt", quantization=bad)


def test_fast_and_checked_parsers_agree_including_crlf():
    text = patient(3, ["00:07,HR,70", "00:07,HR,72", "01:00,Weight,70", "12:59,Temp,37.5"], weight="71")
    for variant in (text, text.replace("\n", "\r\n")):
        fast = physionet_module._parse_lines_fast(variant)
        checked = physionet_module._parse_lines_checked(variant, "x")
        assert fast is not None and fast[0] == checked[0]
        for a, b in zip(fast[1:], checked[1:]):
            np.testing.assert_array_equal(a, b)


def test_spaces_around_fields_are_tolerated(tmp_path):
    (record,) = load_physionet(_single(tmp_path, patient(4, ["00:07, HR , 73 "])))
    assert record.values[0, V["HR"]].item() == 73.0


def test_descriptors_only_gives_empty_series(tmp_path):
    (tmp_path / "1.txt").write_text(patient(1))
    (record,) = load_physionet(tmp_path / "1.txt")
    assert record.times.shape == (0,) and record.values.shape == (0, 37)


def test_directory_tar_and_max_records(tmp_path):
    files = {f"set-x/{i}.txt": patient(i, [f"0{i}:00,HR,{60 + i}"]) for i in (3, 1, 2)}
    for mode, name in (("w:gz", "s.tar.gz"), ("w", "s.tar")):
        tar = write_tar(tmp_path / name, files, mode)
        records = load_physionet(tar)
        assert [r.record_id for r in records] == [3, 1, 2]  # archive order
        assert [r.record_id for r in load_physionet(tar, max_records=2)] == [3, 1]
    directory = tmp_path / "set-x"
    directory.mkdir()
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    (directory / "notes.md").write_text("ignored")
    assert [r.record_id for r in load_physionet(directory)] == [1, 2, 3]  # sorted file names
    assert [r.record_id for r in load_physionet(str(directory), max_records=1)] == [1]


def test_outcomes(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "5.txt").write_text(patient(5, ["01:00,HR,80"]))
    (tmp_path / "o.txt").write_text("RecordID,SAPS-I,SOFA,Length_of_stay,Survival,In-hospital_death\n5,1,2,3,-1,1\n")
    (record,) = load_physionet(tmp_path / "d", outcomes_path=tmp_path / "o.txt")
    assert record.label == 1
    assert load_physionet_outcomes(tmp_path / "o.txt") == {5: 1}


# --------------------------------------------------------------------------- errors


def _single(tmp_path, text) -> Path:
    path = tmp_path / "p.txt"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    "text, message",
    [
        ("RecordID,1\n", r"first line is 'RecordID,1', expected the header 'Time,Parameter,Value'"),
        (patient(1, ["01:00,HR"]), r"line 8: '01:00,HR' has 2 comma-separated fields, expected 3"),
        (patient(1, ["1:75,HR,3"]), r"line 8: time '1:75' is not HH:MM"),
        (patient(1, ["0100,HR,3"]), r"line 8: time '0100' is not HH:MM"),
        (patient(1, ["01:00,HeartRate,3"]), r"line 8: unknown parameter 'HeartRate'"),
        (patient(1, ["01:00,HR,abc"]), r"line 8: value 'abc' of HR is not a finite number"),
        (patient(1, ["01:00,Age,50"]), r"line 8: descriptor Age appears again \(or not at 00:00\)"),
        (patient(1, extra_descr=["00:00,ICUType,2"]), r"line 8: descriptor ICUType appears again"),
        ("Time,Parameter,Value\n00:00,Age,3\n", r"no '00:00,RecordID,<id>' line"),
    ],
)
def test_malformed_patient_files(tmp_path, text, message):
    with pytest.raises(ValueError, match=message):
        load_physionet(_single(tmp_path, text))


def test_path_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"does not exist; put a PhysioNet 2012 set \(set-a\.tar\.gz"):
        load_physionet(tmp_path / "set-a.tar.gz")
    with pytest.raises(FileNotFoundError, match=r"holds no \*\.txt patient files"):
        load_physionet(tmp_path)
    write_tar(tmp_path / "e.tar.gz", {"readme.md": "x"})
    with pytest.raises(ValueError, match=r"is an archive without \*\.txt patient files"):
        load_physionet(tmp_path / "e.tar.gz")
    with pytest.raises(ValueError, match="max_records must be at least 1"):
        load_physionet(tmp_path, max_records=0)
    with pytest.raises(TypeError, match="max_records must be an int or None"):
        load_physionet(tmp_path, max_records=2.0)  # type: ignore[arg-type]


def test_outcome_errors(tmp_path):
    path = _single(tmp_path, patient(9, ["01:00,HR,80"]))
    out = tmp_path / "o.txt"
    with pytest.raises(FileNotFoundError, match=r"outcomes_path=.*put the outcomes file \(e\.g\. Outcomes-a\.txt\)"):
        load_physionet(path, outcomes_path=out)
    out.write_text("RecordID,In-hospital_death\n5,0\n")
    with pytest.raises(ValueError, match="RecordID 9 has no row in outcomes_path"):
        load_physionet(path, outcomes_path=out)
    out.write_text("RecordID,Survival\n9,0\n")
    with pytest.raises(ValueError, match="lacks 'RecordID' or 'In-hospital_death'"):
        load_physionet(path, outcomes_path=out)
    out.write_text("RecordID,In-hospital_death\n9,2\n")
    with pytest.raises(ValueError, match="line 2: In-hospital_death is 2, expected 0 or 1"):
        load_physionet(path, outcomes_path=out)
    out.write_text("RecordID,In-hospital_death\n9\n")
    with pytest.raises(ValueError, match="line 2: '9' does not have an integer RecordID"):
        load_physionet(path, outcomes_path=out)


# --------------------------------------------------------------------------- normalisation, collate


def _records(tmp_path):
    texts = [
        patient(1, ["00:30,HR,60", "01:00,HR,100", "01:00,MechVent,1", "02:00,Temp,36"], age="50"),
        patient(2, ["00:30,HR,80", "03:00,MechVent,1"]),
        patient(3, ["01:00,HR,90", "04:00,Temp,38"]),
    ]
    out = []
    for text in texts:
        out += load_physionet(_single(tmp_path, text))
    return out


def test_normalizer_minmax_and_standard(tmp_path):
    train = _records(tmp_path)[:2]
    norm = PhysioNetNormalizer.fit(train)  # minmax
    assert norm.offset[V["HR"]].item() == 60.0 and norm.scale[V["HR"]].item() == 40.0
    assert norm.scale[V["MechVent"]].item() == 1.0  # constant: no division by zero
    assert norm.offset[V["pH"]].item() == 0.0 and norm.scale[V["pH"]].item() == 1.0  # never seen
    out = norm(train[0])
    assert out.values[out.mask[:, V["HR"]], V["HR"]].tolist() == [0.0, 1.0]
    assert (out.values[~out.mask] == 0).all() and torch.equal(out.mask, train[0].mask)
    # numpy rather than torch.testing: the latter imports sympy, which costs seconds.
    np.testing.assert_allclose(norm.inverse(out.values)[out.mask].numpy(), train[0].values[out.mask].numpy(), rtol=1e-6)
    std = PhysioNetNormalizer.fit(train, method="standard")
    hr = std.apply(train)
    hr_values = torch.cat([r.values[r.mask[:, V["HR"]], V["HR"]] for r in hr])
    assert abs(hr_values.mean().item()) < 1e-6 and abs(hr_values.pow(2).mean().item() - 1) < 1e-5
    with pytest.raises(ValueError, match="method must be 'minmax' or 'standard'"):
        PhysioNetNormalizer.fit(train, method="zscore")
    with pytest.raises(ValueError, match="records is empty; fit the normaliser"):
        PhysioNetNormalizer.fit([])


def test_collate_union_and_pad(tmp_path):
    records = _records(tmp_path)
    union = collate_physionet(records)
    assert union.times.tolist() == [0.5, 1.0, 2.0, 3.0, 4.0]
    assert union.values.shape == union.mask.shape == (3, 5, 37)
    assert union.values[0, 1, V["HR"]].item() == 100.0 and union.values[2, 1, V["HR"]].item() == 90.0
    assert union.time_mask.tolist() == [[1, 1, 1, 0, 0], [1, 0, 0, 1, 0], [0, 1, 0, 0, 1]]
    assert union.lengths.tolist() == [3, 2, 2] and union.record_ids.tolist() == [1, 2, 3]
    assert union.static.shape == (3, 5) and union.static[0, S["Age"]].item() == 50.0
    assert union.labels is None
    pad = collate_physionet(records, grid="pad")
    assert pad.times.shape == (3, 3)
    assert pad.times[1].tolist() == [0.5, 3.0, 3.0]  # padded with the last time
    assert pad.time_mask[1].tolist() == [True, True, False]
    assert pad.values[2, 1, V["Temp"]].item() == 38.0
    with pytest.raises(ValueError, match="grid must be 'union' or 'pad'"):
        collate_physionet(records, grid="ragged")
    with pytest.raises(ValueError, match="records is empty; a batch needs"):
        collate_physionet([])


# --------------------------------------------------------------------------- real data


def _raw_texts(archive: Path, count: int) -> dict[str, list[str]]:
    """Lines of the first ``count`` patient files, read independently of the loader."""
    out = {}
    with tarfile.open(archive, "r|gz") as tar:  # stream: stop after `count` files
        for member in tar:
            if member.isfile():
                out[member.name] = tar.extractfile(member).read().decode().splitlines()  # type: ignore[union-attr]
                if len(out) == count:
                    break
    return out


def test_real_set_a_first_records_against_raw_text():
    archive = shared("physionet2012", "set-a.tar.gz")
    outcomes = shared("physionet2012", "Outcomes-a.txt")
    records = load_physionet(archive, outcomes_path=outcomes, max_records=3)
    assert [r.record_id for r in records] == [132539, 132540, 132541]
    assert [r.label for r in records] == [0, 0, 0]
    first, second, third = records
    raws = _raw_texts(archive, 3)

    # Entries read by eye from set-a/132539.txt.
    raw = raws["set-a/132539.txt"]
    assert raw[1:7] == ["00:00,RecordID,132539", "00:00,Age,54", "00:00,Gender,0", "00:00,Height,-1",
                        "00:00,ICUType,4", "00:00,Weight,-1"]  # fmt: skip
    assert "00:07,NIMAP,92.33" in raw and "27:37,Urine,400" in raw and "27:37,Urine,0" in raw
    assert first.static[S["Age"]].item() == 54 and first.static[S["Gender"]].item() == 0
    assert torch.isnan(first.static[S["Height"]]) and torch.isnan(first.static[S["Weight"]])
    assert first.static[S["ICUType"]].item() == 4
    assert first.times[0].item() == pytest.approx(7 / 60)
    assert first.values[0, V["NIMAP"]].item() == pytest.approx(92.33)
    assert first.values[0, V["Urine"]].item() == 900.0 and first.values[0, V["GCS"]].item() == 15.0
    t = int(torch.nonzero(torch.isclose(first.times, torch.tensor(27 + 37 / 60, dtype=torch.float64))))
    assert first.values[t, V["Urine"]].item() == 200.0  # mean of 400 and 0
    assert first.values[t, V["HR"]].item() == 80.0
    assert not first.mask[:, V["Weight"]].any()  # only the -1 descriptor, no series
    assert bool(first.mask[0, V["HR"]]) and first.values[0, V["HR"]].item() == 73.0

    # set-a/132540.txt: admission weight 76 is static; the series starts at 00:42 with pH.
    raw = raws["set-a/132540.txt"]
    assert "00:00,Weight,76" in raw and "00:42,pH,7.45" in raw and "19:11,Weight,80.6" in raw
    assert second.static.tolist()[:4] == [76.0, 1.0, pytest.approx(175.3), 2.0]
    assert second.static[S["Weight"]].item() == 76.0
    assert second.times[0].item() == pytest.approx(0.7)
    assert second.mask[0].nonzero().flatten().tolist() == sorted([V["pH"], V["PaCO2"], V["PaO2"]])
    assert second.values[0, V["pH"]].item() == pytest.approx(7.45)
    t = int(torch.nonzero(torch.isclose(second.times, torch.tensor(19 + 11 / 60, dtype=torch.float64))))
    assert second.values[t, V["Weight"]].item() == pytest.approx(80.6)

    # Independent check of a whole file: every series line of 132541 lands where it should.
    raw = raws["set-a/132541.txt"][1:]
    seen: dict[tuple[int, str], list[float]] = {}
    descriptor_weight_skipped = False
    for line in raw:
        stamp, name, value = line.split(",")
        if name in ("RecordID", "Age", "Gender", "Height", "ICUType"):
            continue
        if name == "Weight" and stamp == "00:00" and not descriptor_weight_skipped:
            descriptor_weight_skipped = True
            continue
        h, m = stamp.split(":")
        seen.setdefault((int(h) * 60 + int(m), name), []).append(float(value))
    assert int(third.mask.sum()) == len(seen)
    minutes = torch.round(third.times * 60).long().tolist()
    for (minute, name), vals in seen.items():
        assert third.values[minutes.index(minute), V[name]].item() == pytest.approx(sum(vals) / len(vals), rel=1e-6)
    assert third.static[S["Weight"]].item() == pytest.approx(56.7)
    assert math.isnan(third.static[S["Height"]].item())


def test_real_set_a_quantized_against_raw_text():
    # set-a/132539.txt (see above) with 2-hour bins: 00:07 and 00:37 -> 0 h; 01:37 and 02:37 -> 2 h;
    # 03:08, 03:37 and 04:37 -> 4 h. Values read by eye from the file.
    archive = shared("physionet2012", "set-a.tar.gz")
    (raw,) = load_physionet(archive, max_records=1)
    (rec,) = load_physionet(archive, max_records=1, quantization=2)
    lines = _raw_texts(archive, 1)["set-a/132539.txt"]
    assert {"00:07,HR,73", "00:37,HR,77", "00:07,Urine,900", "00:37,Urine,60", "00:07,NIMAP,92.33",
            "00:37,NIMAP,91", "01:37,HR,60", "02:37,HR,62", "03:08,HCT,33.7", "03:37,HR,80",
            "04:37,HR,74", "00:07,GCS,15"} <= set(lines)  # fmt: skip
    assert rec.times[:3].tolist() == [0.0, 2.0, 4.0]
    assert rec.values[0, V["HR"]].item() == 75.0 and rec.values[0, V["Urine"]].item() == 480.0
    assert rec.values[0, V["NIMAP"]].item() == pytest.approx((92.33 + 91) / 2)
    assert rec.values[0, V["GCS"]].item() == 15.0  # one observation: kept as is
    assert rec.values[1, V["HR"]].item() == 61.0 and rec.values[2, V["HR"]].item() == 77.0
    assert bool(rec.mask[2, V["HCT"]]) and rec.values[2, V["HCT"]].item() == pytest.approx(33.7)
    assert not rec.mask[1, V["HCT"]]
    # Every bin holds exactly the variables observed in its raw times, and times are multiples of 2.
    bins = torch.round(raw.times / 2).long()
    assert rec.times.tolist() == (torch.unique(bins) * 2.0).tolist()
    for i, k in enumerate(torch.unique(bins).tolist()):
        assert torch.equal(rec.mask[i], raw.mask[bins == k].any(0))
    assert torch.allclose(rec.static, raw.static, equal_nan=True)


def test_real_outcomes_death_count():
    outcomes = load_physionet_outcomes(shared("physionet2012", "Outcomes-a.txt"))
    assert len(outcomes) == 4000 and sum(outcomes.values()) == 554


def test_a_relative_data_path_names_an_extracted_directory_under_data_dir(tmp_path, monkeypatch):
    """QA D10: data_path=set-a (relative, not found from the working directory) is looked up in data_dir,
    as an archive or an extracted directory."""
    from neuralode.experiments.physionet import PhysioNet, PhysioNetConfig

    (tmp_path / "data" / "set-a").mkdir(parents=True)
    for i in range(1, 6):
        (tmp_path / "data" / "set-a" / f"{i}.txt").write_text(patient(i, [f"0{i}:00,HR,{60 + i}"]))
    monkeypatch.chdir(tmp_path)  # "set-a" is not a path from here
    config = PhysioNet.resolve(PhysioNetConfig(data_dir=str(tmp_path / "data"), data_path=("set-a",)))
    assert config.data_path == (str((tmp_path / "data" / "set-a").resolve()),)
    assert len(load_physionet(config.data_path[0])) == 5
