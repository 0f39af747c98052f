"""The interface every gradient strategy implements."""

from __future__ import annotations

import functools
import inspect
import warnings
from dataclasses import dataclass

import torch

from .._errors import SolverError


@dataclass
class RunResult:
    """``outputs``: (T, *state) tensor of states at ``integration.output_times`` (the event state last,
    if an event fired); ``integration``: the loop's :class:`~neuralode.integrate.Integration`."""

    outputs: torch.Tensor
    integration: object


class GradientStrategy:
    """A way of differentiating one solve. Subclasses are frozen dataclasses."""

    def bind(self, func, adjoint_params):
        return self

    def run(self, problem, stepper, control, **integrate_kwargs) -> RunResult:
        raise NotImplementedError


def collect_parameters(func, adjoint_params, strategy: str = "adjoint") -> tuple:
    """The tensors to differentiate: ``adjoint_params``, or ``func.parameters()`` for an ``nn.Module``.

    Tensors that do not require grad are dropped (they get no gradient, and cost nothing). A plain function
    without ``adjoint_params`` differentiates nothing but ``y0`` and ``t``; where it visibly uses tensors that
    require grad (:func:`_grad_tensors_used_by`) that would leave them without a gradient, silently, so it is a
    ``ValueError`` while grad is enabled (torchdiffeq refuses every plain function without ``adjoint_params``).
    """
    plain = func is not None and not isinstance(func, torch.nn.Module) and torch.is_grad_enabled()
    named = "gradient=neuralode.ImplicitAdjoint()" if strategy == "implicit" else f"gradient={strategy!r}"
    # A module's plain-function parts (a SplitField's lambda terms): its parameters miss the tensors they close over.
    parts = _plain_parts(func) if torch.is_grad_enabled() else []
    if adjoint_params is None:
        if isinstance(func, torch.nn.Module):
            adjoint_params = tuple(func.parameters())
            known = {id(p) for p in adjoint_params}
            for label, part in parts:
                used = [name for name, value in _grad_tensors_used_by(part)
                        if not (isinstance(value, torch.Tensor) and id(value) in known)]
                if used:
                    raise ValueError(
                        f"the {label} is a plain function, so {named} differentiates only the module's parameters "
                        f"or adjoint_params, and it uses {', '.join(used)}, which require grad: they would get no "
                        "gradient. Pass adjoint_params (the tensors of every term), or make the term an nn.Module")
        else:
            used = [name for name, _ in _grad_tensors_used_by(func)] if plain else []
            if used:
                raise ValueError(
                    f"func is not an nn.Module, so {named} differentiates only the tensors in "
                    f"adjoint_params, and func uses {', '.join(used)}, which require grad: they would get no gradient. "
                    "Pass them, e.g. adjoint_params=(W,) or tuple(model.parameters()), or adjoint_params=() if they "
                    "need none (or give the nn.Module itself as func)")
            adjoint_params = ()
    elif isinstance(adjoint_params, torch.Tensor):
        adjoint_params = (adjoint_params,)
    else:
        adjoint_params = tuple(adjoint_params)
    for i, p in enumerate(adjoint_params):
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"adjoint_params[{i}] is a {type(p).__name__}; give tensors (e.g. model.parameters())")
    if (plain or parts) and adjoint_params:
        # Given adjoint_params, a tensor the function uses and they leave out gets no gradient (torchdiffeq's rule,
        # and a way to freeze one): said, not silent (a copied block's adjoint_params are copies its closure never
        # reads, and every gradient was then zero). Tensors only: a module the function reaches may be called with
        # other parameters (torch.func.functional_call with adjoint_params as its values).
        given = {id(p) for p in adjoint_params}
        left_out = [name for part in ([func] if plain else [part for _, part in parts])
                    for name, value in _grad_tensors_used_by(part)
                    if isinstance(value, torch.Tensor) and id(value) not in given]
        if left_out:
            warnings.warn(f"func uses {', '.join(left_out)}, which require grad but are not in adjoint_params: "
                          f"{named} gives them no gradient. Add them to adjoint_params, or set "
                          "requires_grad=False on what should not train", UserWarning, stacklevel=2)
    unique, seen = [], set()
    for p in adjoint_params:
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            unique.append(p)
    return tuple(unique)


def _plain_parts(func) -> list:
    """``(label, function)`` of the plain functions inside a module ``func`` that the solve calls: a
    :class:`~neuralode.SplitField`'s terms that are not modules."""
    from ..split_field import SplitField
    if not isinstance(func, SplitField):
        return []
    return [(f"SplitField's {label} term", term) for label, term in (("explicit", func.explicit),
                                                                      ("implicit", func.implicit))
            if not isinstance(term, torch.nn.Module)]


# How deep _grad_tensors_used_by follows functions into the functions they reach: an event function that calls the
# field, which closes over a learnable rate (steady_state_event's), is two levels; three leaves room for a helper.
_FUNCTION_DEPTH = 3
# Library code is not looked into: its globals and closures hold no tensor of the user's (and are many).
_LIBRARIES = ("torch", "numpy", "scipy", "functools", "builtins")


def _grad_tensors_used_by(func) -> list:
    """``(name, value)`` of the tensors requiring grad (and modules with such parameters) that a plain function reaches:
    its closure, the globals its code names, its default arguments, a ``functools.partial``'s arguments and a bound
    method's object, and the same of the plain functions found there (``_FUNCTION_DEPTH`` levels: an event function
    that calls the field, which closes over a learnable rate, reaches it). A callable object that is not a function
    is not looked into, nor is library code."""
    found, explored = [], set()

    def visit(name, value, level):
        if isinstance(value, torch.Tensor):
            if value.requires_grad:
                found.append((name, value))
        elif isinstance(value, torch.nn.Module):
            if any(p.requires_grad for p in value.parameters()):
                found.append((f"{name} (an nn.Module: its parameters)", value))
        elif level < _FUNCTION_DEPTH and (inspect.isfunction(value) or inspect.ismethod(value)
                                          or isinstance(value, functools.partial)):
            module = getattr(value, "__module__", None) or ""
            if module.split(".")[0] not in _LIBRARIES:
                explore(value, f"{name}.", level + 1)

    def explore(target, prefix, level):
        if id(target) in explored:
            return
        explored.add(id(target))
        if isinstance(target, functools.partial):
            for i, value in enumerate(target.args):
                visit(f"{prefix}partial argument {i}", value, level)
            for name, value in target.keywords.items():
                visit(prefix + name, value, level)
            target = target.func
        if inspect.ismethod(target):
            visit(f"{prefix}{type(target.__self__).__name__} (the method's object)", target.__self__, level)
            target = target.__func__
        code = getattr(target, "__code__", None)
        if code is None:
            return
        for name, cell in zip(code.co_freevars, getattr(target, "__closure__", None) or ()):
            try:
                visit(prefix + name, cell.cell_contents, level)
            except ValueError:       # (a cell not yet filled)
                pass
        namespace = getattr(target, "__globals__", {})
        for name in code.co_names:
            if name in namespace:
                visit(prefix + name, namespace[name], level)
        for i, value in enumerate(getattr(target, "__defaults__", None) or ()):
            visit(f"{prefix}default argument {i}", value, level)

    explore(func, "", 0)
    unique = {}
    for name, value in found:
        unique.setdefault(id(value), (name, value))   # (one tensor reached along two paths is named once)
    return list(unique.values())


def nan_gradients(y0_shape, dtype, device, params) -> tuple:
    """NaN gradients for ``y0`` and every parameter: what a backward pass returns for an infinite or NaN incoming
    gradient (an overflowed loss under a loss scaler such as torch.amp.GradScaler, which then skips the step). No
    backward solve can carry one (its step size collapses, and the solve blamed the vector field), and
    backpropagation through the steps would give non-finite gradients too."""
    nan = float("nan")
    return (torch.full(y0_shape, nan, dtype=dtype, device=device), *(torch.full_like(p, nan) for p in params))


def names_the_backward_solve(backward):
    """Wrap an adjoint ``Function.backward`` so that a solver failure says it came from the backward solve.

    Raised from ``loss.backward()``, a ``MaxStepsError`` reading like the forward solve's sent users to the forward
    settings; the backward solve has its own (``Adjoint(options=...)``, ``adjoint_options``). Same class, same ``t``.
    """
    @functools.wraps(backward)
    def wrapped(ctx, *grad_outputs):
        try:
            return backward(ctx, *grad_outputs)
        except SolverError as error:
            # (the per-sample function also runs the per-sample checkpoint replay, which has no settings of its own)
            if getattr(getattr(ctx, "run", None), "strategy_name", "adjoint") != "adjoint":
                raise type(error)(f"the checkpoint replay of the backward pass failed: {error}", error.t) from error
            strategy = getattr(ctx, "strategy", None)
            if getattr(strategy, "interpolate", False):
                remedy = ""
            else:
                # A backsolve re-integrates y backwards: on stiff or strongly contracting dynamics y drifts away from
                # the forward solution (Robertson's y reached 6e4 where it is at most 1) and the step collapses,
                # whatever the settings. The message blamed only the vector field and the tolerances.
                # (the per-sample adjoint, whose ctx has no strategy, has no interpolating variant)
                fixes = ("gradient='checkpoint' backpropagates through the forward steps instead" if strategy is None
                         else "neuralode.Adjoint(interpolate=True) takes y from the forward solve instead, and "
                              "gradient='checkpoint' backpropagates exactly")
                remedy = ("; if the forward solve succeeded, the likely cause is y re-integrated backwards leaving "
                          f"the forward solution (stiff or strongly contracting dynamics): {fixes}")
            raise type(error)(f"the adjoint's backward solve failed: {error} (its settings: "
                              f"neuralode.Adjoint(rtol=..., atol=..., options=...), or odeint_adjoint's adjoint_rtol/"
                              f"adjoint_atol/adjoint_options; unset, they are the forward solve's{remedy})",
                              error.t) from error
    return wrapped


def no_double_backward(name):
    raise RuntimeError(f"the {name} gradient strategy does not support double backward (create_graph=True); "
                       "use gradient='direct' for higher derivatives through the solve")
