"""Gradients of a steady state by the implicit function theorem (diffrax's ``ImplicitAdjoint``).

A solve run until the field vanishes, ``f(t_end, y*, theta) = 0`` (usually with a
:func:`~neuralode.steady_state_event`), ends at a point whose dependence on the parameters the field alone determines:
differentiating ``f(y*(theta), theta) = 0`` gives ``J dy*/dtheta = -df/dtheta`` with ``J = df/dy`` at ``y*``. So the
backward pass is one linear solve, ``J^T lambda = g`` for the cotangent ``g`` of ``y*``, and one vector-Jacobian
product, ``dL/dtheta = -lambda^T df/dtheta``: no backward integration, no stored steps, and a cost that does not grow
with the length of the approach to the steady state (the deep-equilibrium models' gradient; Bai, Kolter and Koltun,
NeurIPS 2019).

The steady state does not depend on ``y0`` locally (a small change of ``y0`` in its basin of attraction leads to the same
``y*``), so ``y0`` receives the cotangent of the output at ``t0`` alone. Only the start and the end may be outputs: the
outputs in between would need the trajectory's gradient. The solve must have ended at a steady state, judged by the
fired :func:`~neuralode.steady_state_event`'s thresholds or else the strategy's (``rtol``/``atol``, by default the
solve's); anywhere else the theorem does not apply, and the gradient would be wrong, so it is an error.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from ..integrate import integrate
from ..solvers.linear import batched_jacobian, dense_jacobian, gmres
from .base import GradientStrategy, RunResult, collect_parameters, nan_gradients, no_double_backward

_SOLVERS = ("dense", "batched", "krylov")


@dataclass(frozen=True)
class ImplicitAdjoint(GradientStrategy):
    """Differentiate the steady state a solve ends at by the implicit function theorem (see the module docstring).

    Parameters
    ----------
    linear_solver : {"dense", "batched", "krylov"}, default "dense"
        How ``J^T lambda = g`` is solved: ``"dense"`` forms ``J`` over the flattened state (``n`` vector-Jacobian
        products) and solves directly; ``"batched"``, for a state ``(batch, ...)`` whose samples are independent, one
        block a sample; ``"krylov"``, GMRES on vector-Jacobian products, nothing of size ``n^2`` formed.
    rtol, atol : float, optional
        The steady-state test at the end, ``rms(f) <= atol + rtol rms(y)``: by default the fired
        ``steady_state_event``'s thresholds, else the solve's tolerances.
    params : tuple
        Set by ``solve`` from ``adjoint_params`` (default ``func.parameters()``).
    """

    linear_solver: str = "dense"
    rtol: float | None = None
    atol: float | None = None
    params: tuple = ()

    def __post_init__(self):
        if self.linear_solver not in _SOLVERS:
            raise ValueError(f"ImplicitAdjoint(linear_solver=...) must be one of {list(_SOLVERS)}, got "
                             f"{self.linear_solver!r}")
        for label in ("rtol", "atol"):
            value = getattr(self, label)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not 0 <= value < float("inf")):
                raise ValueError(f"ImplicitAdjoint({label}=...) must be a finite number >= 0, got {value!r}")

    def bind(self, func, adjoint_params):
        return replace(self, params=collect_parameters(func, adjoint_params, "implicit"))

    def run(self, problem, stepper, control, **kwargs) -> RunResult:
        if len(problem.times) > 2:
            raise ValueError(f"ImplicitAdjoint differentiates the steady state a solve ends at, so t may hold the start "
                             f"and the end only (got {len(problem.times)} output times): the outputs between would need "
                             "the trajectory's gradient. Solve with t = [t0, t1] (and a steady_state_event), or use "
                             "gradient='adjoint' or 'direct' for the trajectory")
        if problem.field.shapes is None and self.linear_solver == "batched" and problem.y0.ndim < 1:
            raise ValueError("ImplicitAdjoint(linear_solver='batched') needs a state of shape (batch, ...)")
        if self.linear_solver == "batched" and problem.field.shapes is not None:
            raise ValueError("ImplicitAdjoint(linear_solver='batched') needs one tensor state (batch, ...); a tuple or "
                             "PyTree state is flattened into one vector: use 'dense' or 'krylov'")
        box = []
        outputs = _SteadyState.apply(self, problem, stepper, control, kwargs, box, problem.y0, *self.params)
        return RunResult(outputs, box[0])


def _steady_thresholds(strategy, problem, integration, events) -> tuple:
    """(rtol, atol, where they come from) for the test at the end."""
    if strategy.rtol is not None or strategy.atol is not None:
        return strategy.rtol or 0.0, strategy.atol or 0.0, "ImplicitAdjoint(rtol=..., atol=...)"
    if integration.event_index is not None:
        steady = getattr(events[integration.event_index].fn, "steady_state", None)
        if steady is not None:
            return steady[0], steady[1], "the steady_state_event's rtol and atol"
    rtol = problem.rtol if isinstance(problem.rtol, float) else float(torch.as_tensor(problem.rtol).max())
    atol = problem.atol if isinstance(problem.atol, float) else float(torch.as_tensor(problem.atol).max())
    return rtol, atol, "the solve's rtol and atol"


class _SteadyState(torch.autograd.Function):
    @staticmethod
    def forward(ctx, strategy, problem, stepper, control, kwargs, box, y0, *params):
        forward_problem = replace(problem, y0=y0.detach(), f0=None if problem.f0 is None else problem.f0.detach())
        with torch.no_grad():
            integration = integrate(forward_problem, stepper, control, **kwargs)
        box.append(integration)
        outputs = torch.stack(integration.outputs)
        t_end = integration.event_t if integration.event_t is not None else problem.times[-1]
        y_end = outputs[-1]
        if integration.error is None and len(outputs) > 1:
            with torch.no_grad():
                residual = problem.field.evaluate(t_end, y_end)
            rtol, atol, source = _steady_thresholds(strategy, problem, integration, kwargs.get("events", ()))

            def rms(x):
                return float(x.abs().pow(2).mean().sqrt()) if x.numel() else 0.0
            size, allowed = rms(residual), atol + rtol * rms(y_end)
            if not size <= allowed:
                raise ValueError(f"ImplicitAdjoint: the solve ended at t={t_end:.6g} where rms(f) = {size:.3g} exceeds "
                                 f"{allowed:.3g} ({source}): not a steady state, so the implicit function theorem "
                                 "does not give its gradient. Solve further (events=[neuralode.steady_state_event("
                                 "func, rtol=..., atol=...)] and a long span), pass the thresholds that define steady "
                                 "here (ImplicitAdjoint(rtol=..., atol=...)), or use gradient='adjoint' or 'direct'")
        ctx.strategy, ctx.problem, ctx.t_end, ctx.count = strategy, problem, t_end, len(outputs)
        ctx.failure = None if integration.error is None else str(integration.error)
        ctx.save_for_backward(y_end)
        return outputs

    @staticmethod
    def backward(ctx, grad_outputs):
        if torch.is_grad_enabled():
            no_double_backward("implicit")
        (y_end,) = ctx.saved_tensors
        strategy, problem = ctx.strategy, ctx.problem
        params = strategy.params
        grad_y0 = grad_outputs[0]
        if ctx.count < 2:
            return (None,) * 6 + (grad_y0, *[None] * len(params))
        g = grad_outputs[-1]
        if ctx.failure is not None and bool((g != 0).any()):
            raise ValueError(f"ImplicitAdjoint: the solve failed ({ctx.failure}), so its last output is no steady "
                             "state and the implicit function theorem gives no gradient for it")
        if not bool(torch.isfinite(g).all()):
            return (None,) * 6 + nan_gradients(y_end.shape, y_end.dtype, y_end.device, params)
        field, t = problem.field, ctx.t_end
        lam = _transposed_solve(strategy.linear_solver, field, t, y_end, g, problem)
        with torch.enable_grad():
            y = y_end.detach().requires_grad_(True)
            f = field.evaluate(t, y)
            grads = torch.autograd.grad(f, params, -lam, allow_unused=True) if params else ()
        grads = [torch.zeros_like(p) if gr is None else gr.to(p.dtype) for gr, p in zip(grads, params)]
        return (None,) * 6 + (grad_y0, *grads)


def _transposed_solve(mode, field, t, y, g, problem):
    """``lambda`` with ``J^T lambda = g``, ``J = df/dy`` at the steady state."""
    def singular():
        return ValueError("ImplicitAdjoint: df/dy is singular at the steady state (a conserved quantity or a family "
                          "of steady states: the steady state then depends on y0, or on nothing that fixes it), so "
                          "the implicit function theorem gives no gradient; use gradient='adjoint' or 'direct'")
    with torch.enable_grad():
        if mode == "krylov":
            leaf = y.detach().requires_grad_(True)
            f = field.evaluate(t, leaf)

            def transposed(v):
                (row,) = torch.autograd.grad(f, leaf, v, retain_graph=True, allow_unused=True)
                return torch.zeros_like(v) if row is None else row
            eps = torch.finfo(y.real.dtype if y.is_complex() else y.dtype).eps
            try:
                solution, _ = gmres(transposed, g, rtol=max(1e-10, 100 * eps), max_iters=max(400, 4 * y.numel()),
                                    fail=True)
            except Exception as failure:   # (KrylovFailure: short of the tolerance, a singular or ill-posed J^T)
                raise ValueError(f"ImplicitAdjoint(linear_solver='krylov'): GMRES did not solve J^T lambda = g "
                                 f"({failure}); try linear_solver='dense'") from None
            return _checked(solution, transposed, g, singular)
        if mode == "batched":
            blocks = batched_jacobian(lambda s, x: field.evaluate(s, x), t, y.detach())
            rhs = g.reshape(g.shape[0], -1, 1)
            try:
                solution = torch.linalg.solve(blocks.transpose(1, 2), rhs).reshape(g.shape)
            except RuntimeError:
                raise singular() from None
            return _checked(solution, lambda v: (blocks.transpose(1, 2) @ v.reshape(rhs.shape)).reshape(g.shape), g,
                            singular)
        J = dense_jacobian(lambda s, x: field.evaluate(s, x), t, y.detach())
    try:
        solution = torch.linalg.solve(J.T, g.reshape(-1, 1)).reshape(g.shape)
    except RuntimeError:
        raise singular() from None
    return _checked(solution, lambda v: (J.T @ v.reshape(-1, 1)).reshape(g.shape), g, singular)


def _checked(solution, transposed, g, singular):
    """``solution`` of ``J^T lambda = g``, unless ``J`` is singular to working precision. Rounding then makes ``lambda``
    huge rather than infinite (a family of steady states gave 1e16 instead of an error): the amplification
    ``|J^T| |lambda| / |g|`` must stay below ``1 / (100 eps)``, and the solution must solve the system."""
    if not bool(torch.isfinite(solution).all()):
        raise singular()
    g_size, lam_size = float(g.abs().max()), float(solution.abs().max())
    if g_size == 0.0:
        return solution
    eps = torch.finfo(g.real.dtype if g.is_complex() else g.dtype).eps
    with torch.no_grad():
        residual = float((transposed(solution) - g).abs().max())
    if residual > 1e-3 * g_size or g_size < 100 * eps * lam_size * _norm_of(transposed, g):
        raise singular()
    return solution


def _norm_of(transposed, g) -> float:
    """A cheap size of ``J^T``: its largest stretch of a few fixed directions (no ``J`` is formed for Krylov)."""
    generator = torch.Generator(device="cpu").manual_seed(0)
    largest = 0.0
    with torch.no_grad():
        for _ in range(3):
            v = torch.randn(g.shape, generator=generator, dtype=g.real.dtype if g.is_complex() else g.dtype).to(g)
            largest = max(largest, float(transposed(v / v.abs().max()).abs().max()))
    return largest


__all__ = ["ImplicitAdjoint"]
