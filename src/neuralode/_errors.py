"""User-facing exceptions.

Bad input raises the built-in ``ValueError``/``TypeError`` at the boundary (``problem.py``) with a
message that names the argument and the fix. A solve that starts correctly but fails numerically
raises a subclass of :class:`SolverError` that carries the time where it happened, so callers can
tell a blow-up of their vector field from a tolerance that is too tight.
"""

from __future__ import annotations

from enum import Enum


class Status(str, Enum):
    """How a solve ended (``Solution.status``). A ``str``: ``solution.status == "success"`` keeps working.

    ``SUCCESS``: every output time was reached with error control held and finite values. ``EVENT``: a
    terminal event stopped the solve. The others are failures (``Solution.success`` is ``False``), each
    the ``status`` of one :class:`SolverError` subclass.
    """

    SUCCESS = "success"
    EVENT = "event"
    MAX_STEPS = "max_steps_reached"
    STEP_SIZE_UNDERFLOW = "step_size_underflow"
    NON_FINITE = "non_finite"
    CONVERGENCE_FAILURE = "convergence_failure"
    FAILED = "failed"

    def __str__(self) -> str:   # the value, as StrEnum (Python 3.11+) would print it
        return self.value


class SolverError(RuntimeError):
    """A numerical failure during a solve. ``t`` is the time reached when it happened."""

    status = Status.FAILED

    def __init__(self, message: str, t: float | None = None):
        super().__init__(message)
        self.t = t


class NonFiniteError(SolverError):
    """The state or the vector field became NaN or infinite, or the solution diverges to infinity
    (a finite-time blow-up: the step collapses while |y| has grown more than 1e8-fold)."""

    status = Status.NON_FINITE


class StepSizeUnderflowError(SolverError):
    """The step size fell below what the time resolution (or ``min_step``) allows."""

    status = Status.STEP_SIZE_UNDERFLOW


class ConvergenceError(SolverError):
    """An implicit method's Newton iteration failed where the step could not shrink any further
    (on a fixed grid, or at ``min_step``), or its iteration matrix was singular there."""

    status = Status.CONVERGENCE_FAILURE


class MaxStepsError(SolverError):
    """The solve took more steps than ``max_num_steps``."""

    status = Status.MAX_STEPS


class NonFiniteInputError(ValueError):
    """``y0`` holds NaN or infinite values. Bad input, hence a ``ValueError``; a class of its own so that a
    training loop can tell a model whose parameters diverged (an encoder that returns NaN) from a mistake in
    its configuration."""


def closest(name: str, choices) -> str:
    """A ' Did you mean ...?' hint for a mistyped name, or an empty string."""
    import difflib

    match = difflib.get_close_matches(str(name), list(choices), n=1)
    return f" Did you mean {match[0]!r}?" if match else ""


def add_note(error: BaseException, note: str) -> None:
    """``error.add_note(note)``: context for an exception raised by the user's code, which is passed on unchanged
    otherwise. Python 3.10 has no ``add_note``; there the note goes into the message of a one-argument exception
    (torch's shape errors are such), else it is dropped."""
    if hasattr(error, "add_note"):
        error.add_note(note)
    elif len(error.args) == 1 and isinstance(error.args[0], str):
        error.args = (f"{error.args[0]}\n{note}",)
