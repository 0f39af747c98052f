"""The method registry: name -> stepper factory, kind, and the options the method accepts."""

from __future__ import annotations

from dataclasses import dataclass

from .solvers.runge_kutta import ExplicitRungeKutta
from .tableaus import TABLEAUS

FIXED_OPTIONS = frozenset({"step_size", "grid_constructor", "perturb", "interp"})
ADAPTIVE_OPTIONS = frozenset({"first_step", "max_num_steps", "min_step", "max_step", "safety", "ifactor",
                              "dfactor", "step_t", "jump_t", "norm", "dtype", "controller"})


@dataclass(frozen=True)
class MethodSpec:
    name: str
    adaptive: bool
    make_stepper: object      # (options) -> stepper
    options: frozenset
    description: str


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
REGISTRY["adams"] = MethodSpec(
    "adams", True, _adams, ADAPTIVE_OPTIONS | {"max_order", "max_iters"},
    "Variable-step, variable-order Adams-Bashforth-Moulton predictor-corrector with error control")

METHODS = tuple(REGISTRY)
