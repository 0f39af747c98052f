"""Motion-tracked mechanical systems from Schmidt & Lipson (2009), "Distilling free-form natural
laws from experimental data", Science 324:81 (supplementary data).

Layout of every file: a first line ``% name name ...`` (the ``%`` may touch the first name, as in
``%o v``) naming the state columns, then whitespace-separated numbers, one sample per row:
column 0 the trial id (an integer written as a float), column 1 the time, then the state columns.
Observed in the published files (``shared/data/pendulum``):

=============================  ========  =======  ===========================================
file                           header    columns  notes
=============================  ========  =======  ===========================================
real_pend_h_1.txt              o v       4        1 trial, 556 rows, t in s, gaps in sampling
real_pend_a_1.txt              o a w     5        same trial as ``_h`` plus ``a`` = dw/dt
real_double_pend_h_1.txt       o1 o2     10       2 trials; 8 state columns, header names 4:
                               w1 w2              the other 4 are the time derivatives of the
                                                  named ones (w1, w2 repeated, then angular
                                                  accelerations), named ``do1 do2 dw1 dw2``
real_linear_h_1.txt            x v       4        1 trial, 870 rows
real_linear_a_1.txt            x a v     5        ``a`` = dv/dt (checked numerically)
real_double_linear_h_1.txt     x1 x2     6        1 trial, 495 rows
                               v1 v2
real_pend_circle_1.txt         x y       4        time column counts video frames (11..623),
                                                  x, y are pixel coordinates
=============================  ========  =======  ===========================================

Times are increasing within each trial but not evenly spaced (dropped frames).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
import numpy as np
import torch

from ._io import PathLike, as_path, open_binary, require_file

__all__ = ["PendulumData", "PendulumTrajectory", "load_pendulum"]


@dataclass(frozen=True)
class PendulumTrajectory:
    """One trial of a :class:`PendulumData` file.

    Attributes
    ----------
    trial : int
        Trial id from column 0.
    times : torch.Tensor
        float64, shape ``(T,)``, strictly increasing.
    states : torch.Tensor
        float64, shape ``(T, D)``, columns named by ``columns``.
    columns : tuple of str
        Names of the ``D`` state columns.
    """

    trial: int
    times: torch.Tensor
    states: torch.Tensor
    columns: tuple[str, ...]


@dataclass(frozen=True)
class PendulumData:
    """All rows of one Schmidt & Lipson data file.

    Attributes
    ----------
    columns : tuple of str
        Names of the ``D`` state columns (from the ``%`` header; see the module notes for
        unnamed extra columns).
    trials : torch.Tensor
        int64, shape ``(N,)``: trial id of each row.
    times : torch.Tensor
        float64, shape ``(N,)``: time of each row (seconds, frames for ``real_pend_circle``).
    states : torch.Tensor
        float64, shape ``(N, D)``. float64 because the files carry 16 significant digits and
        the time grid is irregular; cast to the model's dtype at the point of use.
    """

    columns: tuple[str, ...]
    trials: torch.Tensor
    times: torch.Tensor
    states: torch.Tensor

    def trajectories(self) -> list[PendulumTrajectory]:
        """Split the rows per trial, in order of first appearance, keeping row order.

        Returns
        -------
        list of PendulumTrajectory
        """
        ids = list(dict.fromkeys(self.trials.tolist()))
        out = []
        for trial in ids:
            rows = self.trials == trial
            out.append(PendulumTrajectory(int(trial), self.times[rows], self.states[rows], self.columns))
        return out


def _column_names(header_names: list[str], n_states: int, path) -> tuple[str, ...]:
    if n_states == len(header_names):
        return tuple(header_names)
    if n_states == 2 * len(header_names):
        # real_double_pend_h_1.txt: the unnamed half are the time derivatives of the named
        # columns (checked numerically: column 7 equals column 5 = d o1/dt = w1).
        return tuple(header_names) + tuple("d" + name for name in header_names)
    if n_states > len(header_names):
        extra = tuple(f"column_{j}" for j in range(len(header_names) + 2, n_states + 2))
        return tuple(header_names) + extra
    raise ValueError(
        f"path={str(path)!r}: the header names {len(header_names)} state columns "
        f"({' '.join(header_names)}) but rows have only {n_states} after trial and time; "
        "is this a Schmidt & Lipson data file (trial, time, states...)?"
    )


def load_pendulum(path: PathLike) -> PendulumData:
    """Load one Schmidt & Lipson (2009) motion-tracking file.

    Parameters
    ----------
    path : str or os.PathLike
        A file such as ``real_pend_h_1.txt`` (plain or gzipped): a ``%`` header line naming the
        state columns, then rows ``trial time state...`` separated by whitespace.

    Returns
    -------
    PendulumData
        ``columns``, ``trials`` int64 ``(N,)``, ``times`` float64 ``(N,)``, ``states`` float64
        ``(N, D)``; call ``.trajectories()`` for one trajectory per trial.

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    ValueError
        If the first line does not start with ``%``, a row is not numeric or has a different
        number of columns, there are fewer than 3 columns, a value is NaN or infinite, a trial id
        is not an integer, or times do not increase strictly within a trial (the message names the
        trial and row).
    """
    path = as_path(path, "path")
    require_file(path, "path", "a Schmidt & Lipson data file (e.g. real_pend_h_1.txt)")
    with open_binary(path) as fh:
        header = fh.readline().decode(errors="replace").strip()
        if not header.startswith("%"):
            raise ValueError(
                f"path={str(path)!r}: first line is {header[:60]!r}, expected a '%' line naming "
                "the state columns (e.g. '% o v')"
            )
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*input contained no data.*")
                table = np.loadtxt(fh, dtype=np.float64, ndmin=2)
        except ValueError as exc:
            # numpy's message carries the row; add the file and what the layout should be.
            raise ValueError(
                f"path={str(path)!r}: {exc} (rows after the header line must all have the same "
                "number of whitespace-separated numbers: trial, time, states)"
            ) from None
    names = header.lstrip("%").split()
    if table.shape[0] == 0:
        raise ValueError(f"path={str(path)!r} has a header but no data rows")
    if table.shape[1] < 3:
        raise ValueError(
            f"path={str(path)!r}: rows have {table.shape[1]} columns, need at least 3 "
            "(trial, time, one state)"
        )
    columns = _column_names(names, table.shape[1] - 2, path)
    # loadtxt reads "nan" and "inf" without complaint; such a time or state would surface as a
    # solver error far from the file, so it is refused with its place in the file.
    finite = np.isfinite(table)
    if not finite.all():
        row, col = (int(i) for i in np.argwhere(~finite)[0])
        raise ValueError(
            f"path={str(path)!r}: data row {row + 1}, column {col + 1} is {float(table[row, col])!r}, not a finite "
            f"number; {int((~finite).any(axis=1).sum())} row(s) are affected. Fix or drop those rows"
        )
    trial_col = table[:, 0]
    bad = np.flatnonzero(trial_col != np.round(trial_col))
    if bad.size:
        raise ValueError(
            f"path={str(path)!r}: data row {bad[0] + 1} has trial id {float(trial_col[bad[0]])!r} in "
            "column 1; trial ids must be integers"
        )
    trials = trial_col.astype(np.int64)
    times = table[:, 1]
    for trial in dict.fromkeys(trials.tolist()):
        rows = np.flatnonzero(trials == trial)
        step = np.diff(times[rows])
        if (step <= 0).any():
            first = int(np.flatnonzero(step <= 0)[0])
            row, previous = int(rows[first + 1]), int(rows[first])
            raise ValueError(
                f"path={str(path)!r}: time does not increase in trial {trial} at data row "
                f"{row + 1} (t={float(times[row])!r} after {float(times[previous])!r}); "
                "rows of one trial must be in time order"
            )
    return PendulumData(
        columns=columns,
        trials=torch.from_numpy(trials),
        times=torch.from_numpy(np.ascontiguousarray(times)),
        states=torch.from_numpy(np.ascontiguousarray(table[:, 2:])),
    )
