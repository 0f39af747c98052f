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
outputs in between would need the trajectory's gradient. The solve must have ended at a steady state, else the theorem
gives the gradient of another point than the one returned, so it is an error:

- at the solve (when a parameter needs a gradient), ``rms(f) <= 10 (atol + rtol rms(y))`` with the thresholds of the
  :func:`~neuralode.steady_state_event` that fired (or of one among the events), else the strategy's ``rtol``/``atol``,
  else the solve's (the factor 10: an event is located to its root finder's tolerance, on either side);
- in the backward pass, the Newton step to the steady state, ``delta = J^{-1} f``, must be within 100 times those
  thresholds in every component (a batch's RMS norm hid a sample still 0.78 from its steady state, and its gradient
  came out 1.0 where the returned state's is 0.29). Where ``J`` has an eigenvalue of the wrong sign for the direction
  of integration (an unstable steady state, reached only from a special start; read from the sign of ``det J``, so an
  odd number of such real eigenvalues) it warns: the gradient is then the steady state's, not the trajectory's.

Complex states are solved in their real form (``J`` of the map on real and imaginary parts), which also covers fields
that are not complex-differentiable; ``linear_solver="dense"`` only.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

import warnings

from ..integrate import integrate
from ..solvers.linear import Linearization, batched_jacobian, dense_jacobian, gmres
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
        The thresholds of the steady-state tests (module docstring): by default the fired (or a listed)
        ``steady_state_event``'s, else the solve's tolerances; one given alone keeps the other's default.
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
        if problem.y0.is_complex() and self.linear_solver != "dense":
            raise ValueError(f"ImplicitAdjoint(linear_solver={self.linear_solver!r}) supports real states; a complex "
                             "state is solved in its real form with linear_solver='dense'")
        # (a parameter needs the theorem's gradient: inference, under no_grad, asks nothing of the end)
        box = [torch.is_grad_enabled() and any(p.requires_grad for p in self.params)]
        outputs = _SteadyState.apply(self, problem, stepper, control, kwargs, box, problem.y0, *self.params)
        return RunResult(outputs, box[1])


def _steady_thresholds(strategy, problem, integration, events) -> tuple:
    """(rtol, atol, where they come from) for the steady-state tests."""
    rtol = atol = None
    source = "the solve's rtol and atol"
    steady = None
    if integration.event_index is not None:
        steady = getattr(events[integration.event_index].fn, "steady_state", None)
    if steady is None:   # (a recorded, non-terminal one, or one that did not fire: the end is judged by its thresholds)
        steady = next((s for s in (getattr(e.fn, "steady_state", None) for e in events) if s is not None), None)
    if steady is not None:
        rtol, atol = steady
        source = "the steady_state_event's rtol and atol"
    if rtol is None:
        rtol = problem.rtol if isinstance(problem.rtol, float) else float(torch.as_tensor(problem.rtol).max())
        atol = problem.atol if isinstance(problem.atol, float) else float(torch.as_tensor(problem.atol).max())
    if strategy.rtol is not None or strategy.atol is not None:
        rtol = strategy.rtol if strategy.rtol is not None else rtol
        atol = strategy.atol if strategy.atol is not None else atol
        source = "ImplicitAdjoint(rtol=..., atol=...)"
    return rtol, atol, source


def _rms(x) -> float:
    return float(x.detach().abs().pow(2).mean().sqrt()) if x.numel() else 0.0


# The forward test's slack: an event is located to its root finder's tolerance, so the located state sits on either
# side of its threshold (a fired steady_state_event was refused 20-40% of the time without it).
_RESIDUAL_SLACK = 10.0
# The backward test: the Newton step to the steady state within this many thresholds in every component.
_DISTANCE_SLACK = 100.0


class _SteadyState(torch.autograd.Function):
    @staticmethod
    def forward(ctx, strategy, problem, stepper, control, kwargs, box, y0, *params):
        forward_problem = replace(problem, y0=y0.detach(), f0=None if problem.f0 is None else problem.f0.detach())
        with torch.no_grad():
            integration = integrate(forward_problem, stepper, control, **kwargs)
        wanted = box[0]
        box.append(integration)
        outputs = torch.stack(integration.outputs)
        t_end = integration.event_t if integration.event_t is not None else problem.times[-1]
        y_end = outputs[-1]
        ctx.thresholds = _steady_thresholds(strategy, problem, integration, kwargs.get("events", ()))
        if wanted and integration.error is None and len(outputs) > 1:
            with torch.no_grad():
                residual = problem.field.evaluate(t_end, y_end)
            rtol, atol, source = ctx.thresholds
            size, allowed = _rms(residual), atol + rtol * _rms(y_end)
            if not size <= _RESIDUAL_SLACK * allowed:
                raise ValueError(f"ImplicitAdjoint: the solve ended at t={t_end:.6g} where rms(f) = {size:.3g}, more "
                                 f"than {_RESIDUAL_SLACK:g} x {allowed:.3g} ({source}): not a steady state, so the "
                                 "implicit function theorem does not give its gradient. Solve further "
                                 "(events=[neuralode.steady_state_event(func, rtol=..., atol=...)] and a long span), pass "
                                 "the thresholds that define steady here (ImplicitAdjoint(rtol=..., atol=...)), or use "
                                 "gradient='adjoint' or 'direct'")
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
        with torch.enable_grad():
            y = y_end.detach().requires_grad_(True)
            f = field.evaluate(t, y)

            def transposed(v):   # v -> the field's vector-Jacobian product (torch's convention, complex included)
                (row,) = torch.autograd.grad(f, y, v, retain_graph=True, allow_unused=True)
                return torch.zeros_like(v) if row is None else row
            linear = _linear_system(strategy.linear_solver, field, t, y_end.detach(), transposed)
            lam = linear.transposed_solve(g)
            _check_solution(lam, transposed, g, strategy.linear_solver)
            _check_steady(linear, f.detach(), y_end, ctx.thresholds, problem.direction)
            grads = torch.autograd.grad(f, params, -lam, allow_unused=True) if params else ()
        grads = [torch.zeros_like(p) if gr is None else gr.to(p.dtype) for gr, p in zip(grads, params)]
        return (None,) * 6 + (grad_y0, *grads)


def _singular() -> ValueError:
    return ValueError("ImplicitAdjoint: df/dy is singular at the steady state: a conserved quantity or a family of "
                      "steady states (the steady state then depends on y0), or a component no derivative depends on "
                      "(an integral carried in the state, such as a regulariser's), so the implicit function theorem "
                      "gives no gradient; use gradient='adjoint' or 'direct'")


class _Dense:
    """``J`` over the flattened state (the real form for a complex state), LU-factorised once for both solves."""

    def __init__(self, field, t, y):
        self.shape, self.complex = y.shape, y.is_complex()
        if self.complex:
            def real_map(s, u):
                value = field.evaluate(s, torch.view_as_complex(u.reshape(*y.shape, 2)))
                return torch.view_as_real(value).reshape(-1)
            point = torch.view_as_real(y).reshape(-1)
        else:
            def real_map(s, u):
                return field.evaluate(s, u.reshape(y.shape)).reshape(-1)
            point = y.reshape(-1)
        self.J = dense_jacobian(real_map, t, point)
        self.lu = torch.linalg.lu_factor_ex(self.J)

    def _flat(self, v):
        return torch.view_as_real(v).reshape(-1, 1) if self.complex else v.reshape(-1, 1)

    def _back(self, x):
        return torch.view_as_complex(x.reshape(*self.shape, 2)) if self.complex else x.reshape(self.shape)

    def transposed_solve(self, g):
        LU, pivots, info = self.lu
        if int(info) != 0:
            raise _singular()
        return self._back(torch.linalg.lu_solve(LU, pivots, self._flat(g), adjoint=True))

    def solve(self, r):
        LU, pivots, _ = self.lu
        return self._back(torch.linalg.lu_solve(LU, pivots, self._flat(r)))

    def unstable(self, direction) -> bool:
        return bool(_wrong_determinant_sign(self.lu, direction, self.J.shape[-1]).any())


class _Batched:
    """One ``(m, m)`` block a sample of a ``(batch, ...)`` state."""

    def __init__(self, field, t, y):
        self.shape = y.shape
        self.blocks = batched_jacobian(lambda s, x: field.evaluate(s, x), t, y)
        self.lu = torch.linalg.lu_factor_ex(self.blocks)

    def transposed_solve(self, g):
        LU, pivots, info = self.lu
        if bool((info != 0).any()):
            raise _singular()
        return torch.linalg.lu_solve(LU, pivots, g.reshape(g.shape[0], -1, 1), adjoint=True).reshape(self.shape)

    def solve(self, r):
        LU, pivots, _ = self.lu
        return torch.linalg.lu_solve(LU, pivots, r.reshape(r.shape[0], -1, 1)).reshape(self.shape)

    def unstable(self, direction) -> bool:
        return bool(_wrong_determinant_sign(self.lu, direction, self.blocks.shape[-1]).any())


class _Krylov:
    """GMRES on vector-Jacobian products (the transposed system) and Jacobian-vector products (the distance)."""

    def __init__(self, field, t, y, transposed):
        self.transposed, self.forward = transposed, Linearization(lambda s, x: field.evaluate(s, x), t, y)
        eps = torch.finfo(y.dtype).eps
        self.rtol, self.max_iters = max(1e-10, 100 * eps), max(400, 4 * y.numel())

    def _gmres(self, apply, b, what):
        try:
            return gmres(apply, b, rtol=self.rtol, max_iters=self.max_iters, fail=True)[0]
        except Exception:   # (KrylovFailure: short of its tolerance, on a singular or ill-conditioned J)
            raise ValueError(f"ImplicitAdjoint(linear_solver='krylov'): GMRES did not solve {what} to {self.rtol:.1e} "
                             "(df/dy singular or ill-conditioned at the steady state); try linear_solver='dense'") from None

    def transposed_solve(self, g):
        return self._gmres(self.transposed, g, "J^T lambda = g")

    def solve(self, r):
        return self._gmres(self.forward, r, "J delta = f")

    def unstable(self, direction) -> bool:
        return False   # (nothing factorised to read it from)


def _wrong_determinant_sign(lu, direction, n) -> torch.Tensor:
    """Whether ``det J`` lacks the sign a stable ``J`` gives (every eigenvalue's real part of the sign opposite to the
    direction of integration: ``(-1)^n`` forwards, ``+1`` backwards), read from the LU already factorised, so free. It
    shows an odd number of real eigenvalues of the wrong sign (a saddle), not a pair of them."""
    LU, pivots, _ = lu
    swaps = (pivots != torch.arange(1, n + 1, device=pivots.device, dtype=pivots.dtype)).sum(-1)
    sign = torch.sign(torch.diagonal(LU, dim1=-2, dim2=-1)).prod(-1) * (1 - 2 * (swaps % 2))
    expected = (-1) ** n * (1 if direction > 0 else (-1) ** n)
    return sign != expected


def _linear_system(mode, field, t, y, transposed):
    if mode == "dense":
        return _Dense(field, t, y)
    if mode == "batched":
        return _Batched(field, t, y)
    return _Krylov(field, t, y, transposed)


def _check_solution(lam, transposed, g, mode) -> None:
    """``lambda`` must solve the true system (checked with one vector-Jacobian product of the field itself: batched
    blocks of a field that couples its samples solve another one, silently: a gradient of 7.5 where 5.3 was right), and
    ``J`` must not be singular to working precision, where rounding makes ``lambda`` huge rather than infinite (1e16
    for a family of steady states): the amplification ``|J^T| |lambda| / |g|`` stays below ``1 / (100 eps)``."""
    if not bool(torch.isfinite(lam).all()):
        raise _singular()
    g_size, lam_size = float(g.abs().max()), float(lam.abs().max())
    if g_size == 0.0:
        return
    eps = torch.finfo(g.real.dtype if g.is_complex() else g.dtype).eps
    with torch.no_grad():
        residual = float((transposed(lam) - g).abs().max())
    rounding = 100 * eps * lam_size * _size_of(transposed, g)   # (what rounding alone leaves of J^T lambda)
    if residual > 1e-4 * g_size + rounding:
        if mode == "batched":
            raise ValueError("ImplicitAdjoint(linear_solver='batched'): the per-sample blocks do not solve the "
                             "field's own system (its samples are coupled: batch norm, a mean over the batch, "
                             "attention); use linear_solver='dense' or 'krylov'")
        raise _singular()
    if g_size < rounding:
        raise _singular()


def _size_of(transposed, g) -> float:
    """A cheap size of ``J^T``: its largest stretch of a few fixed directions."""
    generator = torch.Generator(device="cpu").manual_seed(0)
    real = g.real.dtype if g.is_complex() else g.dtype
    largest = 0.0
    with torch.no_grad():
        for _ in range(3):
            v = torch.randn(g.shape, generator=generator, dtype=real).to(device=g.device, dtype=g.dtype)
            largest = max(largest, float(transposed(v / v.abs().max()).abs().max()))
    return largest


def _check_steady(linear, residual, y_end, thresholds, direction) -> None:
    """The Newton step ``J^{-1} f`` to the steady state within ``_DISTANCE_SLACK`` thresholds in every component, and a
    warning for an unstable steady state (see the module docstring)."""
    rtol, atol, source = thresholds
    allowed = _DISTANCE_SLACK * (atol + rtol * _rms(y_end))
    with torch.no_grad():
        delta = linear.solve(residual)
    distance = float(delta.abs().max()) if delta.numel() else 0.0
    if not distance <= allowed:
        raise ValueError(f"ImplicitAdjoint: the state the solve ended at is {distance:.3g} from the steady state in its "
                         f"farthest component (a Newton step, J^-1 f), more than {_DISTANCE_SLACK:g} x the thresholds "
                         f"({source}): a slow direction, or a sample of a batch still moving while the batch's RMS "
                         "norm is small. The theorem's gradient would be the steady state's, not the returned state's. "
                         "Tighten the steady_state_event (or give it norm=lambda x: x.abs().max()), or use "
                         "gradient='adjoint' or 'direct'")
    if linear.unstable(direction):
        warnings.warn("ImplicitAdjoint: the steady state is unstable in the direction of integration (the sign of "
                      "det(df/dy) shows a real eigenvalue of the wrong sign): the solve reached it from a special start, "
                      "and the gradient is the steady state's y*(theta), not that of the solve's trajectory, which "
                      "small changes move away from it", UserWarning, stacklevel=2)


class _TimeWithoutGradient(torch.autograd.Function):
    """The event time of a solve differentiated by ImplicitAdjoint: its value, and an error if a loss backpropagates a
    nonzero cotangent into it (instead of a silent zero)."""

    @staticmethod
    def forward(ctx, event_t, anchor):
        return event_t.clone()

    @staticmethod
    def backward(ctx, grad_t):
        if grad_t is not None and bool((grad_t != 0).any()):
            raise ValueError("gradient=neuralode.ImplicitAdjoint() gives the steady state's gradient, and the time "
                             "the solve reached it (event_t) has none: a loss through event_t needs gradient='direct' "
                             "or 'adjoint' (which differentiate the event time)")
        return None, None


def time_without_gradient(event_t, anchor):
    """``event_t``, carrying an error for a loss that differentiates it (see :class:`_TimeWithoutGradient`)."""
    if not (torch.is_grad_enabled() and anchor.requires_grad):
        return event_t
    return _TimeWithoutGradient.apply(event_t, anchor)


__all__ = ["ImplicitAdjoint", "time_without_gradient"]
