"""neuralode: neural ordinary differential equations in PyTorch.

Public API (explicit re-exports, no logic here):

- :func:`solve` returns a :class:`Solution` (values, dense output, statistics, a :class:`Status`);
- :func:`odeint`, :func:`odeint_adjoint`, :func:`odeint_event`, :func:`odeint_dense` keep torchdiffeq's
  signatures;
- :data:`METHODS` names every method;
- gradient strategies :class:`Direct`, :class:`Adjoint`, :class:`Checkpoint`, :class:`ReversibleAdjoint`,
  :class:`ImplicitAdjoint`;
- :class:`Event` (several events per solve, terminal or recorded only; a real zero crossing or a boolean
  condition turning True) and its :class:`EventRecord`; :func:`steady_state_event`;
- :class:`SplitField`, a field given as an explicit and an implicit term (the IMEX methods' input);
- step-size controllers as objects: :class:`IntegralController`, :class:`PIController`, :class:`PIDController`,
  :class:`PredictiveController`.
"""

from ._errors import ConvergenceError, MaxStepsError, NonFiniteError, SolverError, Status, StepSizeUnderflowError
from .controllers import IntegralController, PIController, PIDController, PredictiveController
from .events import Event, EventRecord, steady_state_event
from .gradients import Adjoint, Checkpoint, Direct, GradientStrategy, ImplicitAdjoint, ReversibleAdjoint
from .methods import METHODS
from .solution import Solution
from .compat import odeint, odeint_adjoint, odeint_dense, odeint_event
from .solve import solve
from .split_field import SplitField

# The layers, models and loaders build only on the public API above, so importing them last is safe;
# experiments and the CLI stay out of the top-level import (they pull in matplotlib and tqdm).
from . import data, models, nn  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "solve", "odeint", "odeint_adjoint", "odeint_event", "odeint_dense", "Solution", "Status", "METHODS",
    "Event", "EventRecord", "steady_state_event", "SplitField",
    "IntegralController", "PIController", "PIDController", "PredictiveController",
    "Direct", "Adjoint", "Checkpoint", "ReversibleAdjoint", "ImplicitAdjoint", "GradientStrategy",
    "SolverError", "NonFiniteError", "StepSizeUnderflowError", "MaxStepsError", "ConvergenceError",
    "data", "models", "nn",
]
