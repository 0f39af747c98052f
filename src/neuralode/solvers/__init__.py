"""Steppers: the :class:`Solver` interface, one generic explicit Runge-Kutta stepper (every explicit tableau),
the Adams family, implicit and Rosenbrock steppers, and the reversible methods. A stepper object (or a
:class:`~neuralode.tableaus.ButcherTableau`) can be passed to ``solve(..., method=...)`` directly."""

from .base import Solver
from .reversible import AsynchronousLeapfrog, ReversibleHeun, ReversibleRungeKutta
from .runge_kutta import ExplicitRungeKutta, StepOutcome

__all__ = ["Solver", "ExplicitRungeKutta", "StepOutcome", "ReversibleHeun", "AsynchronousLeapfrog",
           "ReversibleRungeKutta"]
