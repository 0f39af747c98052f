"""``method="scipy_solver"``: scipy's ODE solvers over the whole span, as torchdiffeq's wrapper runs them.

scipy is an optional dependency (``pip install "neuralode[scipy]"``); without it this method is a clear
error that names the extra. The facts follow torchdiffeq 0.2.5's ``_impl/scipy_wrapper.py``, which calls
:func:`scipy.integrate.solve_ivp` once with ``t_eval=t``: option ``solver`` picks scipy's method
(default ``"LSODA"``; also ``"RK45"``, ``"RK23"``, ``"DOP853"``, ``"Radau"``, ``"BDF"``), ``min_step``
and ``max_step`` are passed on, ``norm`` is accepted and ignored (scipy uses its own RMS norm), the
state is integrated in float64 on the CPU and returned in its own dtype and device, and the vector field
is called without a graph. So, as in torchdiffeq, the result carries no gradient under
``gradient="direct"`` (a warning says so when one was wanted), while the adjoint strategy
differentiates it, solving its backward problem with scipy too.

We step scipy's solver object the way ``solve_ivp`` steps it (so the numbers are the same) and add,
deliberately: a step cap ``max_num_steps`` (default 100000; solve_ivp has none), a stop with
:class:`~neuralode.NonFiniteError` at the first non-finite step (solve_ivp may return NaN as success),
the outputs reached before a failure, which raises :class:`~neuralode.SolverError` with scipy's message
(torchdiffeq returns whatever scipy produced), ``min_step`` passed to LSODA only (the others warn that it
has no effect), and ``ys[0]`` that is ``y0`` itself. ``stats`` holds scipy's counts (``nfe``, ``njev``,
``nlu``, ``n_accepted`` steps).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch

from .._errors import MaxStepsError, NonFiniteError, SolverError, StepSizeUnderflowError
from .base import Solver

SCIPY_METHODS = ("LSODA", "RK45", "RK23", "DOP853", "Radau", "BDF")


def _scipy_solvers():
    try:
        import scipy.integrate as integrate
    except ImportError:  # pragma: no cover - exercised only without scipy
        raise ImportError("method='scipy_solver' needs scipy: pip install 'neuralode[scipy]' (or pip install scipy)"
                          ) from None
    return {name: getattr(integrate, name) for name in SCIPY_METHODS}


@dataclass(frozen=True, eq=False)
class ScipySolver(Solver):
    """Runs one of scipy's solvers over the whole span as ``solve_ivp`` does (not a stepper: the loop hands
    it the span and takes back a :class:`SpanResult`)."""

    solver: str = "LSODA"
    min_step: float = 0.0
    max_step: float = float("inf")
    max_num_steps: int = 100_000  # scipy has no step cap; this one counts scipy's steps

    solves_whole_span = True
    replayable = False
    adaptive = True   # (scipy's error control; the loop never steps it)
    order = None

    def __post_init__(self):
        if not isinstance(self.solver, str) or self.solver not in SCIPY_METHODS:
            raise ValueError(f"option 'solver' of method 'scipy_solver' must be one of {list(SCIPY_METHODS)}, "
                             f"got {self.solver!r}")
        _scipy_solvers()  # fail at the boundary, not mid-solve, when scipy is missing
        if self.min_step and self.solver != "LSODA":
            # Only LSODA takes a minimum step; dropping it without a word hid that (scipy warns as well, and
            # torchdiffeq passes it on, so a warning rather than an error keeps torchdiffeq code running).
            warnings.warn(f"option 'min_step' of method 'scipy_solver' applies to solver='LSODA' only; "
                          f"solver={self.solver!r} ignores it", UserWarning, stacklevel=2)

    def solve_span(self, problem, *, record_dense: bool = False) -> SpanResult:
        """Integrate ``problem`` over its output times.

        scipy's solver object is stepped here as ``solve_ivp`` steps it with ``t_eval=t`` (values at the
        output times from each step's interpolant), so the numbers are solve_ivp's, and torchdiffeq's;
        driving the steps ourselves adds what solve_ivp lacks: a step cap (``max_num_steps``; LSODA on
        y' = y^2 past its blow-up otherwise runs for minutes), a stop at the first non-finite step, and
        the outputs reached before a failure.
        """
        field, times, direction = problem.field, problem.times, problem.direction
        y0 = problem.y0
        shape, dtype, device = y0.shape, y0.dtype, y0.device
        stats = {"nfe": 0, "njev": 0, "nlu": 0, "n_accepted": 0}
        if len(times) == 1 or y0.numel() == 0:
            # Nothing to integrate (scipy rejects an empty state): the trivial solution.
            return SpanResult([y0] * len(times), list(times), stats)

        # LSODA works in real arithmetic only (scipy raises for a complex y0): a complex state is given to it
        # as its real and imaginary parts; the other solvers take complex states as they are.
        as_pairs = y0.is_complex() and self.solver == "LSODA"

        def to_state(y):
            if as_pairs:
                y = y[:y.size // 2] + 1j * y[y.size // 2:]
            return torch.as_tensor(y).to(device=device, dtype=dtype).reshape(shape)

        def to_numpy(x):
            x = x.detach().cpu().numpy().reshape(-1)
            return np.concatenate([x.real, x.imag]) if as_pairs else x

        def numpy_field(t, y):
            with torch.no_grad():
                return to_numpy(field(float(t), to_state(y)))

        y0_numpy = to_numpy(y0)
        y0_numpy = y0_numpy.astype(np.complex128 if np.iscomplexobj(y0_numpy) else np.float64)
        rtol, atol = (x.detach().cpu().numpy().reshape(-1) if isinstance(x, torch.Tensor) else x
                      for x in (problem.rtol, problem.atol))
        if as_pairs:
            rtol, atol = (np.concatenate([x, x]) if isinstance(x, np.ndarray) else x for x in (rtol, atol))
        extra = {"min_step": self.min_step} if self.solver == "LSODA" else {}
        with warnings.catch_warnings():
            # rtol below 100 * machine epsilon is raised by scipy with a warning; the user asked for it.
            warnings.filterwarnings("ignore", message="At least one element of `rtol` is too small")
            solver = _scipy_solvers()[self.solver](numpy_field, times[0], y0_numpy, times[-1], rtol=rtol, atol=atol,
                                                   max_step=self.max_step, **extra)
        # y(t0) is y0 itself, not scipy's float64 copy of it; detached like every other output (no graph).
        outputs, output_times = [y0.detach()], [times[0]]
        taus = [direction * x for x in times]
        next_output, steps, failure = 1, 0, None
        pieces = []
        while next_output < len(times):
            if steps >= self.max_num_steps:
                failure = MaxStepsError(f"scipy's {self.solver} took max_num_steps={self.max_num_steps} steps without "
                                        f"reaching t={times[-1]} (at t={solver.t}); raise it with options="
                                        "{'max_num_steps': N}, or check the field for a singularity there",
                                        t=float(solver.t))
                break
            message = solver.step()
            steps += 1
            if solver.status == "failed":
                failure = SolverError(f"scipy's {self.solver} failed near t={solver.t}: {message}", t=float(solver.t))
                break
            if not np.isfinite(solver.y).all():
                failure = NonFiniteError(f"scipy's {self.solver} reached NaN or infinite values at t={solver.t}: the "
                                         "vector field is not finite there", t=float(solver.t))
                break
            if solver.t == solver.t_old:
                # LSODA near a singularity keeps taking steps of length zero (seen on y' = y^2 past its
                # blow-up: |y| ~ 1e154 and no progress for thousands of steps).
                magnitude, initial = float(np.abs(solver.y).max()), float(np.abs(y0_numpy).max())
                if magnitude > 1e8 * max(1.0, initial):
                    failure = NonFiniteError(f"the solution diverges to infinity near t={solver.t}: |y| reached "
                                             f"{magnitude:.3g} and scipy's {self.solver} stopped advancing",
                                             t=float(solver.t))
                else:
                    failure = StepSizeUnderflowError(f"scipy's {self.solver} stopped advancing at t={solver.t} "
                                                     f"(step size underflow; largest |y| there: {magnitude:.3g})",
                                                     t=float(solver.t))
                break
            interpolant = solver.dense_output()
            if record_dense:
                pieces.append((solver.t_old, solver.t, interpolant))
            step_outputs = []
            while next_output < len(times) and taus[next_output] <= direction * solver.t:
                step_outputs.append(times[next_output])
                next_output += 1
            if step_outputs:
                values = interpolant(np.asarray(step_outputs))
                for i, t_out in enumerate(step_outputs):
                    outputs.append(to_state(values[:, i]))
                    output_times.append(t_out)
        stats.update(nfe=field.nfe, njev=int(solver.njev), nlu=int(solver.nlu), n_accepted=steps)
        dense = _ScipyDense(pieces, direction, to_state) if record_dense and pieces else None
        return SpanResult(outputs, output_times, stats, dense, failure)


@dataclass
class SpanResult:
    """What :meth:`ScipySolver.solve_span` hands back to the loop: the outputs reached (the first is y0),
    their times, scipy's counts, the dense output (or None) and the failure that stopped it (or None)."""

    outputs: list
    output_times: list
    stats: dict
    dense: object = None
    failure: Exception | None = None


class _ScipyDense:
    """scipy's per-step interpolants behind the interface :class:`~neuralode.solution.Solution` reads."""

    def __init__(self, pieces, direction, to_state):
        self.pieces, self.direction, self.to_state = pieces, direction, to_state
        self.starts = [direction * a for a, _, _ in pieces]
        self.lengths = [direction * (b - a) for a, b, _ in pieces]
        self.end_tau = None

    def step_ends(self) -> list:
        return [s + h for s, h in zip(self.starts, self.lengths)]

    def evaluate_one(self, t: float) -> torch.Tensor:
        for a, b, interpolant in self.pieces:
            if min(a, b) <= t <= max(a, b):
                return self.to_state(interpolant(t))
        first, last = self.pieces[0][0], self.pieces[-1][1]
        raise ValueError(f"t={t} is outside the solved span [{min(first, last)}, {max(first, last)}]")
