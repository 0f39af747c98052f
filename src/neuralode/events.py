"""Gradients through the time of a terminal event (implicit function theorem).

The event time t_e is defined implicitly by g(t_e, y(t_e)) = 0. For upstream quantities theta,

    dt_e/dtheta = -(dg/dy . dy/dtheta) / (dg/dt + dg/dy . f(t_e, y(t_e))),

and the state at the event moves as dy_e/dtheta = dy/dtheta + f dt_e/dtheta. The solve itself
differentiates y at a *fixed* time; :func:`reroute_event_gradient` adds the part that flows through
t_e by changing the cotangent of the event state to ``grad_y + lambda dg/dy`` with
``lambda = -(grad_t + grad_y . f) / (dg/dt + dg/dy . f)``. Event functions with several elements are
combined as ``min(g * sign(g(t0, y0)))`` (the element that fires first).
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass, replace
from typing import Callable

import numpy as np
import torch
import torch.utils._pytree as pytree

from .problem import takes_arguments


@dataclass(frozen=True)
class Event:
    """An event for ``solve(..., events=[...])``: a zero crossing of ``fn(t, y)``, located on the dense output.

    Parameters
    ----------
    fn : callable
        ``fn(t, y) -> Tensor`` of any shape (``t`` a 0-dim tensor, ``y`` the state as given to ``solve``);
        an occurrence is a crossing of *any* element (the first one, where several elements cross between two
        of the points checked).
    direction : {0, 1, -1}
        Crossings upwards (1), downwards (-1) or both (0).
    terminal : bool or int
        ``False`` (default): record every occurrence and go on. ``True``: stop at the first occurrence.
        An integer ``N >= 1``: stop at the N-th occurrence.
    name : str, optional
        A label carried into the records.
    tol : float, optional
        Root tolerance in time: the bisection on the dense output stops once the bracket around the crossing
        is at most ``tol`` long (each halving costs one evaluation of ``fn``). ``None`` (default): until the
        bracket cannot shrink in floating point.
    samples : int
        Points inside each step, evenly spaced on its dense output, where the sign of ``fn`` is checked besides
        the step's ends (each costs one evaluation of ``fn``; dopri8 builds its dense output for them, 3
        evaluations of ``f`` a step), so that two crossings within one step (out and back) are both seen unless
        they lie within one ``1 / (samples + 1)`` of the step; ``0`` checks the ends only (torchdiffeq's and
        scipy's rule). Default 4 (SciML's ``interp_points`` is 10).
    affect : callable, optional
        ``affect(t, y) -> y_new``: at each occurrence the state jumps to ``y_new`` (the state's structure, shapes and
        dtype) and the solve goes on from there (SciML's ``ContinuousCallback`` with an ``affect!``: a ball's
        bounce, a dose, a reset). ``affect(t, y, fired)`` also receives which elements of ``fn``'s value fired: a
        bool tensor of its shape (SciML's ``affect!(integrator, idx)``; reset only the neurons that spiked). The
        solve restarts at the event time (a new first step), so outputs after it follow the new state; an output
        time equal to the event time gets the state after the jump. Every
        gradient strategy differentiates through the jumps: through ``affect``, the event times and the state
        there. Not applied at an occurrence that stops the solve (``terminal``): there ``event_y`` is the state
        reached.

    Every occurrence is in ``Solution.events`` as an :class:`EventRecord`, in time order. A solve that
    stops at a terminal event reports ``status == "event"``, ``event_t`` and ``event_y``; the event time is
    differentiable (implicit function theorem), as with ``event_fn``, at the N-th occurrence as at the first.
    """

    fn: Callable
    direction: int = 0
    terminal: bool | int = False
    name: str | None = None
    tol: float | None = None
    samples: int = 4
    affect: Callable | None = None

    def __post_init__(self):
        if not callable(self.fn):
            raise TypeError(f"Event fn must be callable as fn(t, y), got {type(self.fn).__name__}")
        if self.affect is not None:
            _check_affect(self.affect, self.tol)
        if self.direction not in (0, 1, -1) or isinstance(self.direction, bool):
            raise ValueError(f"Event direction must be 0, 1 or -1, got {self.direction!r}")
        terminal = self.terminal
        if not isinstance(terminal, (bool, int)) or (not isinstance(terminal, bool) and terminal < 1):
            raise ValueError(f"Event terminal must be True, False or a positive integer (stop at that occurrence), "
                             f"got {terminal!r}")
        if self.tol is not None and (isinstance(self.tol, bool) or not isinstance(self.tol, (int, float))
                                     or not self.tol > 0 or self.tol == float("inf")):
            raise ValueError(f"Event tol must be a finite time > 0 (or None: locate to rounding), got {self.tol!r}")
        if (isinstance(self.samples, (bool, np.bool_)) or not isinstance(self.samples, numbers.Integral)
                or self.samples < 0):
            raise ValueError(f"Event samples must be an integer >= 0 (sign checks inside each step; 0: the step's "
                             f"ends only), got {self.samples!r}")
        object.__setattr__(self, "samples", int(self.samples))   # (numpy integers too)

    @property
    def stop_after(self) -> int | None:
        """The occurrence count at which the solve stops, or ``None`` (never)."""
        if isinstance(self.terminal, bool):
            return 1 if self.terminal else None
        return int(self.terminal)


class BooleanCondition:
    """A boolean event condition seen as a real function: ``False -> -1``, ``True -> +1`` (float32, on the value's
    device), so that its turns to True are upward crossings, located by bisection on the dense output as any
    crossing is. ``solve`` wraps an :class:`Event` whose ``fn`` returns booleans at the start (diffrax's boolean
    ``cond_fn``); the event time of such a condition carries no gradient (it has no derivative)."""

    def __init__(self, fn):
        self.fn = fn

    def __call__(self, t, y):
        value = self.fn(t, y)
        value = torch.as_tensor(value)
        if value.dtype != torch.bool:
            raise TypeError(f"the event function returned booleans at the start of the solve and {value.dtype} at "
                            f"t={float(t)!r}: it must return booleans at every call (a boolean condition), or real "
                            "values at every call (their zero crossings are the events)")
        return torch.where(value, 1.0, -1.0).to(torch.float32)


def returns_bool(fn, t0, y0) -> bool:
    """Whether ``fn(t0, y0)`` is a boolean (a Python bool or a tensor of dtype bool); ``y0`` in the user's structure."""
    with torch.no_grad():
        value = fn(torch.as_tensor(t0).detach().reshape(()), pytree.tree_map(torch.detach, y0))
    return isinstance(value, (bool, np.bool_)) or (isinstance(value, torch.Tensor) and value.dtype == torch.bool)


def with_real_conditions(events, t0, y0) -> tuple:
    """``events`` with each boolean condition wrapped in a :class:`BooleanCondition`. Its direction: 0 or 1, the
    turns to True (diffrax's rule: "terminate on the first step on which c becomes True"); -1, the turns to False."""
    real = []
    for event in events:
        if returns_bool(event.fn, t0, y0):
            event = replace(event, fn=BooleanCondition(event.fn), direction=-1 if event.direction == -1 else 1)
        real.append(event)
    return tuple(real)


def steady_state_event(func, *, rtol: float, atol: float, norm=None, terminal=True, name="steady_state") -> "Event":
    """An :class:`Event` at the steady state of ``func``: where ``norm(f(t, y)) <= atol + rtol * norm(y)`` (diffrax's
    ``steady_state_event``), located as a downward zero crossing of the real function
    ``norm(f(t, y)) - (atol + rtol * norm(y))``, so its time is differentiable (implicit function theorem).

    Parameters
    ----------
    func : callable
        The vector field ``func(t, y)`` as given to ``solve`` (close over ``args`` if the solve has them).
    rtol, atol : float
        The thresholds (keyword-only and required: diffrax takes the controller's, which an event cannot see here).
    norm : callable, optional
        ``norm(x) -> scalar tensor`` over a flat vector of every element of the state; default the RMS norm
        (diffrax's).
    terminal : bool or int, default True
        As :class:`Event`'s: stop at the steady state, or record it.

    Each check evaluates ``func`` once (at the step's end: ``samples=0``; the steady state is approached, not
    crossed back and forth), plus about 50 times to locate it. A state already steady at the start is no occurrence
    (a crossing is needed; diffrax stops after the first step there). The event time's gradient reaches the tensors
    ``func`` uses (its parameters, or the tensors a plain function closes over).
    """
    if not callable(func):
        raise TypeError(f"steady_state_event(func, ...) needs the vector field func(t, y), got {type(func).__name__}")
    for label, value in (("rtol", rtol), ("atol", atol)):
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 <= value < float("inf"):
            raise ValueError(f"steady_state_event {label} must be a finite number >= 0, got {value!r}")
    if norm is None:
        def norm(x):
            return x.abs().pow(2).mean().sqrt() if x.numel() else x.new_zeros(())

    def flat(value):
        return torch.cat([torch.as_tensor(leaf).reshape(-1) for leaf in pytree.tree_leaves(value)])

    def distance(t, y):
        return torch.as_tensor(norm(flat(func(t, y)))) - (atol + rtol * torch.as_tensor(norm(flat(y))))

    distance.steady_state = (float(rtol), float(atol))   # (read by ImplicitAdjoint's test at the end)
    return Event(distance, direction=-1, terminal=terminal, name=name, samples=0)


def _check_affect(affect, tol) -> None:
    if not callable(affect):
        raise TypeError(f"Event affect must be callable as affect(t, y) -> new state, got {type(affect).__name__}")
    if not (takes_arguments(affect, 2) or takes_arguments(affect, 3)):
        raise TypeError("Event affect is called as affect(t, y), or affect(t, y, fired) with the bool mask of the "
                        "event function's elements that fired, and returns the new state (or changes y in place and "
                        "returns None); it takes neither two nor three arguments")
    if tol is not None:
        raise ValueError("Event tol cannot be combined with an affect: the state jumps where the event is located, "
                         "so it is located to rounding (a root located within tol would put the jump past it: a "
                         "ball below the ground); leave tol=None")


@dataclass(frozen=True)
class EventRecord:
    """One occurrence of an :class:`Event`: time ``t`` (0-dim tensor), state ``y`` (the state's structure,
    detached: records carry no gradient), ``index`` of the event in ``events``, its ``name`` and the
    ``direction`` of the crossing (+1 upwards, -1 downwards)."""

    t: torch.Tensor
    y: object
    index: int
    name: str | None
    direction: int


def _combined(event_fn, signs):
    def g(t, y):
        value = event_fn(t, y)
        value = torch.as_tensor(value)
        if signs is None:
            return value.reshape(())
        return (value * signs).min()
    return g


def _flat(value, spec):
    """A value of the state's structure (``spec``) as one vector, its tensors in the state's order."""
    try:
        leaves = spec.flatten_up_to(value)
    except (ValueError, TypeError):  # a list for a tuple state (accepted, as torchdiffeq accepts it)
        leaves = pytree.tree_leaves(value)
    return torch.cat([v.reshape(-1) for v in leaves])


class _EventRerouting(torch.autograd.Function):
    @staticmethod
    def forward(ctx, func, event_fn, spec, n_state, event_t, *state_and_params):
        state = state_and_params[:n_state]
        ctx.func, ctx.event_fn, ctx.spec, ctx.n_state = func, event_fn, spec, n_state
        ctx.save_for_backward(event_t, *state_and_params)
        return (event_t.detach().clone(), *[s.detach().clone() for s in state])

    @staticmethod
    def backward(ctx, grad_t, *grad_state):
        if torch.is_grad_enabled():
            raise RuntimeError("second derivatives through an event time are not supported")
        event_t, *rest = ctx.saved_tensors
        state, params = rest[:ctx.n_state], rest[ctx.n_state:]
        with torch.enable_grad():
            t = event_t.detach().requires_grad_(True)
            s = [x.detach().requires_grad_(True) for x in state]
            g = ctx.event_fn(t, pytree.tree_unflatten(s, ctx.spec))
            dg = torch.autograd.grad(g, (t, *s), allow_unused=True, retain_graph=True)
            with torch.no_grad():
                detached = pytree.tree_unflatten([x.detach() for x in s], ctx.spec)
                slope = _flat(ctx.func(t.detach(), detached), ctx.spec)
        dg_dt = torch.zeros_like(event_t) if dg[0] is None else dg[0]
        dg_dy = [torch.zeros_like(x) if d is None else d for d, x in zip(dg[1:], state)]
        grad_t = torch.zeros_like(event_t) if grad_t is None else grad_t
        grad_state = [torch.zeros_like(x) if gs is None else gs for gs, x in zip(grad_state, state)]
        dy_flat = torch.cat([d.reshape(-1) for d in dg_dy])
        gy_flat = torch.cat([g.reshape(-1) for g in grad_state])
        denominator = dg_dt + _real_dot(dy_flat, slope).to(dg_dt.dtype)
        if bool(denominator == 0):
            raise RuntimeError("the event function crosses zero tangentially (dg/dt + dg/dy . f = 0 at the event); "
                               "the event time has no derivative there")
        lam = -(grad_t + _real_dot(gy_flat, slope).to(grad_t.dtype)) / denominator
        param_grads = ()
        if params:
            # Parameters of the event function move the event time: dt_e/dp = -(dg/dp) / (dg/dt + dg/dy . f).
            with torch.enable_grad():
                param_grads = torch.autograd.grad(g, params, lam.detach(), allow_unused=True)
        new_grads = [gs + lam.to(d.dtype) * d for gs, d in zip(grad_state, dg_dy)]
        return (None, None, None, None, None, *new_grads, *param_grads)


def _event_parameters(event_fn) -> tuple:
    """The tensors that move the event time besides the state: an ``nn.Module`` event function's parameters, or those
    a plain function reaches (its closure and globals: a learnable threshold), that require grad."""
    if isinstance(event_fn, torch.nn.Module):
        return tuple(p for p in event_fn.parameters() if p.requires_grad)
    from .gradients.base import _grad_tensors_used_by
    found = []
    for _, value in _grad_tensors_used_by(event_fn):
        found += [p for p in value.parameters() if p.requires_grad] if isinstance(value, torch.nn.Module) else [value]
    unique = {id(p): p for p in found}
    return tuple(unique.values())


def _real_dot(a, b):
    product = a.conj() * b if a.is_complex() else a * b
    return (product.real if product.is_complex() else product).sum()


def reroute_event_gradient(func, event_fn, t0, event_t, ys, signs=None):
    """Attach the implicit-function-theorem gradient to ``(event_t, ys)`` where ``ys[-1]`` is the event state.

    ``t0`` is the start time (for the initial signs of a multi-element event function); ``ys`` has
    shape ``(k, *y0.shape)`` with the state at ``t0`` first, or is a tuple or PyTree of such tensors; returns
    the same structure. ``signs``: the event function's signs just before the crossing (the start of the step
    that fired), which pick the element that fired; ``None``: the signs at ``t0`` (torchdiffeq's
    ``odeint_event``, a first occurrence).
    """
    parts, spec = pytree.tree_flatten(ys)
    start_state = pytree.tree_unflatten([p[0].detach() for p in parts], spec)
    if signs is None:
        with torch.no_grad():
            signs = torch.sign(torch.as_tensor(event_fn(torch.as_tensor(t0).detach().reshape(()), start_state)))
    signs = signs if signs.numel() > 1 else None
    params = _event_parameters(event_fn)
    rerouted = _EventRerouting.apply(func, _combined(event_fn, signs), spec, len(parts), event_t,
                                     *[p[-1] for p in parts], *params)
    new_t, new_state = rerouted[0], rerouted[1:]
    out = [torch.cat([p[:-1], s.unsqueeze(0)]) for p, s in zip(parts, new_state)]
    return new_t, pytree.tree_unflatten(out, spec)
