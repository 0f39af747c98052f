"""The one stepper behind every Rosenbrock method (Rodas5).

A step from ``(t0, y0)`` with size ``h`` runs the transformed form of Hairer and Wanner ("Solving
Ordinary Differential Equations II", 2nd ed., 1996, Sec. IV.7; the coefficients and their meaning are
in :mod:`neuralode.tableaus.rosenbrock`):

    (I - h gamma J) u_i = h gamma [ f(t0 + c_i h, y0 + sum_{j<i} a_ij u_j) + sum_{j<i} (C_ij / h) u_j
                                    + d_i h df/dt(t0, y0) ],
    y1 = y0 + sum_i m_i u_i,        error estimate  sum_i m_err_i u_i,

with ``J = df/dy(t0, y0)``. The stages are *linear* in ``u_i``: there is no Newton iteration to converge
or to fail, one Jacobian and one factorisation of ``I - h gamma J`` serve all stages of a step, and a
rejected step reuses the Jacobian (it was taken at the same point) and only refactorises. The Jacobian
must be exact at ``(t0, y0)`` (Rodas5 is not a W-method: its order conditions assume it), so it is never
kept across accepted steps, unlike Newton's in :mod:`neuralode.solvers.implicit`.

Costs per step: ``s - 1`` evaluations of ``f`` (the first stage is ``f0``), one Jacobian (``n``
vector-Jacobian products in ``"dense"`` mode, ``m`` in ``"batched"``, none in ``"krylov"``), for
non-autonomous fields one ``df/dt``, and one LU (dense, batched) or ``s`` GMRES solves (krylov).

Gradients (direct backpropagation, checkpoint replay) are those of the discrete map, exactly: when a
graph is needed, ``J`` is formed with ``create_graph=True`` so that it depends on ``y0`` and the
parameters, and the dense or batched LU factorisation and triangular solves are ordinary autograd
operations. The Krylov mode's GMRES is not differentiable (its coefficients are host floats), so there
each stage gets the gradient of its linear system directly (:func:`_attach_linear_gradient`): for
``M u = h gamma rhs`` with ``M = I - h gamma J(y0, theta)``, the cotangent ``g`` of ``u`` becomes
``lambda = M^{-T} g`` (GMRES with vector-Jacobian products) and flows into ``h gamma (rhs + J u)`` with
``u`` held fixed, which is what differentiating ``M u = h gamma rhs`` gives.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
import torch.autograd.forward_ad as forward_ad

from ..interpolation import hermite_coefficients
from ..problem import VectorField
from ..tableaus.rosenbrock import RODAS5, RosenbrockTableau
from .base import Solver
from .linear import (JACOBIAN_MODES, KrylovFailure, Leading, Linearization, SingularMatrixError, batched_jacobian,
                     build_system, dense_jacobian, gmres, is_holomorphic, jacobian, leading_unknowns)
from .runge_kutta import StepOutcome, linear_combination, step_result

# Step factor after a singular iteration matrix: I - h gamma J is singular only for h gamma = 1/lambda
# with lambda an eigenvalue of J, so any other h works; halving is the usual retreat (Hairer-Wanner IV.8).
_SINGULAR_FACTOR = 0.5
# GMRES stops at this fraction of the requested rtol (relative residual). A Rosenbrock stage has no Newton
# iteration that would correct an inexact solve: the residual goes straight into the stage value, and
# stiff components, whose increment is much smaller than the right-hand side, magnify it relative to u.
_KRYLOV_TOLERANCE_FRACTION = 1e-2
# Relative distance of the one evaluation that confirms a field is autonomous (see Rosenbrock.init).
_PROBE_OFFSET = 1.0 / 64


@dataclass
class RosenbrockState:
    """Per-solve bookkeeping: the linearisation at the current point and the counters."""

    jacobian: Any = None            # J at (point_t, point), in the representation of the mode
    time_derivative: Any = None     # df/dt there (None: autonomous)
    point: Any = None               # the y0 tensor J was taken at (identity: a retried step has the same)
    point_t: float | None = None
    point_graph: bool = False       # whether J (and df/dt) were formed with a graph
    graph_point: Any = None         # krylov with a graph: (func, t0, y0) for the graph-carrying J v
    system: Any = None              # (h gamma, the factorised I - h gamma J) of the last step
    autonomous: bool | None = None  # probed once in init (None: unknown, use finite differences every step)
    forward_time: bool = False      # df/dt by AD works for this field
    reverse_time: bool = False      # ... by reverse mode, where forward mode is off (a custom Function's forward)
    has_parameters: bool = False    # f carries a graph even for a detached y (captured tensors need grad)
    unknowns: Any = None            # J over the leading components only (quadratures follow): their count, or None
    cross: Any = None               # then J v of the whole field, for the quadratures' rows (J_qu u)
    counters: dict = field(default_factory=lambda: {"n_jacobians": 0, "n_lu": 0, "n_time_derivatives": 0,
                                                    "n_singular": 0, "n_jvp": 0})


@dataclass(frozen=True, eq=False)
class Rosenbrock(Solver):
    """Runs a :class:`~neuralode.tableaus.rosenbrock.RosenbrockTableau`.

    Parameters
    ----------
    tableau : RosenbrockTableau
    jacobian : {"dense", "batched", "krylov"}
        How ``df/dy`` is formed and ``I - h gamma J`` solved (:mod:`neuralode.solvers.linear`).
    preconditioner : callable, optional
        ``preconditioner(v, c) ~ (I - c J)^{-1} v`` for ``jacobian="krylov"``.
    krylov_rtol : float, optional
        Relative residual at which GMRES stops; default ``1e-3 * rtol`` (at least ``10 eps``).

    Notes
    -----
    Interface of the loop (:func:`neuralode.integrate.integrate`): ``init``, ``step``,
    ``dense_coefficients``, ``statistics``; ``Solution.stats`` gains ``n_jacobians``, ``n_lu`` (LU
    factorisations: one per attempted step in the dense and batched modes), ``n_time_derivatives`` and
    ``n_singular`` (steps retried because ``I - h gamma J`` was singular). Evaluations of ``f`` made for
    Jacobians, ``df/dt`` and Krylov products are counted in ``nfe`` by the field.
    """

    tableau: RosenbrockTableau
    jacobian: str = "dense"
    preconditioner: Callable | None = None
    krylov_rtol: float | None = None
    implicit = True    # (class attribute, not a field) solves stiff problems
    lands_on_outputs = True
    _stages: tuple = field(init=False, repr=False)
    _m: tuple = field(init=False, repr=False)
    _m_err: tuple = field(init=False, repr=False)
    _dense_cache: dict = field(init=False, repr=False, default_factory=dict)

    def __post_init__(self):
        if self.jacobian not in JACOBIAN_MODES:
            raise ValueError(f"option 'jacobian' must be one of {list(JACOBIAN_MODES)}, got {self.jacobian!r}")
        if self.preconditioner is not None and not callable(self.preconditioner):
            raise TypeError("option 'preconditioner' must be callable as preconditioner(v, c)")
        tab = self.tableau
        set_ = object.__setattr__
        set_(self, "_stages", tuple((tab.c[i], _sparse(tab.a[i]), _sparse(tab.C[i]), tab.d[i])
                                    for i in range(tab.stages)))
        set_(self, "_m", _sparse(tab.m))
        set_(self, "_m_err", _sparse(tab.m_err) if tab.m_err is not None else ())

    # --- facts the loop and the gradient strategies read ----------------------------------------------
    @property
    def order(self) -> int:
        return self.tableau.order

    @property
    def adaptive(self) -> bool:
        return self.tableau.adaptive

    @property
    def error_order(self) -> int | None:
        return self.tableau.error_order

    @property
    def initial_step_order(self) -> int:
        return self.error_order or self.order

    def init(self, func, t0: float, y0: torch.Tensor, f0: torch.Tensor) -> RosenbrockState:
        """Probe the field once: does it depend on ``t`` and does it carry parameters needing a graph?"""
        state = RosenbrockState()
        if isinstance(func, VectorField):
            with torch.enable_grad():
                out = None
                try:
                    out, tangent = _ad_time_derivative(func, t0, y0.detach(), state)
                    func.nfe += 1
                    state.forward_time = True
                except (RuntimeError, NotImplementedError, TypeError):
                    tangent = None   # (no AD through f: df/dt by a one-sided difference at every step)
                if out is None:      # (reverse mode, or no AD: f itself, for whether it carries parameters)
                    out = func(t0, y0.detach())
            state.has_parameters = out.requires_grad
            if state.forward_time and tangent is None:
                # Forward mode saw no path from t to f: either f ignores t, or it reads t as a Python number
                # (float(t), t.item(), `if t > 1`), which hides it from AD. Comparing f at two times cannot
                # tell them apart for the whole solve (a forcing that starts at t = 1 is invisible from t0 = 0:
                # the step then lost its df/dt term and error control, 1.7e-4 at rtol 1e-6), so one call with
                # a time that records such conversions decides: if f converted t, df/dt is taken by a
                # one-sided difference at every step (one more evaluation of f per step).
                state.autonomous = not _reads_time_as_a_number(func, t0, y0.detach())
                state.forward_time = state.autonomous
            else:
                state.autonomous = False
        else:
            # The loop's perturbed wrappers and the adjoint's augmented field: no structure to probe.
            with torch.enable_grad():
                state.has_parameters = func(t0, y0.detach()).requires_grad
        return state

    def statistics(self, state: RosenbrockState | None) -> dict:
        return dict(state.counters) if state is not None else {}

    @staticmethod
    def blank_state() -> RosenbrockState:
        """A state no step has used (its counters at zero), for statistics of a phase that never ran."""
        return RosenbrockState()

    @staticmethod
    def jacobian_at(state: RosenbrockState, y0: torch.Tensor) -> torch.Tensor | None:
        """The step's Jacobian if it was taken at ``y0`` (always, after a step from there; dense or batched)."""
        J = state.jacobian
        return J if isinstance(J, torch.Tensor) and state.point is y0 else None

    # --- one step ------------------------------------------------------------------------------------
    def step(self, func: Callable, t0: float, y0: torch.Tensor, f0: torch.Tensor, h: float,
             error_norm: Callable, state: RosenbrockState) -> StepOutcome:
        if y0.numel() == 0:
            # An empty state: nothing to linearise or solve; every increment is empty.
            us = [y0 + 0 * h] * self.tableau.stages
            return StepOutcome(y0 + 0 * h, None, y0.new_zeros(()), self.error_order, stages=(f0, us), state=state)
        graph = torch.is_grad_enabled() and (y0.requires_grad or f0.requires_grad or state.has_parameters)
        if state.point is not y0 or state.point_t != t0 or state.point_graph != graph:
            self._linearize(func, t0, y0, f0, h, state, graph)
        coefficient = h * self.tableau.gamma
        try:
            system = build_system(self.jacobian, np.array([[coefficient]]), state.jacobian, self.preconditioner)
        except SingularMatrixError:
            return self.singular(y0, h, state)
        if self.jacobian != "krylov":
            state.counters["n_lu"] += 1
        state.system = (coefficient, system)
        solve = self._solver(system, coefficient, state, graph, error_norm, y0)
        try:
            us = self.increments(func, t0, y0, f0, h, solve, state.time_derivative)
        except KrylovFailure as failure:
            # (zero stages from a useless preconditioner gave a zero error estimate: a wrong step accepted)
            state.counters["n_singular"] += 1
            return StepOutcome(y0, None, None, self.error_order, state=state, step_factor=_SINGULAR_FACTOR,
                               failure=failure.reason)
        y1, ratio = self.combine(y0, us, error_norm)
        return StepOutcome(y1, None, ratio, self.error_order, stages=(f0, us), state=state)

    def stiff_filter(self, outcome: StepOutcome, h: float):
        state, gamma = outcome.state, self.tableau.gamma
        if not isinstance(state, RosenbrockState) or state.jacobian is None:
            return None
        if state.system is None or state.system[0] != h * gamma:
            # (a compiled step factorised inside its kernel: the same matrix, built here once more)
            try:
                state.system = (h * gamma, build_system(self.jacobian, np.array([[h * gamma]]), state.jacobian,
                                                        self.preconditioner))
            except SingularMatrixError:
                return None
        system = state.system[1]
        if state.unknowns is not None:   # (the leading block: the quadratures pass unfiltered)
            m = state.unknowns
            return gamma, lambda v: torch.cat((system.solve(v[None, :m])[0], v[m:]))
        return gamma, lambda v: system.solve(v[None])[0]

    def singular(self, y0: torch.Tensor, h, state: RosenbrockState) -> StepOutcome:
        """The retreat from a singular (or non-finite) ``I - h gamma J``: reject and shrink the step."""
        state.counters["n_singular"] += 1
        return StepOutcome(y0, None, None, self.error_order, state=state, step_factor=_SINGULAR_FACTOR,
                           failure=f"the iteration matrix I - h*gamma*J is singular (h={abs(float(h)):.3g}, "
                                   f"gamma={self.tableau.gamma})")

    def increments(self, func: Callable, t0, y0: torch.Tensor, f0: torch.Tensor, h, solve: Callable,
                   time_derivative: torch.Tensor | None) -> list:
        """The stage increments ``u_i`` given ``solve(rhs) = (I - h gamma J)^{-1} h gamma rhs``.

        Pure tensor code (``t0`` and ``h`` may be floats or 0-dim tensors): the eager step and the compiled
        one (:mod:`neuralode.solvers.compiled`) both run it, so the method is written once.
        """
        us = []
        for i, (c, a_terms, C_terms, d) in enumerate(self._stages):
            if i == 0:
                value = f0                      # c_0 = 0 and no a terms: the stage is f(t0, y0)
            else:
                argument = linear_combination(y0, 1.0, us, a_terms) if a_terms else y0
                value = func(t0 + c * h, argument)
            rhs = linear_combination(value, 1.0 / h, us, C_terms) if C_terms else value
            if time_derivative is not None and d != 0.0:
                rhs = rhs + (d * h) * time_derivative
            us.append(solve(rhs))
        return us

    def combine(self, y0: torch.Tensor, us: list, error_norm: Callable) -> tuple:
        """``(y1, error ratio)`` from the increments (the ratio ``None`` without an embedded method)."""
        y1 = step_result(y0, 1.0, us, self._m)
        ratio = None
        if self._m_err:
            # The estimate only steers the step size: no graph is recorded for it.
            with torch.no_grad():
                ratio = error_norm(linear_combination(None, 1.0, us, self._m_err), y0, y1)
        return y1, ratio

    def _linearize(self, func, t0, y0, f0, h, state, graph):
        """``J`` and ``df/dt`` at ``(t0, y0)``; with a graph when the step must be differentiable."""
        if y0.is_complex() and not is_holomorphic(func, t0, y0):
            # Newton's methods only converge slower with a wrong J; a Rosenbrock step is wrong (rodas5 was
            # 1e4x its tolerance with status success on y' = i y - |y|^2 y / 2 + 0.3 conj(y), rodas5p stalled).
            raise ValueError(
                f"the Rosenbrock method ({self.tableau.name}) needs the complex Jacobian of the vector field, and "
                f"the field is not complex-differentiable in y at t={float(t0):.6g} (it uses conj(y), abs(y), .real "
                "or .imag; an adjoint's backward field always does): solve the real form (torch.view_as_real of "
                "the state), or use method='radau5' or 'kvaerno5' (for a gradient: Adjoint(method='radau5') or "
                "Adjoint(interpolate=True))")
        leading = leading_unknowns(func, y0) if not graph and self.jacobian != "krylov" else None
        state.unknowns = state.cross = None
        if leading is not None:
            # The components from `leading` on are quadratures (the adjoint's parameter cotangents): no component's
            # derivative reads them (their columns of J are zero), so I - h gamma J is block lower triangular and only
            # its leading block is factorised; the quadratures' rows need J_qu u, one product a stage
            # (ImplicitRungeKutta._unknowns does the same for the Newton methods).
            m = int(leading)
            state.unknowns = m
            state.jacobian = jacobian(self.jacobian, Leading(func, y0.detach()[m:]), t0, y0.detach()[:m],
                                      state.counters)
            state.cross = Linearization(func, t0, y0.detach(), state.counters)
        elif graph and self.jacobian != "krylov":
            state.jacobian = _jacobian_with_graph(self.jacobian, func, t0, y0)
        else:
            state.jacobian = jacobian(self.jacobian, func, t0, y0.detach(), state.counters)
        state.graph_point = (func, t0, y0) if (graph and self.jacobian == "krylov") else None
        state.counters["n_jacobians"] += 1
        state.time_derivative = None
        if not state.autonomous:
            context = torch.enable_grad() if graph else torch.no_grad()
            with context:
                state.time_derivative = self._time_derivative(func, t0, y0 if graph else y0.detach(),
                                                              f0 if graph else f0.detach(), h, state)
            state.counters["n_time_derivatives"] += 1
        state.point, state.point_t, state.point_graph = y0, t0, graph

    @staticmethod
    def _time_derivative(func, t0, y0, f0, h, state):
        if state.forward_time and isinstance(func, VectorField):
            try:
                _, tangent = _ad_time_derivative(func, t0, y0, state)
                func.nfe += 1                   # evaluate() is the uncounted call
                return torch.zeros_like(f0) if tangent is None else tangent
            except (RuntimeError, NotImplementedError, TypeError):
                state.forward_time = False
        # A one-sided difference into the step (never across a discontinuity at t0 the loop steps from),
        # with Hairer's RODAS increment sqrt(eps * max(1e-5, |t0|)). The field rounds times to its time
        # dtype (float32 for float32 states), so the divisor is the difference of the rounded times.
        t_near = _nearby_time(t0, 1.0 if h > 0 else -1.0, y0.dtype)
        time_dtype = getattr(func, "time_dtype", torch.float64)
        rounded = [float(torch.scalar_tensor(x, dtype=time_dtype)) for x in (t_near, t0)]
        if rounded[0] == rounded[1]:
            return torch.zeros_like(f0)
        return (func(t_near, y0) - f0) / (rounded[0] - rounded[1])

    def _solver(self, system, coefficient, state, graph, error_norm, y0):
        """``rhs -> u`` with ``(I - h gamma J) u = h gamma rhs``, differentiable where needed."""
        if state.unknowns is not None:
            m, cross = state.unknowns, state.cross

            def block_solve(rhs):
                # [[I - c J_uu, 0], [-c J_qu, I]] [u_u; u_q] = c [rhs_u; rhs_q]
                leading = system.solve((coefficient * rhs[:m])[None])[0]
                coupled = cross(torch.cat((leading, torch.zeros_like(rhs[m:]))))[m:]
                return torch.cat((leading, coefficient * (rhs[m:] + coupled)))
            return block_solve
        if self.jacobian != "krylov":
            return lambda rhs: system.solve((coefficient * rhs)[None])[0]
        # GMRES in the error norm's units (see KrylovSystem.scale): a Rosenbrock stage has no Newton iteration to
        # correct it, so a residual that is small only next to the largest components leaves the small ones off
        # (a batch with elements of scale 1e-3 and 1e3 was 800-3500x its tolerance in unscaled variables).
        with torch.no_grad():
            system.scale = error_norm.scale(y0.detach())
        rtol = self.krylov_rtol
        if rtol is None:
            given = error_norm.rtol
            given = float(given.min()) if isinstance(given, torch.Tensor) else float(given)
            eps = torch.finfo(y0.real.dtype if y0.is_complex() else y0.dtype).eps
            # Floor at sqrt(eps): a relative residual of 1e-9 (1e-3 x rtol 1e-6) was below what float64 GMRES
            # reaches on a stiff Laplacian (n = 1e5), so every stage ran to the iteration cap (300 s timeouts
            # in benchmarks/stiff.py; with 1e-2 x rtol it took 2.6 s, err/tol 0.26).
            rtol = max(math.sqrt(eps), min(1e-3, _KRYLOV_TOLERANCE_FRACTION * given))

        def solve(rhs):
            with torch.no_grad():
                u = system.solve((coefficient * rhs.detach())[None], rtol=rtol)[0]
            if not graph:
                return u
            func, t0, y_point = state.graph_point
            return _attach_linear_gradient(u, rhs, coefficient, func, t0, y_point, rtol)

        return solve

    # --- dense output --------------------------------------------------------------------------------
    def dense_coefficients(self, func, t0: float, y0: torch.Tensor, h: float, outcome: StepOutcome,
                           f1: torch.Tensor) -> list:
        """The method's own continuous extension (order 4 for Rodas5), else cubic Hermite.

        Coefficients ``[c_0, ..., c_d]`` with ``y(t0 + theta h) = sum_p c_p theta**p``; one matrix
        product over the stacked increments ``u_i`` gives ``c_1 .. c_d``.
        """
        f0, us = outcome.stages
        if self.tableau.dense_matrix is None:
            return hermite_coefficients(y0, f0, outcome.y1, f1, h)
        stacked = torch.stack(us).reshape(len(us), y0.numel())
        key = (stacked.dtype, stacked.device)
        matrix = self._dense_cache.get(key)
        if matrix is None:
            matrix = torch.as_tensor(self.tableau.dense_matrix, dtype=stacked.dtype, device=stacked.device)
            self._dense_cache[key] = matrix
        coefficients = torch.mm(matrix, stacked)
        return [y0] + list(coefficients.view(coefficients.shape[0], *y0.shape).unbind(0))


def _sparse(weights) -> tuple:
    return tuple((j, float(w)) for j, w in enumerate(weights) if w != 0)


def _nearby_time(t0: float, direction: float, dtype: torch.dtype) -> float:
    """``t0`` plus Hairer's RODAS difference increment ``sqrt(eps * max(1e-5, |t0|))`` (eps of the state)."""
    eps = torch.finfo(dtype.to_real() if dtype.is_complex else dtype).eps
    return t0 + direction * math.sqrt(eps * max(1e-5, abs(t0)))


class _WatchedTime(torch.Tensor):
    """A time tensor that notes when user code turns it (or a tensor computed from it) into a Python value."""

    converted = False

    def _note(self):
        _WatchedTime.converted = True

    def __float__(self):
        self._note()
        return float(self.as_subclass(torch.Tensor))

    def __int__(self):
        self._note()
        return int(self.as_subclass(torch.Tensor))

    def __bool__(self):
        self._note()
        return bool(self.as_subclass(torch.Tensor))

    def item(self):
        self._note()
        return self.as_subclass(torch.Tensor).item()

    def tolist(self):
        self._note()
        return self.as_subclass(torch.Tensor).tolist()

    def numpy(self, *args, **kwargs):
        self._note()
        return self.as_subclass(torch.Tensor).numpy(*args, **kwargs)

    def __array__(self, *args, **kwargs):
        self._note()
        return self.as_subclass(torch.Tensor).numpy().__array__(*args, **kwargs)


def _reads_time_as_a_number(field: VectorField, t0: float, y: torch.Tensor) -> bool:
    """Whether ``field`` converts its time to a Python number (then forward-mode AD cannot see df/dt)."""
    watched = field.time(t0).as_subclass(_WatchedTime)
    _WatchedTime.converted = False
    field.time = lambda _t: watched              # instance attribute shadows the method for this call
    try:
        field.nfe += 1                          # evaluate() is the uncounted call; the probe is one evaluation
        with torch.no_grad():
            field.evaluate(t0, y)
    except Exception:  # noqa: BLE001 - a field that fails on the probe: do not assume it is autonomous
        return True
    finally:
        del field.time
    return _WatchedTime.converted


def _forward_time_derivative(field: VectorField, t0: float, y: torch.Tensor):
    """``(f(t0, y), df/dt(t0, y))`` by one forward-mode evaluation; the tangent is ``None`` if ``f`` ignores t.

    The field turns a float time into a tensor in ``field.time``; for this one call it hands out a dual
    tensor instead, so ``evaluate`` (casts, tuple states) is reused unchanged.
    """
    t = field.time(t0)
    with forward_ad.dual_level():
        dual = forward_ad.make_dual(t, torch.ones_like(t))
        if forward_ad.unpack_dual(dual * 1.0).tangent is None:
            # Forward mode is off here (inside a custom autograd Function's forward, as the adjoint's forward
            # solve is): a missing tangent would say nothing about f, so report that it cannot be used.
            raise _ForwardModeUnavailable("forward-mode AD is unavailable in this context")
        field.time = lambda _t: dual             # instance attribute shadows the method for this call
        try:
            out = field.evaluate(t0, y)
        finally:
            del field.time
        primal, tangent = forward_ad.unpack_dual(out)
    return primal, tangent


class _ForwardModeUnavailable(RuntimeError):
    """Forward-mode AD gives no tangents in this context (a custom autograd Function's forward)."""


def _ad_time_derivative(field: VectorField, t0: float, y: torch.Tensor, state: RosenbrockState):
    """``(f or None, df/dt or None)`` by forward mode, or by reverse mode where forward mode is off (inside a custom
    autograd Function's forward: the checkpoint and adjoint strategies' forward solves, where a one-sided difference
    took other steps than the direct solve, 5.7x as many at t ~ 1e4); ``state.reverse_time`` remembers which."""
    if not state.reverse_time:
        try:
            return _forward_time_derivative(field, t0, y)
        except _ForwardModeUnavailable:
            state.reverse_time = True
    return None, _reverse_time_derivative(field, t0, y)


def _reverse_time_derivative(field: VectorField, t0: float, y: torch.Tensor):
    """``df/dt(t0, y)`` by reverse mode (``None`` if ``f`` ignores t): for a scalar ``t`` the column ``df/dt`` is
    the gradient with respect to ``u`` of ``u . df/dt``, itself one vector-Jacobian product taken with a graph
    (one evaluation of ``f`` and two backward passes). Keeps a graph where the caller records one."""
    keep_graph = torch.is_grad_enabled()
    with torch.enable_grad():
        t = field.time(t0).detach().requires_grad_()
        field.time = lambda _t: t                # instance attribute shadows the method for this call
        try:
            out = field.evaluate(t0, y)
        finally:
            del field.time
        if not out.requires_grad:   # nothing in f depends on t (nor on a parameter): autonomous as far as AD sees
            return None
        u = torch.zeros_like(out, requires_grad=True)
        (along_u,) = torch.autograd.grad(out, t, u, create_graph=True, allow_unused=True)
        if along_u is None or not along_u.requires_grad:
            return None
        (tangent,) = torch.autograd.grad(along_u, u, create_graph=keep_graph, allow_unused=True)
    return tangent


def _jacobian_with_graph(mode: str, func, t: float, y: torch.Tensor) -> torch.Tensor:
    """Like :func:`neuralode.solvers.linear.jacobian` ("dense" or "batched"), but differentiable.

    ``J`` keeps the graph of ``y`` (when ``y`` requires grad) and of the tensors ``func`` captures, so that
    backpropagation through the step sees ``dJ/dy0`` and ``dJ/dtheta`` (second derivatives of ``f``).
    """
    if getattr(func, "jac", None) is not None:   # the user's J: differentiable as far as its own code is
        with torch.enable_grad():
            return func.user_jacobian(t, y, mode)
    make = dense_jacobian if mode == "dense" else batched_jacobian
    return make(func, t, y, create_graph=True)


def _jvp_with_graph(func, t: float, y: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``J(t, y) v`` differentiable in ``v``, ``y`` and the tensors ``func`` captures.

    ``w -> J^T w`` is linear, so ``J v`` is its vector-Jacobian product with ``v`` (reverse mode twice);
    ``w`` is a dummy that only the inner product sees.
    """
    y_in = y if y.requires_grad else y.detach().requires_grad_(True)
    with torch.enable_grad():
        out = func(t, y_in)
        if not out.requires_grad:
            return torch.zeros_like(v)
        w = torch.zeros_like(out, requires_grad=True)
        (jt_w,) = torch.autograd.grad(out, y_in, w, create_graph=True, allow_unused=True)
        if jt_w is None:
            return torch.zeros_like(v)
        (jv,) = torch.autograd.grad(jt_w, w, v, create_graph=True, allow_unused=True)
    return torch.zeros_like(v) if jv is None else jv


def _attach_linear_gradient(u: torch.Tensor, rhs: torch.Tensor, coefficient: float, func, t: float,
                            y: torch.Tensor, rtol: float) -> torch.Tensor:
    """``u`` (solved without a graph) carrying the exact gradient of ``(I - c J(t, y)) u = c rhs``.

    Differentiating the system gives ``M du = c (d rhs + dJ u)``, so a cotangent ``g`` of ``u`` reaches
    ``rhs``, ``y`` and the parameters as ``lambda = M^{-T} g`` pulled back through ``c (rhs + J u)`` with
    ``u`` constant. The result equals ``u``; a hook swaps ``g`` for ``lambda`` on the way back.
    """
    out = coefficient * (rhs + _jvp_with_graph(func, t, y, u))
    if not out.requires_grad:
        return u
    result = u + (out - out.detach())

    def transposed_solve(g: torch.Tensor | None) -> torch.Tensor | None:
        if g is None:                 # an undefined cotangent (nothing downstream needs u)
            return None
        y_leaf = y.detach().requires_grad_(True)
        with torch.enable_grad():
            f = func(t, y_leaf)
        if not f.requires_grad:
            return g

        def apply(v):
            (row,) = torch.autograd.grad(f, y_leaf, v, retain_graph=True, allow_unused=True)
            return v if row is None else v - coefficient * row

        # The gradient wants a tighter solve than the forward stages: it is exact up to this residual.
        eps = torch.finfo(g.dtype).eps
        solution, _ = gmres(apply, g, rtol=max(100 * eps, min(rtol, 1e-10)), max_iters=2000)
        return solution

    result.register_hook(transposed_solve)
    return result


def make_rodas5(options: dict) -> Rosenbrock:
    """The registry's factory: ``options["jacobian"]`` (default ``"dense"``) and ``options["preconditioner"]``."""
    return Rosenbrock(RODAS5, jacobian=options.get("jacobian", "dense"),
                      preconditioner=options.get("preconditioner"))


__all__ = ["Rosenbrock", "RosenbrockState", "make_rodas5"]
