"""The interface every gradient strategy implements."""

from __future__ import annotations

import functools
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


def collect_parameters(func, adjoint_params) -> tuple:
    """The tensors to differentiate: ``adjoint_params``, or ``func.parameters()`` for an ``nn.Module``.

    Tensors that do not require grad are dropped (they get no gradient, and cost nothing).
    """
    if adjoint_params is None:
        if isinstance(func, torch.nn.Module):
            adjoint_params = tuple(func.parameters())
        else:
            adjoint_params = ()
    elif isinstance(adjoint_params, torch.Tensor):
        adjoint_params = (adjoint_params,)
    else:
        adjoint_params = tuple(adjoint_params)
    for i, p in enumerate(adjoint_params):
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"adjoint_params[{i}] is a {type(p).__name__}; give tensors (e.g. model.parameters())")
    unique, seen = [], set()
    for p in adjoint_params:
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            unique.append(p)
    return tuple(unique)


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
            raise type(error)(f"the adjoint's backward solve failed: {error} (its settings: "
                              f"neuralode.Adjoint(rtol=..., atol=..., options=...), or odeint_adjoint's adjoint_rtol/"
                              f"adjoint_atol/adjoint_options; unset, they are the forward solve's)", error.t) from error
    return wrapped


def no_double_backward(name):
    raise RuntimeError(f"the {name} gradient strategy does not support double backward (create_graph=True); "
                       "use gradient='direct' for higher derivatives through the solve")
