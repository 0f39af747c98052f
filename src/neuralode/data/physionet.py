"""PhysioNet/CinC Challenge 2012: irregularly sampled ICU time series (set A, B or C).

Each patient file (``set-a/132539.txt``) starts with the header ``Time,Parameter,Value``; each
further line is one observation, ``HH:MM`` since ICU admission (first 48 hours), the parameter
name and its value. Six general descriptors are recorded at ``00:00``: RecordID, Age, Gender
(0 female, 1 male), Height (cm), ICUType (1 coronary care, 2 cardiac surgery recovery,
3 medical, 4 surgical) and Weight (kg); ``-1`` means missing. The other 37 parameters are the time
series in :data:`PHYSIONET_VARIABLES`. ``Outcomes-a.txt`` holds one row per patient with
``RecordID,SAPS-I,SOFA,Length_of_stay,Survival,In-hospital_death``.

This is the benchmark of the latent-ODE / ODE-RNN literature (Rubanova, Chen & Duvenaud 2019,
"Latent ODEs for Irregularly-Sampled Time Series"). Our choices follow theirs where they made one
(variable order, averaging of same-time duplicates, optional rounding of times to a
``quantization`` step, union time grid) so numbers are comparable; where we deviate it is said
below. One deviation: our ``"minmax"`` normalisation is ``(x - min) / (max - min)``, theirs is
``(x - min) / max``.
"""

from __future__ import annotations

import math
import numbers
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from ._io import DAMAGED_ARCHIVE_ERRORS, PathLike, as_path, damaged_file_error, require_file

__all__ = [
    "PHYSIONET_STATIC",
    "PHYSIONET_VARIABLES",
    "PhysioNetBatch",
    "PhysioNetNormalizer",
    "PhysioNetRecord",
    "collate_physionet",
    "load_physionet",
    "load_physionet_outcomes",
]

#: The 37 time-series variables, in the order of the last axis of ``values`` and ``mask``.
#: Checked against every file of set A: exactly these 37 names occur besides the descriptors.
PHYSIONET_VARIABLES = (
    "Albumin", "ALP", "ALT", "AST", "Bilirubin", "BUN", "Cholesterol", "Creatinine", "DiasABP",
    "FiO2", "GCS", "Glucose", "HCO3", "HCT", "HR", "K", "Lactate", "Mg", "MAP", "MechVent", "Na",
    "NIDiasABP", "NIMAP", "NISysABP", "PaCO2", "PaO2", "pH", "Platelets", "RespRate", "SaO2",
    "SysABP", "Temp", "TroponinI", "TroponinT", "Urine", "WBC", "Weight",
)  # fmt: skip

#: The static descriptors kept in ``PhysioNetRecord.static``, in order (RecordID is separate).
PHYSIONET_STATIC = ("Age", "Gender", "Height", "ICUType", "Weight")

_VARIABLE_INDEX = {name: i for i, name in enumerate(PHYSIONET_VARIABLES)}
_DESCRIPTORS = ("RecordID",) + PHYSIONET_STATIC
_HEADER = "Time,Parameter,Value"
# Codes for the fast parser: variables are 0..36, descriptors negative, Weight is both.
_DESCRIPTOR_CODE = {"RecordID": -1, "Age": -2, "Gender": -3, "Height": -4, "ICUType": -5,
                    "Weight": _VARIABLE_INDEX["Weight"]}  # fmt: skip
_CODES = {**_VARIABLE_INDEX, **_DESCRIPTOR_CODE}


@dataclass(frozen=True)
class PhysioNetRecord:
    """One ICU stay as an irregular multivariate time series.

    Attributes
    ----------
    record_id : int
        The patient's RecordID.
    times : torch.Tensor
        float64, shape ``(T,)``: sorted unique observation times in hours since admission
        (``HH:MM`` -> ``HH + MM / 60``, or its nearest multiple of ``quantization`` hours when
        :func:`load_physionet` rounds). ``T`` may be 0 (a few patients have descriptors only).
    values : torch.Tensor
        float32, shape ``(T, 37)``: the observed value of each variable of
        :data:`PHYSIONET_VARIABLES` at each time, ``0`` where not observed.
    mask : torch.Tensor
        bool, shape ``(T, 37)``: True where ``values`` holds an observation. Every row has at
        least one True.
    static : torch.Tensor
        float32, shape ``(5,)``: Age, Gender, Height, ICUType, Weight at admission
        (:data:`PHYSIONET_STATIC`), NaN where the file says ``-1`` or has no line.
    label : int or None
        In-hospital death (1) or survival (0) from the outcomes file, None without one.
    """

    record_id: int
    times: torch.Tensor
    values: torch.Tensor
    mask: torch.Tensor
    static: torch.Tensor
    label: int | None = None


def _parse_minutes(stamp: str) -> int:
    hours, sep, minutes = stamp.partition(":")
    if not sep:
        raise ValueError
    h, m = int(hours), int(minutes)
    if h < 0 or not 0 <= m < 60:
        raise ValueError
    return 60 * h + m


def _parse_lines_checked(text: str, source: str) -> tuple[dict[str, float], np.ndarray, np.ndarray, np.ndarray]:
    """Line-by-line parser that checks everything and names the offending line.

    Returns the descriptors and the (minute, variable index, value) triples of the series.
    It is the reference semantics; :func:`_parse_lines_fast` must agree with it and falls back
    to it whenever anything looks unusual, so errors always come from here.
    """
    lines = text.splitlines()
    if not lines or lines[0].strip() != _HEADER:
        first = lines[0].strip() if lines else ""
        raise ValueError(
            f"{source}: first line is {first!r}, expected the header {_HEADER!r}; is this a "
            "PhysioNet 2012 patient file?"
        )
    descriptors: dict[str, float] = {}
    minutes: list[int] = []
    variables: list[int] = []
    observed: list[float] = []
    for lineno, line in enumerate(lines[1:], start=2):
        line = line.strip()
        if not line:
            continue
        parts = line.split(",")
        if len(parts) != 3:
            raise ValueError(
                f"{source}, line {lineno}: {line!r} has {len(parts)} comma-separated fields, "
                "expected 3 (Time,Parameter,Value)"
            )
        stamp, name, text_value = (part.strip() for part in parts)
        try:
            minute = _parse_minutes(stamp)
        except ValueError:
            raise ValueError(
                f"{source}, line {lineno}: time {stamp!r} is not HH:MM since admission"
            ) from None
        try:
            value = float(text_value)
        except ValueError:
            value = math.nan
        if not math.isfinite(value):
            raise ValueError(
                f"{source}, line {lineno}: value {text_value!r} of {name} is not a finite number"
            )
        # Weight is both a descriptor (the 00:00 line, admission weight) and a time series
        # (later measurements, and very rarely a second 00:00 line). The first 00:00 Weight line
        # goes to `static` only: putting it in the series as well would make every patient look
        # weighed at t=0, and its -1 "missing" marker would become a fake observation (a bug in
        # some published preprocessing). Any further Weight line is a time-series observation.
        if name in _DESCRIPTORS and minute == 0 and name not in descriptors:
            descriptors[name] = value
            continue
        index = _VARIABLE_INDEX.get(name)
        if index is None:
            if name in _DESCRIPTORS:
                raise ValueError(
                    f"{source}, line {lineno}: descriptor {name} appears again (or not at "
                    "00:00); each file must record it once, at 00:00"
                )
            raise ValueError(
                f"{source}, line {lineno}: unknown parameter {name!r}; expected one of the "
                f"descriptors {_DESCRIPTORS} or the 37 variables in PHYSIONET_VARIABLES"
            )
        minutes.append(minute)
        variables.append(index)
        observed.append(value)

    return (
        descriptors,
        np.asarray(minutes, dtype=np.int64),
        np.asarray(variables, dtype=np.int64),
        np.asarray(observed, dtype=np.float64),
    )


def _parse_lines_fast(text: str) -> tuple[dict[str, float], np.ndarray, np.ndarray, np.ndarray] | None:
    """Vectorised parser for well-formed files; None if anything needs the checked parser.

    A per-line Python loop costs ~3 ms per patient (~12 s per set of 4,000); one flat
    ``str.split`` of the whole file and column-wise numpy conversion is several times faster.
    """
    if "\r" in text:
        text = text.replace("\r", "")
    head, _, body = text.partition("\n")
    if head.strip() != _HEADER:
        return None
    # One flat split of the whole body: `HH:MM,Name,Value` becomes four fields per line. A
    # malformed line (blank, extra comma, colon in a name) shifts the fields, which the checks
    # below catch as non-integer hours or unknown names, and the checked parser then reports.
    fields = body.rstrip("\n").replace(":", ",").replace("\n", ",").split(",")
    if len(fields) % 4 or not body.strip():
        return None
    names = fields[2::4]
    try:
        hours = np.array(fields[0::4], dtype=np.int64)
        mins = np.array(fields[1::4], dtype=np.int64)
        values = np.array(fields[3::4], dtype=np.float64)
    except ValueError:
        return None
    if (hours < 0).any() or (mins < 0).any() or (mins >= 60).any() or not np.isfinite(values).all():
        return None
    minutes = 60 * hours + mins
    code_list = list(map(_CODES.get, names))  # map() over a bound method beats a listcomp here
    if None in code_list:
        return None
    codes = np.array(code_list, dtype=np.int64)
    descriptors: dict[str, float] = {}
    keep = np.ones(codes.size, dtype=bool)
    for name in _DESCRIPTORS:
        code = _DESCRIPTOR_CODE[name]
        rows_of = np.flatnonzero(codes == code)
        if name == "Weight":
            # Same rule as the checked parser: the first 00:00 line is the descriptor.
            rows_of = rows_of[minutes[rows_of] == 0][:1]
        elif rows_of.size > 1 or (rows_of.size == 1 and minutes[rows_of[0]] != 0):
            return None
        if rows_of.size:
            descriptors[name] = float(values[rows_of[0]])
            keep[rows_of[0]] = False
    series = keep & (codes >= 0)
    return descriptors, minutes[series], codes[series], values[series]


def _parse_record(text: str, source: str, quantization: float = 0.0) -> PhysioNetRecord:
    """Parse the text of one patient file; ``source`` names it in error messages.

    ``quantization`` (hours, 0 = off) is checked by :func:`load_physionet`.
    """
    parsed = _parse_lines_fast(text)
    if parsed is None:
        parsed = _parse_lines_checked(text, source)
    descriptors, minutes, variables, observed = parsed
    if "RecordID" not in descriptors:
        raise ValueError(f"{source}: no '00:00,RecordID,<id>' line; every patient file needs one")
    record_id = int(descriptors["RecordID"])
    static = torch.tensor(
        [descriptors.get(name, -1.0) for name in PHYSIONET_STATIC], dtype=torch.float32
    )
    static = torch.where(static == -1.0, torch.full_like(static, math.nan), static)

    n_vars = len(PHYSIONET_VARIABLES)
    if minutes.size:
        if quantization:
            # Rubanova et al. round each time to the nearest multiple of `quantization` hours
            # (Python's round: halves go to the even multiple, as np.round does). Binning on the
            # integer multiple, not on the rounded float, keeps equal bins equal.
            key = np.round(minutes / 60.0 / quantization).astype(np.int64)
        else:
            key = minutes
        unique, row = np.unique(key, return_inverse=True)
        flat = row.reshape(-1) * n_vars + variables
        size = unique.size * n_vars
        # Several values of one variable at the same (rounded) time (mostly Urine, occasionally
        # others; many more with quantization) are averaged, as Rubanova et al. do. Summing would
        # suit Urine (an output volume) but not the other variables, and one rule for all keeps
        # the loader predictable. The mean is over the raw lines, so a bin holding two lines of one
        # minute and one of the next weighs all three equally (Rubanova's running mean does too).
        sums = np.bincount(flat, weights=observed, minlength=size).reshape(unique.size, n_vars)
        counts = np.bincount(flat, minlength=size).reshape(unique.size, n_vars)
        values = np.divide(sums, counts, out=np.zeros_like(sums), where=counts > 0)
        times = torch.from_numpy(unique * quantization if quantization else unique / 60.0)
        values_t = torch.from_numpy(values.astype(np.float32))
        mask = torch.from_numpy(counts > 0)
    else:
        times = torch.zeros(0, dtype=torch.float64)
        values_t = torch.zeros(0, n_vars, dtype=torch.float32)
        mask = torch.zeros(0, n_vars, dtype=torch.bool)
    return PhysioNetRecord(record_id, times, values_t, mask, static)


def _iter_texts(path: Path, max_records: int | None) -> Iterator[tuple[str, str]]:
    """Yield (source name, text) of the patient files at ``path``: archive, directory or file."""
    count = 0
    if path.is_dir():
        files = sorted(path.glob("*.txt"))
        if not files:
            raise FileNotFoundError(
                f"path={str(path)!r} holds no *.txt patient files; pass the extracted set "
                "directory (e.g. set-a/) or the archive set-a.tar.gz itself"
            )
        for file in files:
            if max_records is not None and count >= max_records:
                return
            yield str(file), file.read_text()
            count += 1
        return
    require_file(path, "path", "a PhysioNet 2012 set (set-a.tar.gz or the extracted set-a/ directory)")
    if not tarfile.is_tarfile(path):
        # A single patient file.
        yield str(path), path.read_text()
        return
    # Members are read in archive order (sorted by RecordID in the official archives) without
    # listing the whole archive first, so max_records=3 touches only the start of the stream.
    try:
        with tarfile.open(path, "r:*") as archive:
            for member in archive:
                if not (member.isfile() and member.name.endswith(".txt")):
                    continue
                if max_records is not None and count >= max_records:
                    return
                handle = archive.extractfile(member)
                assert handle is not None  # isfile() guarantees a handle
                text = handle.read().decode()
                yield f"{path}:{member.name}", text
                count += 1
    except DAMAGED_ARCHIVE_ERRORS as exc:
        raise damaged_file_error(path, exc) from exc
    if count == 0:
        raise ValueError(
            f"path={str(path)!r} is an archive without *.txt patient files; expected set-a.tar.gz "
            "(or set-b / set-c) from the PhysioNet 2012 challenge"
        )


def load_physionet_outcomes(path: PathLike) -> dict[int, int]:
    """Read ``Outcomes-a.txt``: RecordID -> in-hospital death (0/1).

    Parameters
    ----------
    path : str or os.PathLike
        CSV with a header containing ``RecordID`` and ``In-hospital_death``.

    Returns
    -------
    dict of int to int

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    ValueError
        If a column is missing, a row is malformed, or a label is not 0 or 1.
    """
    path = as_path(path, "outcomes_path")
    require_file(path, "outcomes_path", "the outcomes file (e.g. Outcomes-a.txt)")
    lines = path.read_text().splitlines()
    header = lines[0].strip().split(",") if lines else []
    if "RecordID" not in header or "In-hospital_death" not in header:
        raise ValueError(
            f"outcomes_path={str(path)!r}: header {header} lacks 'RecordID' or "
            "'In-hospital_death'; pass the challenge's Outcomes-<set>.txt"
        )
    i_id, i_label = header.index("RecordID"), header.index("In-hospital_death")
    outcomes = {}
    for lineno, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        fields = line.strip().split(",")
        try:
            record_id, label = int(fields[i_id]), int(fields[i_label])
        except (ValueError, IndexError):
            raise ValueError(
                f"outcomes_path={str(path)!r}, line {lineno}: {line.strip()!r} does not have an "
                f"integer RecordID and In-hospital_death in columns {i_id + 1} and {i_label + 1}"
            ) from None
        if label not in (0, 1):
            raise ValueError(
                f"outcomes_path={str(path)!r}, line {lineno}: In-hospital_death is {label}, "
                "expected 0 or 1"
            )
        outcomes[record_id] = label
    return outcomes


def load_physionet(
    path: PathLike,
    outcomes_path: PathLike | None = None,
    max_records: int | None = None,
    quantization: float = 0.0,
) -> list[PhysioNetRecord]:
    """Load PhysioNet 2012 patients as irregular multivariate time series.

    Parameters
    ----------
    path : str or os.PathLike
        ``set-a.tar.gz`` (any tar compression), the extracted directory of ``<RecordID>.txt``
        files, or one patient file.
    outcomes_path : str or os.PathLike, optional
        ``Outcomes-a.txt``; fills ``label`` with In-hospital_death. Every loaded patient must have
        a row.
    max_records : int, optional
        Read at most this many patients (archive order, or sorted file names for a directory).
    quantization : float, default 0
        Round every observation time to the nearest multiple of this many hours (0: keep the
        minute resolution of the files). Values of one variable that land on the same rounded
        time are averaged and its mask is set there. Rubanova et al. (2019) use 0.1 h (6 min) and
        0.016 h (about 1 min); coarser times make shorter union grids and faster epochs.

    Returns
    -------
    list of PhysioNetRecord
        One per patient; see :class:`PhysioNetRecord` for shapes. Values are raw (not
        normalised); use :class:`PhysioNetNormalizer` and :func:`collate_physionet`.

    Raises
    ------
    FileNotFoundError
        If ``path`` or ``outcomes_path`` does not exist, or a directory holds no ``*.txt``.
    ValueError
        If a patient file is malformed (the message names the file and line), a parameter name is
        unknown, ``max_records`` is not positive, ``quantization`` is negative or not finite, or a
        patient has no outcome row.
    TypeError
        If ``max_records`` is not an int or ``quantization`` is not a real number.

    Notes
    -----
    Values are not cleaned: the raw files contain physiologically impossible entries (e.g.
    ``Temp`` of -17.8, ``Weight`` of 0, pH given in the wrong unit) which are kept as recorded.
    Reading all 4,000 patients of one set takes 5-8 s on a 2-core CPU machine; use
    ``max_records`` for quick looks and tests.
    """
    path = as_path(path, "path")
    if max_records is not None:
        if isinstance(max_records, bool) or not isinstance(max_records, int):
            raise TypeError(f"max_records must be an int or None, got {type(max_records).__name__}")
        if max_records < 1:
            raise ValueError(f"max_records must be at least 1 (or None for all), got {max_records}")
    if isinstance(quantization, bool) or not isinstance(quantization, numbers.Real):
        raise TypeError(f"quantization must be a number of hours (0 for none), got {type(quantization).__name__}")
    if not math.isfinite(quantization) or quantization < 0:
        raise ValueError(f"quantization must be a finite number of hours >= 0 (0: no rounding), got {quantization}")
    quantization = float(quantization)
    outcomes = None if outcomes_path is None else load_physionet_outcomes(outcomes_path)
    records = []
    for source, text in _iter_texts(path, max_records):
        record = _parse_record(text, source, quantization)
        if outcomes is not None:
            if record.record_id not in outcomes:
                raise ValueError(
                    f"{source}: RecordID {record.record_id} has no row in outcomes_path="
                    f"{str(outcomes_path)!r}; pass the outcomes file of the same set"
                )
            record = replace(record, label=outcomes[record.record_id])
        records.append(record)
    return records


@dataclass(frozen=True)
class PhysioNetNormalizer:
    """Per-variable affine normalisation ``(x - offset) / scale`` of observed entries.

    Fit it on the training records only and apply it to every split, so no test statistics leak
    into training. Unobserved entries stay 0 and ``mask`` is unchanged. The static descriptors
    are not touched.

    Attributes
    ----------
    offset : torch.Tensor
        float32, shape ``(37,)``: per-variable minimum (``"minmax"``) or mean (``"standard"``).
    scale : torch.Tensor
        float32, shape ``(37,)``: per-variable ``max - min`` or standard deviation; 1 for a
        variable never observed in the training records or with a single distinct value (e.g.
        MechVent, recorded only when on), so nothing is divided by zero.
    method : str
        ``"minmax"`` (maps training observations to [0, 1]; Rubanova et al. divide by ``max``
        rather than ``max - min``) or
        ``"standard"`` (zero mean, unit variance).
    """

    offset: torch.Tensor
    scale: torch.Tensor
    method: str

    @classmethod
    def fit(cls, records: Sequence[PhysioNetRecord], method: str = "minmax") -> PhysioNetNormalizer:
        """Compute the statistics over all observed entries of ``records``.

        Parameters
        ----------
        records : sequence of PhysioNetRecord
            The training records.
        method : {"minmax", "standard"}, default "minmax"

        Returns
        -------
        PhysioNetNormalizer

        Raises
        ------
        ValueError
            If ``method`` is unknown or ``records`` is empty.
        """
        if method not in ("minmax", "standard"):
            raise ValueError(f"method must be 'minmax' or 'standard', got {method!r}")
        if len(records) == 0:
            raise ValueError("records is empty; fit the normaliser on at least one training record")
        n_vars = len(PHYSIONET_VARIABLES)
        values = torch.cat([r.values for r in records]).to(torch.float64)
        mask = torch.cat([r.mask for r in records])
        count = mask.sum(0)
        if method == "minmax":
            if values.shape[0]:
                low = torch.where(mask, values, math.inf).amin(0)
                high = torch.where(mask, values, -math.inf).amax(0)
            else:  # only empty records: every variable is unseen and handled below
                low = high = torch.zeros(n_vars, dtype=torch.float64)
            offset, scale = low, high - low
        else:
            total = torch.where(mask, values, 0.0).sum(0)
            offset = total / count.clamp(min=1)
            centred = torch.where(mask, values - offset, 0.0)
            scale = (centred.square().sum(0) / count.clamp(min=1)).sqrt()
        unseen = count == 0
        offset = torch.where(unseen, 0.0, offset)
        scale = torch.where(unseen | (scale == 0), 1.0, scale)
        return cls(offset.to(torch.float32), scale.to(torch.float32), method)

    def __call__(self, record: PhysioNetRecord) -> PhysioNetRecord:
        """Normalise one record's observed values; returns a new record."""
        values = torch.where(record.mask, (record.values - self.offset) / self.scale, 0.0)
        return replace(record, values=values)

    def apply(self, records: Sequence[PhysioNetRecord]) -> list[PhysioNetRecord]:
        """Normalise every record of ``records``."""
        return [self(r) for r in records]

    def inverse(self, values: torch.Tensor) -> torch.Tensor:
        """Map normalised values, shape ``(..., 37)``, back to the original units."""
        return values * self.scale.to(values) + self.offset.to(values)


@dataclass(frozen=True)
class PhysioNetBatch:
    """Padded batch of PhysioNet records from :func:`collate_physionet`.

    Attributes
    ----------
    times : torch.Tensor
        float64. ``grid="union"``: shape ``(U,)``, the sorted union of all records' times, shared
        by the batch. ``grid="pad"``: shape ``(B, L)``, each record's own times, padded by
        repeating its last time (0 for an empty record) so rows stay non-decreasing.
    values : torch.Tensor
        float32, shape ``(B, U, 37)`` or ``(B, L, 37)``, 0 where not observed.
    mask : torch.Tensor
        bool, same shape as ``values``: True at observed entries.
    time_mask : torch.Tensor
        bool, shape ``(B, U)`` or ``(B, L)``: True where the record has any observation at that
        time (``mask.any(-1)``).
    lengths : torch.Tensor
        int64, shape ``(B,)``: number of observation times of each record.
    static : torch.Tensor
        float32, shape ``(B, 5)``: :data:`PHYSIONET_STATIC`, NaN where missing.
    labels : torch.Tensor or None
        int64, shape ``(B,)``: in-hospital death, or None if any record has no label.
    record_ids : torch.Tensor
        int64, shape ``(B,)``.
    """

    times: torch.Tensor
    values: torch.Tensor
    mask: torch.Tensor
    time_mask: torch.Tensor
    lengths: torch.Tensor
    static: torch.Tensor
    labels: torch.Tensor | None
    record_ids: torch.Tensor


def collate_physionet(records: Sequence[PhysioNetRecord], grid: str = "union") -> PhysioNetBatch:
    """Collate records into padded batch tensors (usable as a DataLoader ``collate_fn``).

    Parameters
    ----------
    records : sequence of PhysioNetRecord
        The batch, length ``B >= 1``.
    grid : {"union", "pad"}, default "union"
        ``"union"`` puts all records on one shared time grid, the union of their times (what a
        batched ODE solve over common output times needs; Rubanova et al. do this). ``"pad"``
        keeps each record's own times and pads to the longest (memory ``B * max T`` rather than
        ``B * U``, which matters for large batches since ``U`` grows with ``B``; suits
        per-sample solvers and RNNs).

    Returns
    -------
    PhysioNetBatch

    Raises
    ------
    ValueError
        If ``records`` is empty or ``grid`` is unknown.
    """
    if grid not in ("union", "pad"):
        raise ValueError(f"grid must be 'union' or 'pad', got {grid!r}")
    if len(records) == 0:
        raise ValueError("records is empty; a batch needs at least one PhysioNetRecord")
    n_vars = len(PHYSIONET_VARIABLES)
    batch = len(records)
    lengths = torch.tensor([r.times.shape[0] for r in records], dtype=torch.int64)
    if grid == "union":
        union, inverse = torch.unique(torch.cat([r.times for r in records]), return_inverse=True)
        width = union.shape[0]
        times = union
        columns = torch.split(inverse, lengths.tolist())
    else:
        width = int(lengths.max())
        times = torch.zeros(batch, width, dtype=torch.float64)
        columns = [torch.arange(n) for n in lengths.tolist()]
    values = torch.zeros(batch, width, n_vars, dtype=torch.float32)
    mask = torch.zeros(batch, width, n_vars, dtype=torch.bool)
    for b, (record, cols) in enumerate(zip(records, columns)):
        values[b, cols] = record.values
        mask[b, cols] = record.mask
        if grid == "pad" and record.times.shape[0]:
            times[b, : cols.shape[0]] = record.times
            times[b, cols.shape[0] :] = record.times[-1]
    labels = None
    if all(r.label is not None for r in records):
        labels = torch.tensor([r.label for r in records], dtype=torch.int64)
    return PhysioNetBatch(
        times=times,
        values=values,
        mask=mask,
        time_mask=mask.any(-1),
        lengths=lengths,
        static=torch.stack([r.static for r in records]),
        labels=labels,
        record_ids=torch.tensor([r.record_id for r in records], dtype=torch.int64),
    )
