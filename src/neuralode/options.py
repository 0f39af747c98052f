"""Method lookup, option checking and the step-size control a solve runs under.

Shared by :mod:`neuralode.solve` and the gradient strategies (the adjoint builds its backward solve
from the same pieces), so it sits below both in the import order.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from ._errors import closest
from ._numbers import real_number, whole_number
from .controllers import CONTROLLER_KINDS, AdaptiveController, FixedGrid
from .methods import REGISTRY, spec_for_object
from .problem import check_monotone
from .tableaus import TABLEAUS

FIXED_DEFAULT_INTERP = "linear"


def check_method(method):
    """The :class:`~neuralode.methods.MethodSpec` of ``method``: a name, a ButcherTableau or a Solver object."""
    if not isinstance(method, str):
        return spec_for_object(method)
    if method.startswith("reversible_") and method not in REGISTRY and method[len("reversible_"):] in TABLEAUS:
        # "reversible_tsit5": ReversibleRungeKutta("tsit5") with the default coupling, the name it prints
        from .solvers.reversible import ReversibleRungeKutta
        return spec_for_object(ReversibleRungeKutta(method[len("reversible_"):]))
    if method not in REGISTRY:
        raise ValueError(f"unknown method {method!r}.{closest(method, REGISTRY)} Choose one of {list(REGISTRY)}, or "
                         "'reversible_' + an explicit Runge-Kutta method's name (e.g. 'reversible_tsit5')")
    return REGISTRY[method]


def check_fixed_step_given(spec, options, times_name: str = "the output times") -> None:
    """A fixed-step method needs ``step_size`` or a ``grid_constructor``: say so, with the grid that steps
    exactly between ``times_name``. (``solve`` and ``ODEBlock``, which checks where the block is built.)"""
    options = options or {}
    if not spec.adaptive and options.get("step_size") is None and options.get("grid_constructor") is None:
        raise ValueError(f"method {spec.name!r} takes fixed steps: give options={{'step_size': h}} or a "
                         f"'grid_constructor'; to step exactly between {times_name}, use "
                         "options={'grid_constructor': lambda func, y0, t: t}")


def check_options(spec, options):
    if options is None:
        return {}
    if not isinstance(options, dict):
        raise TypeError(f"options must be a dict, got {type(options).__name__}")
    unknown = sorted(set(options) - spec.options)
    if unknown:
        name = unknown[0]
        raise ValueError(f"option {name!r} means nothing for method {spec.name!r}.{closest(name, spec.options)} "
                         f"It accepts: {sorted(spec.options)}")
    options = dict(options)
    for flag in ("land_on_outputs", "dense_error_control"):
        value = options.get(flag, False)
        if not isinstance(value, (bool, np.bool_)):   # (numpy's bool too)
            raise TypeError(f"option {flag!r} must be True or False, got {options[flag]!r}")
        if flag in options:
            options[flag] = bool(value)
    if "perturb" in options:
        perturb = options["perturb"]
        if not isinstance(perturb, (bool, np.bool_)) and perturb is not None:   # (None: off, as in torchdiffeq)
            raise TypeError(f"option 'perturb' must be True or False, got {perturb!r}")
        options["perturb"] = bool(perturb)
    return options


def _float_option(options, name, default, *, positive=False, minimum=None):
    value = options.get(name, default)
    if value is None:
        return None
    size = value.numel() if isinstance(value, torch.Tensor) else value.size if isinstance(value, np.ndarray) else 1
    if size != 1:
        hint = "; a first step per sample needs per_sample=True" if name == "first_step" else ""
        raise ValueError(f"option {name!r} must be a single number, got an array of shape {tuple(value.shape)}{hint}")
    number = real_number(value)
    if number is None:
        raise TypeError(f"option {name!r} must be a number, got {type(value).__name__}")
    value = number
    if math.isnan(value) or (positive and value <= 0) or (minimum is not None and value < minimum):
        bound = "> 0" if positive else f">= {minimum}"
        raise ValueError(f"option {name!r}={value} is invalid; it must be {bound}")
    return value


def _step_budget(options) -> int:
    """Option ``max_num_steps`` as an int: any integer, or a float without a fraction (``1e5``), at least 1."""
    given = options.get("max_num_steps", 100_000)
    steps = whole_number(given)
    if steps is None or steps < 1:
        raise ValueError(f"option 'max_num_steps' must be a positive integer (such as 10_000), got {given!r}")
    return steps


def time_list(options, name, precise_state: bool = False):
    """Option ``name`` (``step_t``/``jump_t``) as a list of float64 times. ``precise_state``: the state is float64,
    whose steps resolve times finer than a float32 tensor of times holds them."""
    value = options.get(name)
    if value is None:
        return []
    values = torch.as_tensor(value, dtype=torch.float64).reshape(-1).tolist()
    if any(not math.isfinite(v) for v in values):
        raise ValueError(f"option {name!r} must contain finite times")
    if precise_state and isinstance(value, torch.Tensor) and value.dtype in (torch.float32, torch.float16,
                                                                             torch.bfloat16):
        # torch.tensor([1.2345]) is float32 by default: the solve restarts at 1.23450005, just past a jump the field
        # makes at 1.2345, and the step then straddles it (1.6e-7 error and 14x the evaluations instead of 1e-15).
        # Warned where the float32 number is the rounding of a shorter decimal, the sign of a typed time.
        typed = [(v, float(str(np.float32(v)))) for v in values]
        rounded = [(decimal, v) for v, decimal in typed if decimal != v]
        if rounded:
            decimal, v = rounded[0]
            warnings.warn(f"option {name!r} is a {value.dtype} tensor and the state is float64: its times are "
                          f"{value.dtype} roundings ({decimal!r} is {v!r}), so the solve stops there, not at "
                          f"{decimal!r}; give the times as a Python list or a float64 tensor", UserWarning,
                          stacklevel=4)
    return values


def make_control(spec, options, problem, field_func, user_y0):
    times, direction = problem.times, problem.direction
    if spec.adaptive:
        kind = options.get("controller", spec.default_controller)
        if kind not in CONTROLLER_KINDS:
            raise ValueError(f"option 'controller' must be 'integral', 'pi', 'pid' or 'predictive', got {kind!r}")
        coefficients = {name: _float_option(options, name, default) for name, default in
                        (("pcoeff", 0.0), ("icoeff", 1.0), ("dcoeff", 0.0))}
        given = sorted(name for name in coefficients if name in options)
        if given and kind != "pid":
            raise ValueError(f"option(s) {given} set the PID controller's coefficients; add "
                             "options={'controller': 'pid', ...} (diffrax's PIDController parametrisation)")
        max_num_steps = _step_budget(options)
        dtype = options.get("dtype")
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise TypeError(f"option 'dtype' must be a floating torch.dtype, got {dtype!r}")
        safety = _float_option(options, "safety", 0.9, positive=True)
        ifactor = _float_option(options, "ifactor", 10.0, positive=True)
        dfactor = _float_option(options, "dfactor", 0.2, positive=True)
        norm = options.get("norm")
        if norm is not None and not callable(norm):
            raise TypeError(f"option 'norm' must be a function of the scaled error returning a scalar, got {norm!r}"
                            " ('seminorm' is an adjoint option: pass it in adjoint_options or Adjoint(...))")
        check_tolerances_usable(problem)
        min_step = _float_option(options, "min_step", 0.0, minimum=0.0)
        force_min_step = options.get("force_min_step", True)
        max_step = _float_option(options, "max_step", math.inf, positive=True)
        if min_step > max_step:
            raise ValueError(f"option 'min_step'={min_step} exceeds 'max_step'={max_step}")
        # (AdaptiveController checks the values: factors, safety, PID coefficients.)
        return AdaptiveController(
            kind=kind, safety=safety, ifactor=ifactor, dfactor=dfactor, min_step=min_step, max_step=max_step,
            force_min_step=force_min_step,
            first_step=_float_option(options, "first_step", None, positive=True), max_num_steps=max_num_steps,
            **coefficients)
    step = options.get("step_size")
    max_num_steps = _step_budget(options)
    return FixedGrid(_fixed_grid(options, times, direction, field_func, user_y0, problem.t),
                     step=None if step is None else float(step), max_num_steps=max_num_steps)


@dataclass(frozen=True)
class BackwardSettings:
    """The adjoint's backward method, options and control, parsed once at the boundary (``solve``) so that
    the gradient strategy holds objects and never parses options: ``Adjoint(method=..., options=...)``, else
    the forward solve's method, options and controller object (torchdiffeq's rule)."""

    spec: object
    stepper: object
    options: dict
    controller: object = None   # the forward controller object, when the adjoint has no settings of its own

    def control(self, options, problem, field_func, state):
        """The backward solve's control for ``problem`` (one interval, or the whole backward span)."""
        if self.controller is not None:
            return self.controller
        return make_control(self.spec, options, problem, field_func, state)


def backward_settings(strategy, forward_spec, forward_options, forward_controller) -> BackwardSettings:
    """Parse an :class:`~neuralode.gradients.Adjoint`'s settings against the forward ones."""
    spec = check_method(strategy.method) if strategy.method is not None else forward_spec
    forward_stepper = forward_spec.make_stepper(forward_options) if strategy.method is None else None
    if forward_stepper is not None and getattr(forward_stepper, "ordinary_counterpart", None) is not None:
        # The backward solve needs no reversibility, and a reversible method's costs (two base steps a step, the
        # coupled solutions' gap control) bought nothing there: 8,593 backward evaluations with ReversibleRungeKutta
        # ("dopri8") against 261 with dopri8 itself. A symplectic method cannot step the augmented state (no (q, p)
        # pair), and the leapfrog/midpoint method's spurious mode grows where the dynamics, run backwards, decay. Their
        # ordinary counterpart of the same order instead.
        spec = check_method(forward_stepper.ordinary_counterpart)
    if strategy.options is not None:
        options = check_options(spec, strategy.options)
        norm = options.get("norm")
        if not (norm is None or callable(norm) or norm in ("seminorm", "full")):
            raise ValueError(f"adjoint option 'norm' must be 'seminorm', 'full' or a callable, got {norm!r}")
        if options.get("jac") is not None:
            raise ValueError("adjoint option 'jac' cannot apply: the backward solve's field is the augmented one, "
                             "(y, a, a_params), whose Jacobian autograd forms; give 'jac' in the forward options")
    else:
        # The backward state is a flat (y, a, a_theta) vector: a preconditioner written for the forward state
        # does not apply to it, and its elements are not independent samples (a 'batched' Jacobian of it
        # would be wrong), so those settings stay with the forward solve.
        options = {k: v for k, v in forward_options.items()
                   if k in spec.options and k not in ("norm", "preconditioner", "jac")}
        if options.get("jacobian") == "batched":
            options["jacobian"] = "dense"
    for name in ("step_t", "jump_t"):
        options[name] = time_list(options, name) or list(forward_options.get(name, ()))
    if not spec.adaptive:
        options.setdefault("interp", "linear")
    own_settings = strategy.options is not None or strategy.method is not None
    stepper = spec.make_stepper(options)
    if getattr(stepper, "needs_pair", False):
        raise ValueError(f"Adjoint(method={spec.name!r}): the adjoint's backward state (y, a, a_params) is no (q, p) "
                         "pair for a symplectic method to split; give an ordinary method (e.g. 'rk4' on a fixed grid, "
                         "'dopri5'), or leave it out (the forward method's counterpart)")
    return BackwardSettings(spec, stepper, options, None if own_settings else forward_controller)


def check_tolerances_usable(problem) -> None:
    if _no_tolerance(problem.rtol, problem.atol):
        raise ValueError("rtol and atol are both zero: no step could ever meet that tolerance; give a "
                         "positive rtol or atol (per element, for tolerance tensors)")


# Options that configure step-size control; with a controller object they belong to the object.
CONTROLLER_OPTIONS = frozenset({"controller", "safety", "ifactor", "dfactor", "min_step", "force_min_step", "max_step",
                                "first_step", "max_num_steps", "pcoeff", "icoeff", "dcoeff"})


def _no_tolerance(rtol, atol) -> bool:
    """True if some element has rtol == atol == 0: its error scale is zero, so no step could pass."""
    both = (torch.as_tensor(rtol) == 0) & (torch.as_tensor(atol) == 0)
    return bool(both.any())


def _fixed_grid(options, times, direction, func, y0, t):
    """Internal-time grid for fixed-step methods (torchdiffeq's construction, without its sliver steps)."""
    step_size = options.get("step_size")
    constructor = options.get("grid_constructor")
    if step_size is not None and constructor is not None:
        raise ValueError("give either option 'step_size' or 'grid_constructor', not both")
    tau0, tau_end = direction * times[0], direction * times[-1]
    if len(times) == 1 and constructor is not None:
        return (tau0,)  # nothing to integrate (odeint returns [y0]); the constructor has no span to cover
    if step_size is not None:
        h = _float_option(options, "step_size", None, positive=True)
        if not math.isfinite(h):
            raise ValueError(f"option 'step_size' must be finite, got {h}")
        n = (tau_end - tau0) / h
        # A span that is a whole number of steps up to rounding must not end in a sliver step.
        n_steps = round(n) if abs(n - round(n)) <= 1e-9 * max(1.0, n) else math.ceil(n)
        n_steps = max(n_steps, 1)
        return tuple(tau0 + i * h for i in range(n_steps)) + (tau_end,)
    if constructor is not None:
        if not callable(constructor):
            raise TypeError("option 'grid_constructor' must be callable as grid_constructor(func, y0, t)")
        grid = constructor(func, y0, t)
        if not isinstance(grid, torch.Tensor) or grid.ndim != 1 or grid.numel() < 2:
            raise ValueError("grid_constructor must return a 1-D tensor with at least two times")
        values = grid.detach().double().cpu().tolist()
        if check_monotone(values, "the grid from grid_constructor") != direction and len(values) > 1:
            raise ValueError("the grid from grid_constructor runs in the opposite direction to t")
        if values[0] != times[0] or values[-1] != times[-1]:
            raise ValueError(f"the grid from grid_constructor must start at t[0]={times[0]} and end at "
                             f"t[-1]={times[-1]}, got {values[0]} ... {values[-1]}")
        return tuple(direction * v for v in values)
    return None
