"""torchdiffeq's public API on top of :func:`neuralode.solve`: ``odeint``, ``odeint_adjoint``, ``odeint_event``
and ``odeint_dense`` with torchdiffeq's signatures, defaults (method ``dopri5``) and semantics, so that switching
is one import line. Everything here maps torchdiffeq's arguments (option dicts, ``adjoint_*`` keywords) onto
the objects ``solve`` works with.
"""

from __future__ import annotations

import torch
import torch.utils._pytree as pytree

from .events import reroute_event_gradient, returns_bool
from .gradients import Adjoint, Direct, resolve_gradient
from .options import check_method, check_options
from .solve import _solve


def odeint(func, y0, t, *, rtol=1e-7, atol=1e-9, method=None, options=None, event_fn=None):
    """torchdiffeq-compatible ``odeint``: same signature, semantics and defaults (method ``dopri5``).

    Returns ``ys`` of shape ``(len(t), *y0.shape)`` (a tuple for tuple states); with ``event_fn``,
    returns ``(event_t, ys)`` where ``ys`` holds the state at ``t[0]`` and at the event, and all but the
    first entry of ``t`` only set the direction of time, as in torchdiffeq. Fixed-step methods without
    a ``step_size`` or ``grid_constructor`` step between the output times, as in torchdiffeq.
    """
    return _odeint(func, y0, t, rtol, atol, method, options, event_fn, Direct())


def _odeint(func, y0, t, rtol, atol, method, options, event_fn, strategy):
    spec = check_method("dopri5" if method is None else method)
    options = check_options(spec, options)
    if event_fn is None:
        return _solve(func, y0, t, spec, rtol, atol, options, strategy, None, 0, False, True, False,
                      grid_is_t=True).ys
    if not isinstance(t, torch.Tensor) or t.ndim != 1 or t.numel() != 2:
        raise ValueError("with event_fn, t must hold two times [t0, t1]: t0 starts the solve and t1 only sets "
                         "the direction of time (the solve runs until the event)")
    if not spec.adaptive and options.get("step_size") is None:
        raise ValueError(f"method {spec.name!r} takes fixed steps: to run until an event it needs "
                         "options={'step_size': h}")
    solution = _solve(func, y0, t, spec, rtol, atol, options, strategy, event_fn, 0, False, True, True, grid_is_t=True)
    if solution.event_t is None:
        raise RuntimeError("the event did not occur")  # unreachable: until_event stops only at an event or error
    ys = solution.ys
    stacked = pytree.tree_map(lambda part, event: torch.stack([part[0], event]), ys, solution.event_y)
    return solution.event_t, stacked


def odeint_dense(func, y0, t0, t1, *, rtol=1e-7, atol=1e-9, method=None, options=None):
    """torchdiffeq's ``odeint_dense`` (0.2.5 and master): solve from ``t0`` to ``t1`` and return the dense
    output as a function ``y(t_eval)``.

    ``t_eval`` is a float or a tensor of any shape within ``[t0, t1]``; the result has shape
    ``(*t_eval.shape, *y0.shape)`` (a tuple for tuple states). Differentiable with respect to ``y0`` and the
    field's parameters (direct backpropagation through the solve). torchdiffeq's version accepts only
    ``dopri5`` and single tensors; here any method and tuple states work, with the same default method.
    """
    times = [torch.as_tensor(x).detach().reshape(()) for x in (t0, t1)]
    dtype = times[0].dtype if times[0].is_floating_point() else torch.float64
    first = y0[0] if isinstance(y0, (tuple, list)) and len(y0) else y0
    t = torch.stack([x.to(dtype) for x in times])
    if isinstance(first, torch.Tensor):
        t = t.to(first.device)  # (any other y0 is rejected, with its message, by the solve)
    spec = check_method("dopri5" if method is None else method)
    options = check_options(spec, options)
    solution = _solve(func, y0, t, spec, rtol, atol, options, Direct(), None, 0, True, True, False, grid_is_t=True)
    return solution.evaluate


def odeint_adjoint(func, y0, t, *, rtol=1e-7, atol=1e-9, method=None, options=None, event_fn=None,
                   adjoint_rtol=None, adjoint_atol=None, adjoint_method=None, adjoint_options=None,
                   adjoint_params=None):
    """torchdiffeq-compatible ``odeint_adjoint``: the forward solve of :func:`odeint`, differentiated
    by the adjoint method in constant memory. Backward tolerances and method default to the forward
    ones. The backward error norm is the seminorm of Kidger et al. (2021) by default for explicit methods
    (torchdiffeq's default is the full norm: ask for it with ``adjoint_options={"norm": "full"}``), the full norm
    for implicit and Rosenbrock ones.
    ``adjoint_params`` defaults to ``func.parameters()`` for an ``nn.Module``.
    """
    strategy = resolve_gradient(Adjoint(rtol=adjoint_rtol, atol=adjoint_atol, method=adjoint_method,
                                        options=adjoint_options),
                                adjoint_params=adjoint_params, func=func)
    result = _odeint(func, y0, t, rtol, atol, method, options, event_fn, strategy)
    if event_fn is None:
        return result
    event_t, ys = result
    states = pytree.tree_leaves(ys)
    if not event_t.requires_grad and any(s.requires_grad for s in states):
        # torchdiffeq's event_t is an output of its adjoint function: part of the graph, with a zero
        # gradient (only odeint_event routes a gradient through the event time).
        event_t = _ZeroGradient.apply(event_t, *states)
    return event_t, ys


class _ZeroGradient(torch.autograd.Function):
    """Identity on ``value``, attached to ``anchors`` with a zero gradient."""

    @staticmethod
    def forward(ctx, value, *anchors):
        ctx.n_anchors = len(anchors)
        return value.clone()

    @staticmethod
    def backward(ctx, grad):
        return (None,) * (1 + ctx.n_anchors)


def odeint_event(func, y0, t0, *, event_fn, reverse_time=False, odeint_interface=odeint, **kwargs):
    """torchdiffeq-compatible ``odeint_event``: solve from ``t0`` until ``event_fn(t, y)`` crosses zero.

    Returns ``(event_t, ys)`` with ``ys`` of shape ``(2, *y0.shape)`` (the states at ``t0`` and at the
    event). Gradients flow into ``event_t`` through the implicit function theorem: for
    g(t_e, y(t_e)) = 0, dt_e = -(dg/dy . dy) / (dg/dt + dg/dy . f(t_e, y(t_e))).
    """
    t0 = torch.as_tensor(t0).reshape(-1)[:1]
    step = -1.0 if reverse_time else 1.0
    t = torch.cat([t0, t0.detach() + step])
    event_t, ys = odeint_interface(func, y0, t, event_fn=event_fn, **kwargs)
    if returns_bool(event_fn, t0[0], y0):
        return event_t, ys   # (a boolean condition has no derivative: its time carries no gradient)
    return reroute_event_gradient(func, event_fn, t0[0], event_t, ys)
