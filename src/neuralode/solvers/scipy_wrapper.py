"""``method="scipy_solver"``: the whole span handed to :func:`scipy.integrate.solve_ivp`, as torchdiffeq does.

scipy is an optional dependency (``pip install "neuralode[scipy]"``); without it this method is a clear
error that names the extra. The facts follow torchdiffeq 0.2.5's ``_impl/scipy_wrapper.py``: option
``solver`` picks scipy's method (default ``"LSODA"``; also ``"RK45"``, ``"RK23"``, ``"DOP853"``,
``"Radau"``, ``"BDF"``), ``min_step`` and ``max_step`` are passed on, ``norm`` is accepted and ignored
(scipy uses its own RMS norm), the state is integrated in float64 on the CPU and returned in its own
dtype and device, and the vector field is called without a graph. So, as in torchdiffeq, the result
carries no gradient under ``gradient="direct"`` (a warning says so when one was wanted), while the
adjoint strategy differentiates it, solving its backward problem with scipy too.

Differences, each deliberate: decreasing output times are passed to scipy as they are (scipy
integrates backwards natively; torchdiffeq's wrapper uses ``[t.min(), t.max()]`` on its internally
negated times, which comes to the same); a failed scipy solve raises :class:`~neuralode.SolverError`
with scipy's message (torchdiffeq returns whatever scipy produced); ``stats`` holds scipy's counts
(``nfe``, ``njev``, ``nlu``, ``n_accepted`` steps).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch

from .._errors import SolverError

SCIPY_METHODS = ("LSODA", "RK45", "RK23", "DOP853", "Radau", "BDF")


def _solve_ivp():
    try:
        from scipy.integrate import solve_ivp
    except ImportError:  # pragma: no cover - exercised only without scipy
        raise ImportError("method='scipy_solver' needs scipy: pip install 'neuralode[scipy]' (or pip install scipy)"
                          ) from None
    return solve_ivp


@dataclass(frozen=True, eq=False)
class ScipySolver:
    """Runs :func:`scipy.integrate.solve_ivp` over the whole span (not a stepper: the loop hands it the span)."""

    solver: str = "LSODA"
    min_step: float = 0.0
    max_step: float = float("inf")

    solves_whole_span = True
    adaptive = True
    order = 5

    def __post_init__(self):
        if not isinstance(self.solver, str) or self.solver not in SCIPY_METHODS:
            raise ValueError(f"option 'solver' of method 'scipy_solver' must be one of {list(SCIPY_METHODS)}, "
                             f"got {self.solver!r}")
        _solve_ivp()  # fail at the boundary, not mid-solve, when scipy is missing

    def solve_span(self, problem, *, record_dense: bool = False, throw: bool = True):
        """Integrate ``problem`` over its output times; returns the loop's :class:`Integration`."""
        from ..integrate import Integration, raise_or_record

        field, times = problem.field, problem.times
        y0 = problem.y0
        shape, dtype, device = y0.shape, y0.dtype, y0.device
        stats = {"nfe": 0, "njev": 0, "nlu": 0, "n_accepted": 0}
        if len(times) == 1 or y0.numel() == 0:
            # Nothing to integrate (scipy rejects an empty state): the trivial solution.
            return Integration([y0] * len(times), list(times), stats, final_t=times[-1], final_y=y0)

        def numpy_field(t, y):
            with torch.no_grad():
                state = torch.as_tensor(y).to(device=device, dtype=dtype).reshape(shape)
                return field(float(t), state).detach().cpu().numpy().reshape(-1)

        y0_numpy = y0.detach().cpu().numpy().reshape(-1)
        if not np.iscomplexobj(y0_numpy):
            y0_numpy = y0_numpy.astype(np.float64)
        kwargs = {"min_step": self.min_step} if self.solver == "LSODA" else {}
        rtol, atol = (x.detach().cpu().numpy().reshape(-1) if isinstance(x, torch.Tensor) else x
                      for x in (problem.rtol, problem.atol))
        with warnings.catch_warnings():
            # rtol below 100 * machine epsilon is raised by scipy with a warning; the user asked for it.
            warnings.filterwarnings("ignore", message="At least one element of `rtol` is too small")
            sol = _solve_ivp()(numpy_field, (times[0], times[-1]), y0_numpy, method=self.solver, t_eval=times,
                               rtol=rtol, atol=atol, max_step=self.max_step, dense_output=record_dense, **kwargs)
        stats.update(nfe=field.nfe, njev=int(sol.njev), nlu=int(sol.nlu))
        reached = sol.y.shape[1]
        outputs = [torch.as_tensor(sol.y[:, i]).to(device=device, dtype=dtype).reshape(shape) for i in range(reached)]
        result = Integration(outputs, list(times[:reached]), stats)
        if record_dense and sol.sol is not None:
            result.dense = _ScipyDense(sol.sol, problem.direction, shape, dtype, device)
            stats["n_accepted"] = len(sol.sol.ts) - 1
        if not sol.success or reached < len(times):
            t_fail = float(sol.t[-1]) if len(sol.t) else times[0]
            raise_or_record(result, SolverError(f"scipy's solve_ivp ({self.solver}) failed near t={t_fail}: "
                                                f"{sol.message}", t=t_fail), throw)
        result.final_t, result.final_y = result.output_times[-1], outputs[-1]
        return result


class _ScipyDense:
    """scipy's ``OdeSolution`` behind the interface :class:`~neuralode.solution.Solution` reads."""

    def __init__(self, ode_solution, direction, shape, dtype, device):
        self.ode_solution, self.direction = ode_solution, direction
        self.shape, self.dtype, self.device = shape, dtype, device
        ts = [float(x) for x in ode_solution.ts]
        self.starts = [direction * x for x in ts[:-1]]
        self.lengths = [direction * (b - a) for a, b in zip(ts, ts[1:])]
        self.end_tau = None

    def evaluate_one(self, t: float) -> torch.Tensor:
        ts = self.ode_solution.ts
        lo, hi = min(ts[0], ts[-1]), max(ts[0], ts[-1])
        if not lo <= t <= hi:
            raise ValueError(f"t={t} is outside the solved span [{lo}, {hi}]")
        return torch.as_tensor(self.ode_solution(t)).to(device=self.device, dtype=self.dtype).reshape(self.shape)
