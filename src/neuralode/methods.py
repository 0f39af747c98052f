"""The method registry: name -> stepper factory, kind, and the options the method accepts."""

from __future__ import annotations

from dataclasses import dataclass

from .callbacks import NAMES as CALLBACK_NAMES
from .solvers.runge_kutta import ExplicitRungeKutta
from .tableaus import TABLEAUS

# max_num_steps bounds a fixed-step solve that runs until an event (torchdiffeq's would run forever).
FIXED_OPTIONS = frozenset({"step_size", "grid_constructor", "perturb", "interp", "max_num_steps"})
ADAPTIVE_OPTIONS = frozenset({"first_step", "max_num_steps", "min_step", "max_step", "safety", "ifactor",
                              "dfactor", "step_t", "jump_t", "norm", "dtype", "controller", "pcoeff", "icoeff",
                              "dcoeff"})


@dataclass(frozen=True)
class MethodSpec:
    name: str
    adaptive: bool
    make_stepper: object      # (options) -> stepper
    options: frozenset
    description: str
    # An outside solver that takes the whole span (scipy_solver): it calls the field without a graph
    # and calls no step callbacks.
    whole_span: bool = False

    @property
    def callbacks(self) -> frozenset:
        """The step callbacks this method calls (torchdiffeq's ``valid_callbacks``)."""
        if self.whole_span:
            return frozenset()
        return frozenset(CALLBACK_NAMES) if self.adaptive else frozenset({"callback_step"})


def _rk(name):
    tableau = TABLEAUS[name]
    stepper = ExplicitRungeKutta(tableau)
    return MethodSpec(name, tableau.adaptive, lambda options, _s=stepper: _s,
                      ADAPTIVE_OPTIONS if tableau.adaptive else FIXED_OPTIONS,
                      tableau.reference)


def _explicit_adams(options):
    from .solvers.adams import ExplicitAdams
    return ExplicitAdams(max_order=options.get("max_order", 4))


def _adams(options):
    from .solvers.adams import VariableOrderAdams
    return VariableOrderAdams(max_order=options.get("max_order", 12), max_iters=options.get("max_iters", 4))


REGISTRY = {name: _rk(name) for name in TABLEAUS}
REGISTRY["explicit_adams"] = MethodSpec(
    "explicit_adams", False, _explicit_adams, FIXED_OPTIONS | {"max_order"},
    "Adams-Bashforth on a fixed grid, orders 1-4, started by Runge-Kutta steps")
def _implicit_adams(options):
    from .solvers.adams import ImplicitAdams
    return ImplicitAdams(max_order=options.get("max_order", 12), max_iters=options.get("max_iters", 4))


REGISTRY["implicit_adams"] = MethodSpec(
    "implicit_adams", False, _implicit_adams, FIXED_OPTIONS | {"max_order", "max_iters"},
    "torchdiffeq's Adams-Bashforth-Moulton on a fixed grid, orders up to 12, corrector iterated to rtol/atol")
REGISTRY["fixed_adams"] = MethodSpec(
    "fixed_adams", False, _implicit_adams, FIXED_OPTIONS | {"max_order", "max_iters"},
    "alias of implicit_adams (torchdiffeq's backward-compatible name)")
def _scipy_solver(options):
    from .solvers.scipy_wrapper import ScipySolver
    return ScipySolver(solver=options.get("solver", "LSODA"), min_step=float(options.get("min_step", 0.0)),
                       max_step=float(options.get("max_step", float("inf"))),
                       max_num_steps=options.get("max_num_steps", 100_000))


REGISTRY["scipy_solver"] = MethodSpec(
    "scipy_solver", True, _scipy_solver, frozenset({"solver", "min_step", "max_step", "norm", "max_num_steps"}),
    "scipy.integrate.solve_ivp over the whole span (option 'solver': LSODA, RK45, RK23, DOP853, Radau, BDF)",
    whole_span=True)
REGISTRY["adams"] = MethodSpec(
    "adams", True, _adams, ADAPTIVE_OPTIONS | {"max_order", "max_iters"},
    "Variable-step, variable-order Adams-Bashforth-Moulton predictor-corrector with error control")

METHODS = tuple(REGISTRY)
