"""MIT-BIH arrhythmia heartbeats in the Kaggle "heartbeat" CSV layout.

Each row of ``mitbih_train.csv`` / ``mitbih_test.csv`` (Kachuee et al. 2018, "ECG Heartbeat
Classification: A Deep Transferable Representation") holds 187 samples of one beat, resampled to
125 Hz, min-max scaled to [0, 1] and zero-padded, followed by the AAMI class as a 188th column:
0 = N (normal), 1 = S (supraventricular premature), 2 = V (premature ventricular),
3 = F (fusion), 4 = Q (unclassifiable). No header, comma separated, plain or gzipped.

The usual Kaggle split is *intra*-patient: beats of one patient are in both train and test, which
flatters accuracy. With a per-row record (patient) id file, :func:`inter_patient_split` builds
disjoint record sets instead (de Chazal et al. 2004 argue for this evaluation).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch

from ._io import PathLike, as_path, open_binary, require_file

__all__ = [
    "HEARTBEAT_CLASSES",
    "HEARTBEAT_LENGTH",
    "DE_CHAZAL_DS1",
    "DE_CHAZAL_DS2",
    "HeartbeatData",
    "load_heartbeat",
    "inter_patient_split",
]

#: Number of samples per beat in the Kaggle layout (the 188th column is the label).
HEARTBEAT_LENGTH = 187

#: AAMI class symbols in label order 0..4.
HEARTBEAT_CLASSES = ("N", "S", "V", "F", "Q")

#: de Chazal, O'Dwyer & Reilly (2004), IEEE TBME 51(7): the standard inter-patient split of the
#: 44 non-paced MIT-BIH records (paced records 102, 104, 107, 217 are excluded). DS1 trains,
#: DS2 tests. Pass ``test_records=DE_CHAZAL_DS2`` to :func:`inter_patient_split` to use it.
DE_CHAZAL_DS1 = (101, 106, 108, 109, 112, 114, 115, 116, 118, 119, 122,
                 124, 201, 203, 205, 207, 208, 209, 215, 220, 223, 230)  # fmt: skip
DE_CHAZAL_DS2 = (100, 103, 105, 111, 113, 117, 121, 123, 200, 202, 210,
                 212, 213, 214, 219, 221, 222, 228, 231, 232, 233, 234)  # fmt: skip


@dataclass(frozen=True)
class HeartbeatData:
    """Heartbeats with labels and, optionally, the record (patient) each beat came from.

    Attributes
    ----------
    x : torch.Tensor
        float32, shape ``(N, 1, 187)``: one channel per beat, ready for ``Conv1d``.
    y : torch.Tensor
        int64, shape ``(N,)``: AAMI class 0..4 (see :data:`HEARTBEAT_CLASSES`).
    records : torch.Tensor or None
        int64, shape ``(N,)``: MIT-BIH record number of each beat, or ``None`` when no record file
        was given.
    """

    x: torch.Tensor
    y: torch.Tensor
    records: Optional[torch.Tensor] = None

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def subset(self, index: torch.Tensor) -> "HeartbeatData":
        """Rows selected by ``index``.

        Parameters
        ----------
        index : torch.Tensor
            int64 indices of shape ``(M,)`` or a bool mask of shape ``(N,)``.

        Returns
        -------
        HeartbeatData
            With ``M`` rows (or as many as the mask selects).
        """
        records = None if self.records is None else self.records[index]
        return HeartbeatData(self.x[index], self.y[index], records)

    def class_counts(self) -> torch.Tensor:
        """Number of beats per class, int64 of shape ``(5,)``."""
        return torch.bincount(self.y, minlength=len(HEARTBEAT_CLASSES))


def _describe_bad_row(path, n_columns: int) -> str:
    """Find the first row that is not ``n_columns`` numbers; only runs after numpy has failed.

    numpy's own message counts rows inconsistently (1-based for a column-count change, 0-based
    for an unparsable token), so we rescan in Python, which is slow but only on the error path.
    """
    with open_binary(path) as fh:
        for lineno, raw in enumerate(fh, start=1):
            line = raw.strip()
            if not line:
                continue
            fields = line.split(b",")
            if len(fields) != n_columns:
                return (
                    f"row {lineno} has {len(fields)} comma-separated columns, expected "
                    f"{n_columns} ({HEARTBEAT_LENGTH} samples then the label)"
                )
            for col, field in enumerate(fields, start=1):
                try:
                    float(field)
                except ValueError:
                    return f"row {lineno}, column {col} is not a number: {field.decode(errors='replace')!r}"
    return "the file could not be parsed as comma-separated numbers"  # pragma: no cover


def _read_records(path, n_rows: int) -> torch.Tensor:
    text_lines = []
    with open_binary(path) as fh:
        for lineno, raw in enumerate(fh, start=1):
            line = raw.strip()
            if not line:
                # Only a trailing blank line is harmless; one in the middle would shift every
                # later id onto the wrong beat.
                text_lines.append(None)
                continue
            try:
                text_lines.append(int(line))
            except ValueError:
                raise ValueError(
                    f"records_path={str(path)!r}: line {lineno} is not an integer record id: "
                    f"{line.decode(errors='replace')!r}; the file needs one integer per line"
                ) from None
    while text_lines and text_lines[-1] is None:
        text_lines.pop()
    if None in text_lines:
        lineno = text_lines.index(None) + 1
        raise ValueError(
            f"records_path={str(path)!r}: line {lineno} is blank; the file needs one integer "
            "record id per line, in the same order as the CSV rows"
        )
    if len(text_lines) != n_rows:
        raise ValueError(
            f"records_path={str(path)!r} has {len(text_lines)} record ids but the heartbeat file "
            f"has {n_rows} rows; pass the record file that belongs to this CSV "
            "(one id per row, same order)"
        )
    return torch.tensor(text_lines, dtype=torch.int64)


def load_heartbeat(path: PathLike, records_path: Optional[PathLike] = None) -> HeartbeatData:
    """Load MIT-BIH heartbeats from a Kaggle-layout CSV (``.csv`` or ``.csv.gz``).

    Parameters
    ----------
    path : str or os.PathLike
        CSV with 188 comma-separated numbers per row and no header: 187 samples, then the class
        0..4. Gzip compression is detected from the content, whatever the suffix.
    records_path : str or os.PathLike, optional
        Text file with one integer MIT-BIH record number per line, in the same order as the rows
        of ``path`` (e.g. ``mitbih_train_records.txt``). Needed for :func:`inter_patient_split`.

    Returns
    -------
    HeartbeatData
        ``x`` float32 ``(N, 1, 187)``, ``y`` int64 ``(N,)``, ``records`` int64 ``(N,)`` or None.

    Raises
    ------
    FileNotFoundError
        If ``path`` or ``records_path`` does not exist.
    ValueError
        If a row does not have 188 numeric columns (the message gives the row number and the
        count found), a value is NaN or infinite (row and column given), a label is not an integer in 0..4, the file holds no rows, or the record file
        does not have exactly one integer per row.
    TypeError
        If a path argument is not a ``str`` or ``os.PathLike``.

    Notes
    -----
    Parsing uses :func:`numpy.loadtxt` (a C parser in numpy >= 1.23) on the decompressed stream,
    which takes about 2 s for the 87,556-row training file; we tried ``np.fromstring`` on the
    whole buffer, which was slower and silently truncates at a bad token.
    """
    path = as_path(path, "path")
    require_file(path, "path", "the MIT-BIH heartbeat CSV (e.g. mitbih_train.csv or .csv.gz)")
    records_file = None
    if records_path is not None:
        records_file = as_path(records_path, "records_path")
        require_file(
            records_file, "records_path", "the per-row record-id file (one integer per line)"
        )

    n_columns = HEARTBEAT_LENGTH + 1
    try:
        with open_binary(path) as fh, warnings.catch_warnings():
            # An empty file makes loadtxt warn and return nothing; we raise our own error below.
            warnings.filterwarnings("ignore", message=".*input contained no data.*")
            # float64 then one cast: labels must be checked for integrality before narrowing.
            table = np.loadtxt(fh, delimiter=",", dtype=np.float64, ndmin=2)
    except ValueError:
        raise ValueError(f"path={str(path)!r}: {_describe_bad_row(path, n_columns)}") from None
    if table.shape[0] == 0:
        raise ValueError(
            f"path={str(path)!r} holds no rows; expected one heartbeat per line "
            f"({HEARTBEAT_LENGTH} samples then the label)"
        )
    if table.shape[1] != n_columns:
        # loadtxt accepts a consistent but wrong width; report it like a ragged row.
        raise ValueError(
            f"path={str(path)!r}: row 1 has {table.shape[1]} comma-separated columns, expected "
            f"{n_columns} ({HEARTBEAT_LENGTH} samples then the label)"
        )

    # loadtxt parses "nan" and "inf" without complaint: a sample that is not a finite
    # number would poison every batch it lands in, so it is refused with its place in the file.
    finite = np.isfinite(table[:, :HEARTBEAT_LENGTH])  # the label column has its own check below
    if not finite.all():
        row, col = (int(i) for i in np.argwhere(~finite)[0])
        raise ValueError(
            f"path={str(path)!r}: row {row + 1}, column {col + 1} is {float(table[row, col])!r}, not a finite "
            f"number; {int((~finite).any(axis=1).sum())} row(s) are affected. Fix or drop those rows "
            f"(samples are scaled to [0, 1] in the Kaggle files)"
        )

    labels = table[:, -1]
    bad = np.flatnonzero((labels != np.round(labels)) | (labels < 0) | (labels >= len(HEARTBEAT_CLASSES)))
    if bad.size:
        row = int(bad[0])
        raise ValueError(
            f"path={str(path)!r}: row {row + 1} has label {float(labels[row])!r} in column {n_columns}; "
            f"labels must be integers 0..{len(HEARTBEAT_CLASSES) - 1} "
            f"({', '.join(HEARTBEAT_CLASSES)}). {bad.size} row(s) are affected; is the label "
            "really the last column?"
        )

    x = torch.from_numpy(np.ascontiguousarray(table[:, :HEARTBEAT_LENGTH], dtype=np.float32))
    y = torch.from_numpy(labels.astype(np.int64))
    del table
    records = None if records_file is None else _read_records(records_file, y.shape[0])
    return HeartbeatData(x.unsqueeze(1), y, records)


def inter_patient_split(
    records: torch.Tensor,
    test_fraction: float = 0.25,
    seed: int = 0,
    test_records: Optional[Sequence[int]] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split rows so that no record (patient) appears in both train and test.

    Parameters
    ----------
    records : torch.Tensor
        int64 of shape ``(N,)``: the record id of each row (``HeartbeatData.records``). To split
        the Kaggle train and test files together, concatenate both first (see Examples).
    test_fraction : float, default 0.25
        Fraction of the *records* (not rows) that go to the test set, rounded to the nearest
        whole record and clipped so both sides get at least one. Ignored if ``test_records``
        is given.
    seed : int, default 0
        Seed of the permutation of records. The split is a pure function of the sorted unique
        record ids and the seed: ``numpy.random.default_rng(seed).permutation`` of the sorted
        ids, the first ``round(test_fraction * n_records)`` of which are test. The same seed gives
        the same split on every machine and numpy version that keeps the PCG64 stream stable.
    test_records : sequence of int, optional
        Explicit test records instead of a random draw, e.g. :data:`DE_CHAZAL_DS2`. Rows of
        records in neither set (e.g. paced records for de Chazal) go to train unless
        excluded by the caller.

    Returns
    -------
    train_index, test_index : torch.Tensor
        int64 row indices, each sorted ascending, disjoint, together covering all rows.

    Raises
    ------
    ValueError
        If ``records`` is not 1-D, there are fewer than two distinct records, ``test_fraction`` is
        not in (0, 1), or ``test_records`` names records that do not occur.
    TypeError
        If ``records`` is not an integer tensor (``None`` means the data was loaded without
        ``records_path``).

    Examples
    --------
    >>> tr, te = load_heartbeat(train_csv, train_rec), load_heartbeat(test_csv, test_rec)
    >>> allx = HeartbeatData(torch.cat([tr.x, te.x]), torch.cat([tr.y, te.y]),
    ...                      torch.cat([tr.records, te.records]))
    >>> i_train, i_test = inter_patient_split(allx.records, test_fraction=0.25, seed=0)
    >>> train, test = allx.subset(i_train), allx.subset(i_test)
    """
    if records is None or not isinstance(records, torch.Tensor):
        raise TypeError(
            f"records must be an int64 tensor of record ids, got {type(records).__name__}; "
            "load the data with load_heartbeat(path, records_path=...) to get them"
        )
    if records.dtype.is_floating_point or records.dtype == torch.bool:
        raise TypeError(f"records must be an integer tensor, got dtype {records.dtype}")
    if records.ndim != 1:
        raise ValueError(f"records must be 1-D (one id per row), got shape {tuple(records.shape)}")
    unique = np.unique(records.cpu().numpy())
    if test_records is not None:
        test_set = np.unique(np.asarray(list(test_records), dtype=np.int64))
        missing = np.setdiff1d(test_set, unique)
        if missing.size:
            raise ValueError(
                f"test_records names records that do not occur in records: {missing.tolist()}; "
                "pass ids that appear in the data"
            )
    else:
        if unique.size < 2:
            raise ValueError(
                f"records holds {unique.size} distinct record(s); an inter-patient split needs "
                "at least two"
            )
        if not 0.0 < float(test_fraction) < 1.0:
            raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
        n_test = int(round(float(test_fraction) * unique.size))
        n_test = min(max(n_test, 1), unique.size - 1)
        perm = np.random.default_rng(seed).permutation(unique)
        test_set = np.sort(perm[:n_test])
    is_test = torch.from_numpy(np.isin(records.cpu().numpy(), test_set))
    test_index = torch.nonzero(is_test, as_tuple=False).flatten()
    train_index = torch.nonzero(~is_test, as_tuple=False).flatten()
    return train_index, test_index
