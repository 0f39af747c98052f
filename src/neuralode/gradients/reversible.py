"""Reversible backpropagation: the exact gradient of the discrete solve without storing its states.

A reversible method's step has a closed-form inverse (:mod:`neuralode.solvers.reversible`). The forward pass
runs without a graph and keeps the accepted steps' times (two floats a step) and, per output time, the state of
the step that reaches it (as many states as outputs; the backward pass starts from the last returned one). The
backward pass walks the steps from last to first: it rebuilds each step's start from its end by the inverse,
takes the vector-Jacobian product of the step there (with respect to the state, the method's companion and the
parameters) and lets the step's graph go. So the gradient is that of the computed numbers, as backpropagation
through every step gives (:class:`~neuralode.gradients.Direct`), in memory that does not grow with the number of
steps, for about one more forward solve's evaluations plus their vector-Jacobian products. Kidger, Foster, Li and
Lyons (NeurIPS 2021) for reversible Heun; Zhuang et al. (MALI, ICLR 2021) for the asynchronous leapfrog;
McCallum and Foster (arXiv 2410.11648) for reversible Runge-Kutta methods and diffrax's ``ReversibleAdjoint``.

The rebuilt states equal the forward ones up to rounding amplified by the inverse steps, whose spurious mode grows
where the forward solve damped it (growing dynamics; a low coupling over many steps). Where that amplification is
large they drift: the drift is measured at the output times and at ``t0``, where the forward values are known, and
warned about (:class:`_Drift`).
"""

from __future__ import annotations

import bisect
import warnings
from dataclasses import dataclass, field, replace

import torch

from ..integrate import integrate
from .base import GradientStrategy, RunResult, collect_parameters, nan_gradients, no_double_backward


@dataclass(frozen=True)
class ReversibleAdjoint(GradientStrategy):
    """Exact gradients of the discrete solve in O(1) memory, for the reversible methods.

    The methods: ``"reversible_heun"``, ``"alf"`` (fixed steps),
    :class:`~neuralode.solvers.ReversibleRungeKutta` (any explicit Runge-Kutta method made reversible, e.g.
    ``ReversibleRungeKutta("tsit5")``) and the symplectic splitting methods for separable pairs ``(q, p)``
    (``"leapfrog"``, ``"yoshida4"``, ...; :class:`~neuralode.solvers.Symplectic`). Gradients for ``y0``, the
    parameters and the times, as every strategy.

    When to use it: training on long solves where :class:`~neuralode.gradients.Direct` runs out of memory and
    the adjoint's gradient (of the continuous problem, to the backward tolerance) is not accurate enough or
    costs too many backward steps. Its backward pass takes exactly the forward steps, no step-size search.
    When *not* to: strongly growing dynamics, where undoing the steps amplifies rounding (``y' = 10 y`` over [0, 2]:
    the gradient 5.5% off, warned), or stiff ones, which the reversible methods step slowly; use
    :class:`~neuralode.gradients.Checkpoint` with an ordinary method there. Events are not
    supported (nor by diffrax's ``ReversibleAdjoint``), nor double backward; with ``dense=True`` the dense output is
    recorded without a graph (as under the adjoint), which costs O(steps) memory.
    """

    params: tuple = field(default=(), repr=False)

    def bind(self, func, adjoint_params):
        return replace(self, params=collect_parameters(func, adjoint_params, "reversible"))

    def run(self, problem, stepper, control, **kwargs) -> RunResult:
        if not getattr(stepper, "reversible", False):
            raise ValueError(f"gradient='reversible' needs a reversible method: 'reversible_heun', 'alf', "
                             f"neuralode.solvers.ReversibleRungeKutta('tsit5') (any explicit Runge-Kutta method made "
                             f"reversible) or, for a separable pair (q, p), a symplectic one ('leapfrog', 'yoshida4', "
                             f"...); method {problem.method!r} is not one. For exact gradients with another "
                             "method use gradient='checkpoint'")
        options = kwargs["options"]
        unsupported = [name for name, used in (
            ("events", bool(kwargs.get("events")) or kwargs.get("until_event")),
            ("option 'jump_t' (each jump starts the method afresh, which cannot be undone)", options.get("jump_t")))
            if used]
        if unsupported:
            raise ValueError(f"gradient='reversible' does not support {', '.join(unsupported)}; use "
                             "gradient='direct' or 'checkpoint' (with an ordinary method) for these")
        box = []
        outputs = _ReversibleSolve.apply(self, problem, stepper, control, kwargs, box, problem.y0, *self.params)
        return RunResult(outputs, box[0])


class _StepRecord:
    """``on_accept``: the accepted steps' end times (internal) and, for each output time after the first, the state
    (with the method's companion) at the end of the step that reaches it: ``covering[i - 1] = (steps, y, state)``.
    The backward pass starts from the one of the last output returned, which is not the last step's when a solve
    failed with ``throw=False`` (the state there may be NaN) or a fixed grid's outputs stop at a non-finite value.
    One state per output time, as the outputs themselves."""

    def __init__(self, output_taus):
        self.ends, self.covering, self.output_taus = [], [], output_taus

    def __call__(self, tau1, y1, state):
        self.ends.append(tau1)
        while len(self.covering) < len(self.output_taus) and self.output_taus[len(self.covering)] <= tau1:
            self.covering.append((len(self.ends), y1, state))


class _Drift:
    """How far the rebuilt states stray from the forward ones where both are known (the output times that are step
    ends, and t0), in units of the forward tolerance ``atol + rtol |y|``; warned above ``LIMIT``, the adjoint's.
    Measured in float64 at rtol 1e-6: 1e-10 to 1e-8 (an MLP, three methods); Van der Pol (mu = 1, t in [0, 10],
    ReversibleRungeKutta("tsit5")) 6e2 to 1.2e3 with couplings 0.999 to 0.9, the gradient within 1.3e-5 of
    backpropagation's, and 3e7 with coupling 0.7, the gradient 18% off (0.5: NaN)."""

    LIMIT = 1e4

    def __init__(self, problem, n_steps: int):
        self.problem = problem
        self.worst, self.where = 0.0, None
        # Rounding alone moves the rebuilt states by up to about eps a step: with the default rtol (1e-7) a float32
        # solve of 1e4 steps drifted 1e4 tolerances with its gradient 4e-6 from backpropagation's (QA round), so the
        # relative scale is at least n_steps eps (float64 at 1e4 steps: 2e-12, below any rtol in use).
        real = problem.y0.real.dtype if problem.y0.is_complex() else problem.y0.dtype
        self.rtol = torch.clamp(torch.as_tensor(problem.rtol, dtype=real, device=problem.y0.device),
                                min=max(n_steps, 1) * torch.finfo(real).eps)

    def check(self, rebuilt, forward, t) -> None:
        if not forward.numel():
            return
        scale = self.problem.atol + self.rtol * forward.abs()
        ratio = float(((rebuilt - forward).abs() / scale).max())
        if not ratio <= self.worst:   # (NaN counts as the worst)
            self.worst, self.where = ratio, t

    def warn(self) -> None:
        if self.worst <= self.LIMIT:
            return
        warnings.warn(f"gradient='reversible' rebuilt y(t) {self.worst:.3g} times the tolerance away from the forward "
                      f"solution (at t={self.where}): undoing the steps amplified rounding (the dynamics contract "
                      "strongly, or the steps are long for them), and the gradients are those of a different "
                      "trajectory. Use smaller steps (a tighter rtol, or max_step), float64, a ReversibleRungeKutta "
                      "with a coupling below 1, or gradient='checkpoint' with an ordinary method",
                      UserWarning, stacklevel=3)


class _ReversibleSolve(torch.autograd.Function):
    @staticmethod
    def forward(ctx, strategy, problem, stepper, control, kwargs, box, y0, *params):
        record = _StepRecord([problem.direction * t for t in problem.times[1:]])
        forward_problem = replace(problem, y0=y0.detach(), f0=None if problem.f0 is None else problem.f0.detach())
        with torch.no_grad():
            integration = integrate(forward_problem, stepper, control, on_accept=record, **kwargs)
        box.append(integration)
        ctx.strategy, ctx.problem, ctx.stepper, ctx.options = strategy, problem, stepper, kwargs["options"]
        ctx.record, ctx.integration = record, integration
        outputs = torch.stack(integration.outputs)
        ctx.save_for_backward(outputs)
        return outputs

    @staticmethod
    def backward(ctx, grad_outputs):
        if torch.is_grad_enabled():
            no_double_backward("reversible")
        (outputs,) = ctx.saved_tensors
        problem, stepper, record, integration = ctx.problem, ctx.stepper, ctx.record, ctx.integration
        params = ctx.strategy.params
        if not bool(torch.isfinite(grad_outputs).all()):
            return (None,) * 6 + nan_gradients(outputs.shape[1:], outputs.dtype, outputs.device, params)
        field, direction = problem.field, problem.direction
        nfe_before = field.nfe
        returned = len(integration.outputs)
        steps, last = (0, None) if returned < 2 else (record.covering[returned - 2][0], record.covering[returned - 2])
        taus = [direction * problem.times[0]] + record.ends[:steps]   # step k runs from taus[k] to taus[k + 1]
        # Where each output is: on a step end (all of its cotangent there), or inside the step from taus[j - 1] to
        # taus[j]. A linear dense output, y = y_{j-1} + theta (y_j - y_{j-1}) as the loop computed it, splits the
        # cotangent between the two ends; another goes to the method's reverse step with its theta (``interior``).
        cotangent_at = {}
        on_step_end = {}
        interior = {}
        # (a fixed grid interpolates linearly with interp='linear', its default, whatever the method's dense output)
        linear = stepper.linear_dense or ctx.options.get("interp", "cubic") == "linear"

        def add(k, value):
            cotangent_at[k] = value if k not in cotangent_at else cotangent_at[k] + value

        add(0, grad_outputs[0])
        for i in range(1, len(integration.outputs)):
            tau = direction * integration.output_times[i]
            j = bisect.bisect_left(taus, tau, 1)
            if taus[j] == tau:
                add(j, grad_outputs[i])
                on_step_end[j] = i
            else:
                theta = (tau - taus[j - 1]) / (taus[j] - taus[j - 1])
                if linear:
                    add(j, theta * grad_outputs[i])
                    add(j - 1, (1 - theta) * grad_outputs[i])
                else:
                    interior.setdefault(j - 1, []).append((theta, grad_outputs[i]))
        drift = _Drift(problem, steps)
        param_grads = [torch.zeros_like(p) for p in params]
        if steps == 0:
            y, carry = outputs[0], None
            cot_y = cotangent_at.get(0, torch.zeros_like(outputs[0]))
        else:
            _, y, state = last
            carry = stepper.reverse_begin(field, y, state)
            cot_y = torch.zeros_like(y)
            cot_carry = stepper.zero_cotangent(y)
            starts = [direction * tau for tau in taus[:-1]]
            lengths = [direction * (b - a) for a, b in zip(taus, taus[1:])]
            for k in range(steps - 1, -1, -1):
                if k + 1 in cotangent_at:
                    cot_y = cot_y + cotangent_at[k + 1]
                # The start's companion was evaluated at the previous step's t0 + h (the first: at t0 itself).
                t_start = starts[k - 1] + lengths[k - 1] if k > 0 else problem.times[0]
                y, carry, cot_y, cot_carry, grads = stepper.reverse_step(
                    field, starts[k], lengths[k], t_start, y, carry, cot_y, cot_carry, params, fresh=k == 0,
                    interior=interior.get(k, ()))
                for g, total in zip(grads, param_grads):
                    total.add_(g)
                if k in on_step_end:
                    drift.check(y, outputs[on_step_end[k]], integration.output_times[on_step_end[k]])
            cot_y = cot_y + cotangent_at.get(0, 0)
            cot_y, grads = stepper.reverse_end(field, problem.times[0], y, carry, cot_y, cot_carry, params)
            for g, total in zip(grads, param_grads):
                total.add_(g)
        drift.check(y.detach(), outputs[0], problem.times[0])
        drift.warn()
        stats = integration.stats
        stats["nfe_backward"] = stats.get("nfe_backward", 0) + field.nfe - nfe_before
        stats["reversible_drift"] = drift.worst
        field.nfe = nfe_before
        return (None, None, None, None, None, None, cot_y, *param_grads)
