"""The adjoint method for per-sample stepping (``solve(..., per_sample=True, gradient="adjoint")``).

The forward solve keeps no graph. Backward, from the last output time to the first (each sample its own), the
augmented state ``z = (y, a)`` of every sample is solved backwards in time by the per-sample loop,

    dy/dt = f(t, y),        da/dt = -a^T df/dy,

each sample with its own steps (Chen et al. 2018, Sec. 2 and Appendix B; y is recomputed backwards, as in
torchdiffeq's ``odeint_adjoint``). For adaptive methods it is one solve whose steps land on every output time
of the sample, where y is reset to its forward value and ``dL/dy(t_k)`` is added to ``a`` while the step size
carries on (no restart, no new starting-step estimate); fixed-step methods solve interval by interval. The parameter adjoint ``a_theta(t) = -int a^T df/dtheta dt`` cannot be part of a per-sample
state (it would be ``batch x n_params``), and it does not steer the steps anyway (the seminorm of Kidger et al.
2021, this library's default). Its increment over an accepted Runge-Kutta step is the method's own quadrature,
``h sum_i b_i (-a_i^T df/dtheta(t_i, y_i))``, and because a vector-Jacobian product is linear in its cotangent,
the sum over the samples of those increments is one vector-Jacobian product of the stage evaluations with the
cotangents ``-h_b b_i a_{b,i}`` (zero for samples whose step was rejected). So after every attempted step the
stage states are rebuilt from the stages, the field is evaluated there once more with a graph, and one
backward pass adds the step's parameter gradient for the whole batch. That is exactly the Runge-Kutta solution
of the full augmented system with the parameter part left out of error control.

Cost: the backward solve's evaluations of the augmented field (one evaluation and one vector-Jacobian product
with respect to y each) plus, per attempted step, one evaluation per stage with a nonzero weight and one
backward pass with respect to the parameters. Memory: one step's graph at a time.
"""

from __future__ import annotations

import math

import torch

from ..per_sample import PerSampleField, PerSampleNorm, integrate_per_sample
from ..solvers.runge_kutta import linear_combination
from .base import nan_gradients, names_the_backward_solve


class PerSampleAdjointRun:
    """Everything the backward pass needs (built by :func:`neuralode.solve.solve`)."""

    def __init__(self, func, params, stepper, control, step_size, taus, direction, rtol, atol, stats, throw):
        self.func, self.params = func, tuple(params)
        self.stepper, self.control, self.step_size = stepper, control, step_size
        self.taus, self.direction = taus, direction
        self.rtol, self.atol, self.stats, self.throw = rtol, atol, stats, throw

    def backward(self, outputs: torch.Tensor, grad_outputs: torch.Tensor):
        """``dL/dy0`` and ``dL/dtheta`` from ``dL/d outputs`` (both shaped ``(n, batch, *shape)``; the gradients of
        outputs a failed sample never reached are zero). Each sample is solved back from its last output with a
        nonzero gradient: a failed sample from at most its last reached output, and a sample the loss leaves
        out not at all (its backward solve could only fail, and make every parameter's gradient NaN)."""
        n, batch = outputs.shape[:2]
        samples = torch.arange(batch, device=outputs.device)
        output_index = torch.arange(n, device=outputs.device).unsqueeze(1)
        wanted = (grad_outputs.reshape(n, batch, -1) != 0).any(dim=2)                               # (n, batch)
        last = (wanted * output_index).amax(dim=0)                  # the last output with a gradient; 0 if none
        if bool((last == n - 1).all()):
            last = None                                             # (the usual case: every sample from the end)
        else:
            # Past its last needed output a sample's outputs may be NaN (unreached): that state stands in for them.
            mask = (output_index <= last).view(n, batch, *([1] * (outputs.ndim - 2)))
            outputs = torch.where(mask, outputs, outputs[last, samples].unsqueeze(0))
        state_shape = outputs.shape[1:]
        times = self.direction * self.taus                                   # (batch, n), real time
        a_params = [torch.zeros_like(p) for p in self.params]
        real = outputs.real.dtype if outputs.is_complex() else outputs.dtype
        field = PerSampleField(_AugmentedField(self.func, state_shape), None, None, real, outputs.device,
                               outputs.dtype, outputs.dtype)
        hook = _ParameterQuadrature(self.func, self.params, self.stepper, state_shape, a_params)
        flat = batch, -1

        def pack(y, a):
            return torch.cat([y.reshape(flat), a.reshape(flat)], dim=1)

        def run(span, z0, jump=None, start=None):
            begin = span[:, 0] if start is None else span.gather(1, start.unsqueeze(1)).squeeze(1)
            f0 = field(begin.reshape(batch, 1), z0)
            with torch.no_grad():
                ends, stats, error = integrate_per_sample(
                    field, self.stepper, self.control, z0, f0, -self.direction * span, -self.direction,
                    PerSampleNorm(self.rtol, self.atol), step_size=self.step_size, throw=self.throw,
                    on_step=hook if self.params else None, jump=jump, start=start)
            self.stats["n_iterations_backward"] = self.stats.get("n_iterations_backward", 0) + stats["n_iterations"]
            if error is not None:
                # (throw=False) A sample whose backward solve failed has NaN gradients (its ends are NaN), and so has
                # every parameter: its quadrature lacks the rest of that sample's integral, a silently wrong sum.
                for total in a_params:
                    total.fill_(math.nan)
            return ends

        half = outputs[0].numel() // batch
        if n == 1:
            # Only the start time: y(t0) is y0 itself, nothing to integrate back.
            return grad_outputs[0], a_params
        if self.control is not None:
            # Adaptive: one backward solve from t_{n-1} to t_0 whose steps land on every sample's output times,
            # where y is reset to its forward value and dL/dy(t_k) is added to a (the step size carries on).
            span = times.flip(1)
            reverse = torch.arange(n - 1, -1, -1, device=outputs.device)

            def jump(z, columns, landed):
                k = reverse[columns.clamp_max(n - 1)]          # forward index of the output each sample landed on
                y_k = outputs[k, samples].reshape(flat)
                a = z[:, half:] + grad_outputs[k, samples].reshape(flat)
                return torch.cat([y_k, a], dim=1)

            if last is None:
                ends = run(span, pack(outputs[-1], grad_outputs[-1]), jump)
            else:
                # Each sample from its last needed output (column n-1-last of the reversed times), dL/dy there
                # already in a; a sample that needs only y0 starts at the end and takes dL/dy0 below.
                a_last = torch.where((last > 0).view(batch, *([1] * (outputs.ndim - 2))),
                                     grad_outputs[last, samples], torch.zeros_like(grad_outputs[0]))
                ends = run(span, pack(outputs[last, samples], a_last), jump, start=n - 1 - last)
            a = ends[-1][:, half:].reshape(state_shape) + grad_outputs[0]
        else:
            # A fixed grid: one backward solve per interval t_k -> t_{k-1}, restarted at each output time.
            a = grad_outputs[-1]
            for k in range(n - 1, 0, -1):
                span, skip = torch.stack([times[:, k], times[:, k - 1]], dim=1), None
                if last is not None:
                    # A sample whose last needed output is before t_k starts this interval done, keeping its a;
                    # its one evaluation is at that output's time and state, where the field is defined.
                    skip = last < k
                    t_last = times.gather(1, last.unsqueeze(1)).expand(-1, 2)
                    span, skip = torch.where(skip.unsqueeze(1), t_last, span), skip.long()
                ends = run(span, pack(outputs[k], a), start=skip)
                a = ends[-1][:, half:].reshape(state_shape) + grad_outputs[k - 1]
        self.stats["nfe_backward"] = self.stats.get("nfe_backward", 0) + field.nfe + hook.nfe
        return a, a_params


class _AugmentedField:
    """``(t, z = (y, a)) -> (f(t, y), -a^T df/dy)`` for a batch of flat augmented states ``(batch, 2 n)``."""

    def __init__(self, func, state_shape):
        self.func, self.state_shape = func, state_shape

    def __call__(self, t, z):
        half = z.shape[1] // 2
        y, a = z[:, :half].reshape(self.state_shape), z[:, half:].reshape(self.state_shape)
        with torch.enable_grad():
            y = y.detach().requires_grad_(True)
            f = self.func(t, y)
            (vjp,) = torch.autograd.grad(f, y, a, allow_unused=True)
        vjp = torch.zeros_like(y) if vjp is None else vjp
        batch = z.shape[0]
        return torch.cat([f.detach().reshape(batch, -1), -vjp.reshape(batch, -1)], dim=1)


class _ParameterQuadrature:
    """After each attempted backward step: add the accepted samples' ``h sum_i b_i (-a_i^T df/dtheta)`` to the
    parameter adjoint, as one vector-Jacobian product over the step's stages (see the module docstring)."""

    def __init__(self, func, params, stepper, state_shape, a_params):
        self.func, self.params, self.stepper, self.state_shape = func, params, stepper, state_shape
        self.a_params = a_params
        self.rows = stepper.stage_rows                       # (c_i, nonzero a_ij) for every stage
        self.weights = stepper.weights                       # nonzero b_i
        self.nfe = 0

    def __call__(self, t0, h, z0, outcome, accepted):
        if not bool(accepted.any()):
            return
        ks, batch = outcome.stages, z0.shape[0]
        half = z0.shape[1] // 2
        real = z0.real.dtype if z0.is_complex() else z0.dtype
        keep = accepted.view(batch, 1)
        values, cotangents = [], []
        with torch.enable_grad():
            for i, b in self.weights:
                c, terms = self.rows[i]
                zi = z0 if not terms else linear_combination(z0, h, ks, terms)
                # A rejected sample's stages may not be finite: it is evaluated at its start state with a zero
                # cotangent (by where, not by multiplying: 0 * NaN would make every parameter's gradient NaN).
                y = torch.where(keep, zi[:, :half], z0[:, :half]).reshape(self.state_shape).detach()
                values.append(self.func((t0 + c * h).reshape(-1).to(real), y))
                cotangent = torch.where(keep, zi[:, half:] * (-(h * b).to(real)), torch.zeros_like(zi[:, half:]))
                cotangents.append(cotangent.reshape(self.state_shape))
            self.nfe += len(values)
            grads = torch.autograd.grad(values, self.params, cotangents, allow_unused=True)
        for total, grad in zip(self.a_params, grads):
            if grad is not None:
                total.add_(grad)


class PerSampleAdjointFunction(torch.autograd.Function):
    """Identity on the (already computed, graph-free) outputs whose backward runs the per-sample adjoint."""

    @staticmethod
    def forward(ctx, run, outputs, y0, *params):
        ctx.run = run
        ctx.y0_like = (y0.shape, y0.dtype, y0.device)
        ctx.params = params
        ctx.save_for_backward(outputs)
        return outputs.clone()

    @staticmethod
    @names_the_backward_solve
    def backward(ctx, grad_outputs):
        if torch.is_grad_enabled():
            # (the function runs the per-sample checkpoint replay too: the run names its strategy)
            name = getattr(ctx.run, "strategy_name", "adjoint")
            raise RuntimeError(f"the per-sample {name} does not support double backward (create_graph=True); use "
                               "gradient='direct' for higher derivatives")
        (outputs,) = ctx.saved_tensors
        n, batch = outputs.shape[:2]
        # The outputs a sample never reached (it failed with throw=False) are NaN constants: their gradients are
        # zero, as backpropagation through torch.where gives with gradient="direct".
        reached = torch.isfinite(outputs.reshape(n, batch, -1)).all(dim=2).cumprod(dim=0).bool()     # (n, batch)
        grad_outputs = torch.where(reached.view(n, batch, *([1] * (outputs.ndim - 2))), grad_outputs,
                                   torch.zeros_like(grad_outputs))
        if not bool(torch.isfinite(grad_outputs).all()):
            return (None, None) + nan_gradients(*ctx.y0_like, ctx.params)
        grad_y0, grad_params = ctx.run.backward(outputs, grad_outputs)
        return (None, None, grad_y0, *grad_params)
