"""User-facing exceptions.

Bad input raises the built-in ``ValueError``/``TypeError`` at the boundary (``problem.py``) with a
message that names the argument and the fix. A solve that starts correctly but fails numerically
raises a subclass of :class:`SolverError` that carries the time where it happened, so callers can
tell a blow-up of their vector field from a tolerance that is too tight.
"""

from __future__ import annotations


class SolverError(RuntimeError):
    """A numerical failure during a solve. ``t`` is the time reached when it happened."""

    status = "failed"

    def __init__(self, message: str, t: float | None = None):
        super().__init__(message)
        self.t = t


class NonFiniteError(SolverError):
    """The state or the vector field became NaN or infinite, or the solution diverges to infinity
    (a finite-time blow-up: the step collapses while |y| has grown more than 1e8-fold)."""

    status = "non_finite"


class StepSizeUnderflowError(SolverError):
    """The step size fell below what the time resolution (or ``min_step``) allows."""

    status = "step_size_underflow"


class ConvergenceError(SolverError):
    """An implicit method's Newton iteration failed where the step could not shrink any further
    (on a fixed grid, or at ``min_step``), or its iteration matrix was singular there."""

    status = "convergence_failure"


class MaxStepsError(SolverError):
    """The solve took more steps than ``max_num_steps``."""

    status = "max_steps_reached"


def closest(name: str, choices) -> str:
    """A ' Did you mean ...?' hint for a mistyped name, or an empty string."""
    import difflib

    match = difflib.get_close_matches(str(name), list(choices), n=1)
    return f" Did you mean {match[0]!r}?" if match else ""
