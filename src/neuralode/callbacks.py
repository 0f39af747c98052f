"""torchdiffeq's step callbacks: methods of the vector field that the loop calls around each step.

``func.callback_step(t0, y0, dt)`` is called just before every attempted step, with the step's start
time, the state there and the step length; ``func.callback_accept_step(t0, y0, dt)`` and
``func.callback_reject_step(t0, y0, dt)`` after an adaptive step is accepted or rejected, with the
same arguments. The names with ``_adjoint`` appended are called the same way during the adjoint
strategy's backward solve. Semantics as torchdiffeq's (its FURTHER_DOCUMENTATION.md, "Callbacks",
and ``_impl/misc.py``): ``t0`` is the real time (negative direction included), ``dt`` the step
length in the direction of integration (positive), ``y0`` has the user's structure (a tuple for
tuple states); the return value is ignored. Fixed-step methods support only ``callback_step``;
``scipy_solver`` supports none; a callback that the chosen method cannot call gives a warning.

Callbacks cost nothing when unset: the loop holds ``None`` and skips the call.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

NAMES = ("callback_step", "callback_accept_step", "callback_reject_step")


@dataclass(frozen=True)
class Callbacks:
    """The callbacks the loop calls (each ``None`` when unset)."""

    step: object = None
    accept: object = None
    reject: object = None

    @classmethod
    def of(cls, func, *, adjoint: bool = False) -> Callbacks | None:
        """The callbacks set on ``func`` (``adjoint``: the ``*_adjoint`` ones), or ``None`` if there are none."""
        suffix = "_adjoint" if adjoint else ""
        found = [getattr(func, name + suffix, None) for name in NAMES]
        found = [f if callable(f) else None for f in found]
        if not any(found):
            return None
        return cls(*found)

    def names(self, adjoint: bool = False) -> set:
        suffix = "_adjoint" if adjoint else ""
        return {name + suffix for name, f in zip(NAMES, (self.step, self.accept, self.reject)) if f is not None}


def warn_unsupported(callbacks: Callbacks | None, method: str, supported: set, adjoint: bool = False) -> None:
    """torchdiffeq's warning when a callback is set that the method never calls (``supported``: the
    method's ``MethodSpec.callbacks``)."""
    if callbacks is None:
        return
    suffix = "_adjoint" if adjoint else ""
    unsupported = sorted(callbacks.names(adjoint) - {name + suffix for name in supported})
    if unsupported:
        warnings.warn(f"Solver {method!r} does not support callbacks {unsupported}: they will not be called "
                      f"({'fixed-step methods call only callback_step' if 'callback_step' in supported else 'this method calls none'})",
                      UserWarning, stacklevel=4)


def call(callback, field, t0: float, y: torch.Tensor, h: float) -> None:
    """Call one callback as torchdiffeq does: ``(t0 tensor, y in the user's structure, dt tensor)``."""
    callback(field.time(t0), field.callback_view(y), field.time(abs(h)))
