"""How a solve is differentiated: a strategy object passed as ``solve(..., gradient=...)``.

=====================  ================================  =====================  ==============================
strategy               gradient of                        memory                 double backward
=====================  ================================  =====================  ==============================
``Direct``             the discrete solve, exactly        O(steps) graphs        yes (e.g. Laplacians for PINNs)
``Checkpoint``         the discrete solve, exactly        O(sqrt(steps)) states  no (clear error)
                                                          + one segment's graph
``Adjoint``            the continuous ODE (up to the      O(1) in steps          no (clear error)
                       backward solve's tolerance)
``ReversibleAdjoint``  the discrete solve, exactly        O(1) in steps          no (clear error)
                       (reversible methods only)
``ImplicitAdjoint``    the steady state at the end        O(1): no steps kept    no (clear error)
                       (implicit function theorem)
=====================  ================================  =====================  ==============================

Gradients with respect to the times ``t`` are the same for every strategy: they come from the ODE
(dy(t_i)/dt_i = f(t_i, y(t_i)), and dL/dt_0 = -<dL/dy0, f(t_0, y0)>), attached in ``solve``.

When *not* to use each: ``Direct`` runs out of memory on long solves with big vector fields;
``Adjoint`` reconstructs the forward trajectory backwards in time, so on dynamics that are unstable
backwards (dissipative or chaotic ones) its gradient can be far off; prefer ``Adjoint(interpolate=True)``
(y(t) from the forward dense output) or ``Checkpoint`` there.
``Checkpoint`` costs one extra forward solve. ``ReversibleAdjoint`` rebuilds the states by undoing the steps, which
amplifies rounding where the dynamics grow strongly (warned when it does).
"""

from __future__ import annotations

from .base import GradientStrategy, RunResult
from .adjoint import Adjoint
from .checkpoint import Checkpoint
from .direct import Direct
from .implicit import ImplicitAdjoint
from .reversible import ReversibleAdjoint

__all__ = ["GradientStrategy", "Direct", "Checkpoint", "Adjoint", "ReversibleAdjoint", "ImplicitAdjoint",
           "resolve_gradient", "RunResult"]


# Said wherever a gradient name is refused: the other strategies are objects, and torchdyn's names map onto them.
STRATEGY_HINT = ("or a strategy object: neuralode.Adjoint(interpolate=True) (torchdyn's 'interpolated_adjoint'), "
                 "neuralode.Adjoint(rtol=..., method=...) for the backward solve's settings, neuralode.Checkpoint(), "
                 "neuralode.ReversibleAdjoint() ('reversible'), neuralode.ImplicitAdjoint() (a steady state's "
                 "gradient); torchdyn's 'autograd' is 'direct'")


def resolve_gradient(gradient, *, adjoint_params=None, func=None) -> GradientStrategy:
    """Turn ``"direct" | "adjoint" | "checkpoint" | "reversible"`` or a strategy object into a strategy with
    parameters."""
    if isinstance(gradient, str):
        table = {"direct": Direct, "adjoint": Adjoint, "checkpoint": Checkpoint, "reversible": ReversibleAdjoint}
        if gradient not in table:
            from .._errors import closest
            raise ValueError(f"unknown gradient strategy {gradient!r}.{closest(gradient, table)} "
                             f"Choose one of {list(table)} {STRATEGY_HINT}")
        gradient = table[gradient]()
    if not isinstance(gradient, GradientStrategy):
        raise TypeError(f"gradient must be 'direct', 'adjoint', 'checkpoint', 'reversible' or a GradientStrategy, "
                        f"got {type(gradient).__name__}")
    return gradient.bind(func, adjoint_params)
