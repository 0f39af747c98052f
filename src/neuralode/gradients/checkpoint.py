"""Checkpointing: the exact gradient of the discrete solve in sub-linear memory.

Scheme (online square-root checkpointing): the forward pass runs without a graph and keeps the
state at every K-th accepted step; whenever more than 2K states are held, K doubles and every other
one is dropped, so at most ~2 sqrt(2N) states are ever held for N steps. All step times are kept
too (N floats). The backward pass walks the segments from last to first: it replays each segment's
recorded steps as a fixed grid *with* a graph (the same stepper and the same step sizes, hence the
same numbers), backpropagates through that segment only, and frees it.

Costs: memory O(sqrt(N)) states plus one segment's graph (O(sqrt(N)) steps); compute: one extra
forward solve (every accepted step is evaluated twice), no extra rejected steps. Multistep methods
(``adams``, ``explicit_adams``) carry a history that a restart would change, so they are refused.
"""

from __future__ import annotations

import bisect

from dataclasses import dataclass, field, replace

import torch

from ..controllers import FixedGrid
from ..integrate import integrate
from ..problem import Problem
from .base import GradientStrategy, RunResult, collect_parameters, no_double_backward


@dataclass(frozen=True)
class Checkpoint(GradientStrategy):
    """Exact discrete gradients with O(sqrt(steps)) memory and one extra forward solve."""

    params: tuple = field(default=(), repr=False)

    def bind(self, func, adjoint_params):
        return replace(self, params=collect_parameters(func, adjoint_params, "checkpoint"))

    def run(self, problem, stepper, control, **kwargs) -> RunResult:
        if not stepper.replayable:
            kind = "is multistep"
            if stepper.reversible:
                kind = ("carries a companion state across steps that a replay from a stored y would not have; its "
                        "exact gradient in O(1) memory is gradient='reversible'")
            kind = {"scipy_solver": "hands the whole span to scipy",
                    "auto": "switches between methods along the solve, so a replay from a checkpoint would not "
                            "take the same steps (use method='kvaerno5' or 'radau5')"}.get(problem.method, kind)
            raise ValueError(f"gradient='checkpoint' supports the Runge-Kutta methods; method "
                             f"{problem.method!r} {kind}: use gradient='direct' or 'adjoint'")
        box = []
        outputs = _CheckpointSolve.apply(self, problem, stepper, control, kwargs, box, problem.y0, *self.params)
        return RunResult(outputs, box[0])


class _Checkpoints:
    """The online square-root thinning of stored states."""

    def __init__(self, tau0, y0):
        self.every = 1
        self.count = 0                    # accepted steps so far
        self.step_ends = []               # tau after each accepted step
        self.saved = [(0, tau0, y0)]      # (step index, tau, state)

    def __call__(self, tau1, y1, state):
        self.count += 1
        self.step_ends.append(tau1)
        if self.count % self.every == 0:
            self.saved.append((self.count, tau1, y1))
            if len(self.saved) > 2 * self.every + 1:
                self.every *= 2
                self.saved = [s for s in self.saved if s[0] % self.every == 0]


class _CheckpointSolve(torch.autograd.Function):
    @staticmethod
    def forward(ctx, strategy, problem, stepper, control, kwargs, box, y0, *params):
        checkpoints = _Checkpoints(problem.direction * problem.times[0], y0.detach())
        forward_problem = replace(problem, y0=y0.detach(), f0=None if problem.f0 is None else problem.f0.detach())
        with torch.no_grad():
            integration = integrate(forward_problem, stepper, control, on_accept=checkpoints, **kwargs)
        box.append(integration)
        ctx.strategy, ctx.problem, ctx.stepper, ctx.kwargs = strategy, problem, stepper, kwargs
        ctx.integration, ctx.checkpoints = integration, checkpoints
        return torch.stack(integration.outputs)

    @staticmethod
    def backward(ctx, grad_outputs):
        if torch.is_grad_enabled():
            no_double_backward("checkpoint")
        problem, integration, checkpoints = ctx.problem, ctx.integration, ctx.checkpoints
        params = ctx.strategy.params
        direction = problem.direction
        output_taus = [direction * t for t in integration.output_times]
        options = dict(ctx.kwargs["options"])
        field = problem.field
        nfe_before = field.nfe
        # Only the steps up to the one that reaches the last output returned: after a failure with throw=False (a
        # fixed grid accepts steps into NaN) the later ones carry no cotangent and would fail their replay.
        step_ends = checkpoints.step_ends
        needed = bisect.bisect_left(step_ends, output_taus[-1]) + 1 if len(output_taus) > 1 else 0
        step_ends = step_ends[:needed]
        saved = [entry for entry in checkpoints.saved if entry[0] <= len(step_ends)]
        # Gradient flowing into the state at the end of the segment being processed.
        carry = torch.zeros_like(grad_outputs[0])
        param_grads = [torch.zeros_like(p) for p in params]
        # Segment boundaries: the saved states, then the last accepted step.
        bounds = list(saved)
        if bounds[-1][0] != len(step_ends):
            bounds.append((len(step_ends), step_ends[-1] if step_ends else bounds[0][1], None))
        for (k0, tau0, y_start), (k1, tau1, _) in reversed(list(zip(bounds, bounds[1:]))):
            grid = (tau0,) + tuple(step_ends[k0:k1])
            inside = [i for i, tau in enumerate(output_taus) if tau0 < tau <= tau1]
            times = [direction * tau0] + [integration.output_times[i] for i in inside]
            end_is_output = bool(inside) and output_taus[inside[-1]] == tau1
            if not end_is_output:
                times.append(direction * tau1)
            with torch.enable_grad():
                start = y_start.detach().requires_grad_(True)
                segment = Problem(field=field, y0=start, f0=None, t=None, times=times, direction=direction,
                                  shapes=problem.shapes, rtol=problem.rtol, atol=problem.atol, method=problem.method)
                replay = integrate(segment, ctx.stepper, FixedGrid(grid), options=options)
                values = replay.outputs[1:]
                cotangents = [grad_outputs[i] for i in inside]
                if end_is_output:
                    cotangents[-1] = cotangents[-1] + carry
                else:
                    cotangents.append(carry)
                grads = torch.autograd.grad(values, (start,) + params, cotangents, allow_unused=True)
            carry = grads[0] if grads[0] is not None else torch.zeros_like(carry)
            for j, g in enumerate(grads[1:]):
                if g is not None:
                    param_grads[j] += g
        grad_y0 = carry + grad_outputs[0]
        stats = integration.stats
        stats["nfe_backward"] = stats.get("nfe_backward", 0) + field.nfe - nfe_before
        field.nfe = nfe_before
        return (None, None, None, None, None, None, grad_y0, *param_grads)
