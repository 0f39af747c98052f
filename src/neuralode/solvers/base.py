"""The interface every stepper implements: :class:`Solver`.

A solver takes one step at a time; the loop (:func:`neuralode.integrate.integrate`) asks for steps and
decides what to do with them. A solver never chooses step sizes (except a multistep method's own step
policy, reported as ``StepOutcome.step_factor``), never saves outputs and never looks at events.

Flags (class attributes, read by the loop and the gradient strategies instead of probing attributes):

- ``implicit``: the method solves stiff problems (Newton or a linear solve per step); the loop gives
  explicit methods a stiffness hint when they stall, never implicit ones.
- ``multistep``: the method keeps a history across steps (Adams).
- ``replayable``: a step is a function of its start state alone, so a solve can be replayed from a
  stored state and take the same steps (the checkpoint strategy, the adjoint's replayed forward).
  False for multistep methods, for methods that switch along the solve, and for whole-span solvers.
- ``solves_whole_span``: the solver runs its own loop over the whole span (scipy); the loop hands it the
  span instead of stepping it.
- ``fsal``: the last stage is the derivative at the step's end (first same as last).
- ``lands_on_outputs``: by default the steps end on the output times instead of interpolating there (the
  option ``land_on_outputs`` overrides it). True for the implicit, Rosenbrock and switching methods: between
  the long steps of a stiff solve their dense output was 10-1000x less accurate than the steps themselves
  (docs/solvers.md).
- ``reads_derivative``: the step reads ``f(t0, y0)`` (its ``f0`` argument). False for the reversible methods, which
  carry their own evaluations in their state: the loop then hands them ``f0`` only where they must start afresh
  (the first step, after a ``jump_t`` or a state jump) and ``None`` otherwise, and evaluates nothing between steps.
- ``reversible``: the step has an exact inverse (:mod:`neuralode.solvers.reversible`), which the gradient strategy
  ``ReversibleAdjoint`` walks backwards.
- ``needs_pair``: the step splits the state into a pair ``(q, p)`` (:mod:`neuralode.solvers.symplectic`).
- ``needs_terms``: the step evaluates the two terms of a :class:`~neuralode.SplitField` apart (the IMEX methods,
  :mod:`neuralode.solvers.imex`).

Methods: ``init(func, t0, y0, f0) -> state``; ``step(func, t0, y0, f0, h, error_norm, state) ->
StepOutcome`` (see :class:`~neuralode.solvers.runge_kutta.StepOutcome`); ``dense_coefficients(func, t0,
y0, h, outcome, f1) -> [c_0, ..., c_d]`` (``y(t0 + theta h) = sum_m c_m theta**m``);
``statistics(state) -> dict`` (method-specific counters for ``Solution.stats``); ``stiff_filter(outcome, h)
-> (gamma, solve) or None`` (the step's own factorised ``I - h gamma J``, with which the loop checks the dense
output of a stiff method's step: :func:`~neuralode.interpolation.interpolation_error`). Properties: ``order``,
``adaptive`` (has an error estimate), ``initial_step_order`` (the order ``q`` in Hairer's starting-step
exponent ``1/(q+1)``: the error estimator's).
"""

from __future__ import annotations

import abc

from ..interpolation import linear_coefficients


class Solver(abc.ABC):
    """Base of every stepper: the flags' defaults (an explicit one-step method) and the shared defaults of
    the interface. Subclasses are frozen dataclasses; see the module docstring for the contract. ``order``
    and ``adaptive`` are abstract: a subclass that leaves either out cannot be instantiated."""

    implicit = False
    multistep = False
    replayable = True
    solves_whole_span = False
    fsal = False
    lands_on_outputs = False
    reads_derivative = True
    reversible = False
    # The step splits the state into a pair (q, p) (the symplectic methods): it cannot step other states, such as the
    # adjoint's augmented one.
    needs_pair = False
    # The step evaluates the terms of a neuralode.SplitField apart (the IMEX methods): it cannot step a field given
    # whole (the adjoint's augmented field is split when the forward one is: gradients.adjoint._AdjointDynamics.term).
    needs_terms = False
    # An ordinary method (a name or tableau) to use instead where this one does not fit: the adjoint's default
    # backward method (None: the forward method itself).
    ordinary_counterpart = None
    # What to say when the steps stall (max_num_steps, a collapsing step), instead of the stiffness probe: a method
    # whose stability limits are its own (the reversible ones). None: the loop probes for stiffness.
    stall_hint = None

    @property
    @abc.abstractmethod
    def order(self) -> int:
        """Classical order of the propagated solution."""

    @property
    @abc.abstractmethod
    def adaptive(self) -> bool:
        """Whether the method has an error estimate (adaptive step-size control)."""

    @property
    def initial_step_order(self) -> int:
        return self.order

    def init(self, func, t0: float, y0, f0):
        return None

    def statistics(self, state) -> dict:
        return {}

    def final_check(self, func, t, y, state, error_norm) -> str | None:
        """Why a solve that ended at ``(t, y)`` with the stepper's ``state`` is wrong although every step was accepted,
        or ``None`` (read once, after the last step; a fixed grid has no error control to catch it)."""
        return None

    def stiff_filter(self, outcome, h: float):
        """``(gamma, solve)`` with ``solve(v) = (I - h gamma J)^{-1} v`` from the factorisation the step used, or
        ``None``: an explicit method's steps are as short as its accuracy needs, so its dense output is not
        checked (the loop checks a stiff method's, whose long steps the step-end error estimate allows)."""
        return None


class LinearDense:
    """A dense output linear between the step ends (diffrax's for its reversible and symplectic solvers): for the
    steppers whose steps carry no continuous extension (the reversible Heun, the leapfrogs, the splitting methods)."""

    def dense_coefficients(self, func, t0, y0, h, outcome, f1, stacked=True) -> list:
        return linear_coefficients(y0, outcome.y1)


def method_data(value, registry: dict, data_type: type, argument: str, kind: str):
    """The coefficients a stepper runs, given by name (a key of ``registry``) or as an instance of ``data_type``;
    ``argument`` names the parameter in the errors, e.g. ``"Symplectic(method=...)"``, and ``kind`` what it takes
    (``"a splitting method"``)."""
    if isinstance(value, str):
        if value not in registry:
            raise ValueError(f"{argument} must name {kind} (one of {sorted(registry)}) or be a {data_type.__name__}, "
                             f"got {value!r}")
        return registry[value]
    if not isinstance(value, data_type):
        raise TypeError(f"{argument} must be a method name or a {data_type.__name__}, got {type(value).__name__}")
    return value


def user_field(func):
    """The user's own callable behind the loop's field (through ``VectorField`` and ``FieldWithArgs``)."""
    inner = getattr(func, "func", func)
    return getattr(inner, "func", inner) if type(inner).__name__ == "FieldWithArgs" else inner
