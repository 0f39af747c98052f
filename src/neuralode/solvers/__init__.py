"""Steppers: the :class:`Solver` interface, one generic explicit Runge-Kutta stepper (every explicit tableau),
the Adams family, implicit and Rosenbrock steppers. A stepper object (or a
:class:`~neuralode.tableaus.ButcherTableau`) can be passed to ``solve(..., method=...)`` directly."""

from .base import Solver
from .runge_kutta import ExplicitRungeKutta, StepOutcome

__all__ = ["Solver", "ExplicitRungeKutta", "StepOutcome"]
