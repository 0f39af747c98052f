"""Steppers: the :class:`Solver` interface, one generic explicit Runge-Kutta stepper (every explicit tableau),
the Adams family, implicit and Rosenbrock steppers, the reversible methods and the symplectic splitting methods.
A stepper object (or a
:class:`~neuralode.tableaus.ButcherTableau`) can be passed to ``solve(..., method=...)`` directly."""

from .base import Solver
from .reversible import AsynchronousLeapfrog, ReversibleHeun, ReversibleRungeKutta
from .runge_kutta import ExplicitRungeKutta, StepOutcome
from .symplectic import LeapfrogMidpoint, Symplectic

__all__ = ["Solver", "ExplicitRungeKutta", "StepOutcome", "ReversibleHeun", "AsynchronousLeapfrog",
           "ReversibleRungeKutta", "Symplectic", "LeapfrogMidpoint"]
