"""The one stepper behind every implicit Runge-Kutta method (ESDIRK, SDIRK, Radau IIA, Gauss).

A step from ``(t0, y0)`` with size ``h`` solves for the stage states ``Y_i``

    Y_i = y0 + h sum_j a_ij f(t0 + c_i h, Y_j),        y1 = y0 + h sum_i b_i k_i,  k_i = f(t0 + c_i h, Y_i).

*Diagonally implicit* tableaus (``a`` lower triangular) are solved one stage at a time: stage ``i``
is ``z = psi_i + h a_ii f(t_i, z)`` with the known part ``psi_i = y0 + h sum_{j<i} a_ij k_j``; stages
with ``a_ii = 0`` are explicit. *Fully implicit* tableaus solve all stage increments ``Z_i = Y_i - y0``
together, ``Z = h (A (x) I) F(y0 + Z)``, with the ``(s n) x (s n)`` matrix ``I - h A (x) J``; large
systems solve it through the eigenvalues of ``A``, as ``s`` systems of size ``n`` (for Radau IIA with
three stages: one real and one complex LU, :class:`~neuralode.solvers.linear.TransformedSystem`).

Newton's iteration is *simplified* (Hairer and Wanner, Solving ODEs II, Sec. IV.8): one Jacobian
``J = df/dy(t0, y0)`` and one factorised iteration matrix serve every iteration and every stage of a
step, and further steps while Newton keeps converging fast (at most two iterations or a contraction
rate ``theta <= 1e-3``, the rule of scipy's Radau); while J is kept, a step the controller would
lengthen by less than 1.2x keeps its length, so the LU is reused too (RADAU5; ``keep_step``). Iteration
stops when the predicted remaining error ``theta / (1 - theta) |dz|`` falls below ``kappa = max(10 eps /
rtol, min(0.03, rtol^(1/2)))`` (RADAU5's FNEWT, scipy's rule; see ``_newton_kappa``), with ``theta``
measured in this solve, so after two iterations at the earliest (scipy's rule; RADAU5 may stop after one on
the previous step's rate, which leaves a component that depends nonlinearly on the others unconverged), after
three where that first rate exceeds 0.1 (a second rate confirms it: ``_CONFIRM_THETA``), and
``|dz|`` in the larger of the error norm and the RMS over every component (``_covering_norm``); it fails
when ``theta >= 0.99`` or convergence within ``max_iters`` is out of reach, unless the correction is within
rounding of the iterate (converged to working precision: the same correction comes back with rate 1). A failed
step is retried once with a fresh Jacobian; with a fresh one it is rejected and the loop halves ``h``.
On a fixed grid, which cannot shrink, the last resort is full Newton (J at every iterate).
Fully implicit stages start from the last accepted step's collocation polynomial, extrapolated to the new
stage times (RADAU5; scipy's Radau); diagonally implicit ones from the previous stage's derivative.
The stage derivatives of implicit stages are ``k_i = (z - psi_i) / (h a_ii)`` rather than ``f(t_i,
z)``: for stiff components ``f`` amplifies the Newton error by ``|h lambda|`` (Hairer-Wanner IV.8).

Gradients (direct backpropagation and checkpoint replay) never differentiate through Newton's
iterations: the converged stages are differentiated by the implicit function theorem. With the
stage equation written as a fixed point ``z = Phi(z; y0, theta)``,

    dz/dtheta = (I - dPhi/dz)^{-1} dPhi/dtheta,

so the backward pass solves one *transposed* linear system per stage solve
(:func:`attach_implicit_gradient`) and backpropagates through one evaluation of ``Phi``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from ..controllers import rms_norm
from ..interpolation import hermite_coefficients
from .base import Solver
from .linear import (KrylovFailure, Leading, SingularMatrixError, TransformedSystem, build_system, gmres, jacobian,
                     leading_unknowns, positive_scale)
from .runge_kutta import StepOutcome, linear_combination

# Hairer's RADAU5: keep J for the next step only if Newton contracted at least this fast.
_REUSE_JACOBIAN_THETA = 1e-3
# Step factor after a Newton failure with a fresh Jacobian (Hairer-Wanner IV.8: halve the step).
_NEWTON_FAILURE_FACTOR = 0.5
# Newton stops when its predicted remaining error is below kappa times the tolerance, kappa = max(10 eps /
# rtol, min(0.03, sqrt(rtol))) (scipy's Radau; Hairer's FNEWT). The Newton error of every step stays in
# the solution, and over a thousand steps it adds up: on Van der Pol mu = 1000 over [0, 3000] at rtol 1e-6
# a constant kappa = 0.03 left radau5 2300x and kvaerno5 340x the tolerance at the end (0.01: 670x and
# 0.7x); this rule (1e-3 here) gave 0.09x and 4x for 15-20% more evaluations.
# A contraction rate measured once (after the second iteration) is trusted up to this value; above it Newton
# iterates until a second rate is measured. On Van der Pol mu = 1000 at rtol 1e-4, 6 of radau5's 415 Newton
# solves stopped after two iterations at a measured rate of 0.10-0.53 with 4.6-47x kappa of error left (the
# largest left after this rule: 2.3x); the end point was 253x the tolerance, 0.21x with this rule, for 1% fewer
# evaluations.
_CONFIRM_THETA = 0.1
# Iteration matrices I - C (x) J whose C agree to this relative tolerance are the same matrix (one LU).
_SAME_MATRIX_RTOL = 1e-12


# GMRES's absolute residual bound, as a fraction of Newton's tolerance (KrylovSystem.residual_rms): CVODE's
# linear tolerance factor (eplifac, 0.05 by default; PETSc's TSSundialsSetLinearTolerance documents the same).
_KRYLOV_NEWTON_FRACTION = 0.05


def _newton_kappa(rtol: float, eps: float) -> float:
    return max(10 * eps / max(rtol, 1e-300), min(0.03, math.sqrt(rtol)))


@dataclass
class ImplicitState:
    """Mutable Newton bookkeeping carried across the steps of one solve."""

    jacobian: Any = None
    jacobian_point: Any = None        # the y0 tensor J was computed at (identity: a retried step has the same)
    recompute: bool = False           # Newton was slow on the last step: refresh J at the next point
    systems: dict = field(default_factory=dict)   # coefficient key -> factorised iteration matrix
    scale: Any = None                 # the error norm's scale at this step's y0 (Krylov solves use it)
    kappa: float = 0.0                # Newton's tolerance in the error norm's units (Krylov solves use it)
    last_rejected: bool = True        # the previous attempt was rejected (or none yet): RADAU5's error refinement
    unknowns: Any = None              # Newton's unknowns: the leading components (quadratures excluded), or None: all
    # The coupled stages' last attempt (y1, h, Z) and the last accepted one: Newton's starting guess extrapolates
    # the accepted step's collocation polynomial (RADAU5's STARTN = 0, scipy Radau's Z0).
    attempted: Any = None
    accepted: Any = None
    counters: dict = field(default_factory=lambda: {"n_jacobians": 0, "n_lu": 0, "n_newton_iters": 0,
                                                    "n_newton_failures": 0, "n_jvp": 0})


class NewtonFailure(Exception):
    """Newton's iteration diverged or could not converge in ``max_iters`` (internal signal)."""

    def __init__(self, reason: str, non_finite: bool = False):
        super().__init__(reason)
        self.reason, self.non_finite = reason, non_finite


@dataclass(frozen=True, eq=False)
class ImplicitRungeKutta(Solver):
    """Runs an :class:`~neuralode.tableaus.implicit.ImplicitTableau`.

    Parameters
    ----------
    tableau : ImplicitTableau
    jacobian : {"dense", "batched", "krylov"}
        How ``df/dy`` is formed and the iteration matrix solved (:mod:`neuralode.solvers.linear`).
    max_iters : int
        Newton iterations per stage solve before the step is declared failed.
    preconditioner : callable, optional
        ``preconditioner(v, c) ~ (I - c J)^{-1} v`` for ``jacobian="krylov"`` (diagonally implicit
        methods).
    radau_error : bool
        Use Hairer's RADAU5 error estimate (three-stage Radau IIA only) instead of ``b_err``.
    keep_step : (float, float) or None
        After an accepted step whose Jacobian is kept for the next one, a new step length within this
        range of the old one (as a ratio) is replaced by the old one, so that the factorised iteration
        matrix is reused: RADAU5's QUOT1 = 1, QUOT2 = 1.2 (Hairer and Wanner, Sec. IV.8). ``None``: every
        change of ``h`` refactorises. Not applied with ``jacobian="krylov"`` (nothing is factorised).
    """

    tableau: Any
    jacobian: str = "dense"
    max_iters: int = 10
    implicit = True    # (class attribute, not a field) solves stiff problems
    lands_on_outputs = True
    preconditioner: Callable | None = None
    radau_error: bool = False
    keep_step: tuple | None = (1.0, 1.2)
    _diagonal: bool = field(init=False, repr=False)
    _stages: tuple = field(init=False, repr=False)
    _A: np.ndarray = field(init=False, repr=False)
    _solution_weights: tuple = field(init=False, repr=False)
    _b: tuple = field(init=False, repr=False)
    _b_err: tuple = field(init=False, repr=False)
    _dense_rows: tuple = field(init=False, repr=False)
    _filter_gamma: float = field(init=False, repr=False)

    def __post_init__(self):
        tab = self.tableau
        set_ = object.__setattr__
        A = np.asarray(tab.a, dtype=np.float64)
        set_(self, "_A", A)
        set_(self, "_diagonal", bool(np.allclose(np.triu(A, 1), 0.0)))
        set_(self, "_stages", tuple((float(tab.c[i]), float(A[i, i]), _sparse(A[i, :i])) for i in range(len(tab.c))))
        set_(self, "_b", _sparse(tab.b))
        set_(self, "_b_err", _sparse(tab.b_err) if tab.b_err is not None else ())
        # A derived continuous extension: the weights of each power of theta on the stages (else cubic Hermite).
        set_(self, "_dense_rows", tuple(_sparse(column) for column in tab.dense.T) if tab.dense_order else ())
        # Fully implicit with an invertible A: y1 = y0 + b^T A^{-1} Z needs no further evaluation of f
        # (Hairer-Wanner IV.8, eq. 8.2b); a stiffly accurate method's weights are then (0, ..., 0, 1).
        weights = ()
        if not self._diagonal and abs(np.linalg.det(A)) > 1e-12:
            weights = tuple(np.linalg.solve(A.T, np.asarray(tab.b, dtype=np.float64)))
        set_(self, "_solution_weights", weights)
        # The interpolant check filters with I - h gamma J for a gamma whose LU the step holds already: the largest
        # stage diagonal, or the real eigenvalue of A (Radau IIA's gamma0, the real block of its transformed LU).
        if self._diagonal:
            gamma = max(diagonal for _, diagonal, _ in self._stages)
        else:
            eigenvalues = np.linalg.eigvals(A)
            real = eigenvalues[np.abs(eigenvalues.imag) <= 1e-12 * np.abs(eigenvalues)].real
            gamma = float(real.max()) if real.size else float(eigenvalues.real.max())
        if self.radau_error:
            gamma = 1.0 / _RADAU_MU_REAL     # (exactly the error estimate's, so that its LU serves the check too)
        set_(self, "_filter_gamma", float(gamma))
        if self.radau_error and (len(tab.c) != 3 or self._diagonal):
            raise ValueError("radau_error applies to the three-stage Radau IIA method only")
        if self.keep_step is not None and not (len(self.keep_step) == 2 and 0 < self.keep_step[0] <= self.keep_step[1]):
            raise ValueError(f"keep_step must be None or a range (low, high) of step ratios with 0 < low <= high, "
                             f"e.g. RADAU5's (1.0, 1.2); got {self.keep_step!r}")

    # --- facts the loop and the gradient strategies read ----------------------------------------------
    @property
    def order(self) -> int:
        return self.tableau.order

    @property
    def adaptive(self) -> bool:
        return self.radau_error or self.tableau.b_err is not None

    @property
    def error_order(self) -> int | None:
        if self.radau_error:
            return 3
        # (the estimate is as large as the lower-order solution's error: adaptive implicit Euler's embedded trapezoid
        # is of order 2, its estimate O(h^2))
        return None if self.tableau.error_order is None else min(self.tableau.error_order, self.order)

    @property
    def initial_step_order(self) -> int:
        return self.error_order or self.order

    def init(self, func, t0: float, y0: torch.Tensor, f0: torch.Tensor) -> ImplicitState:
        return self.blank_state()

    @staticmethod
    def blank_state() -> ImplicitState:
        """A state no step has used (its counters at zero), for statistics of a phase that never ran."""
        return ImplicitState()

    @staticmethod
    def jacobian_at(state: ImplicitState, y0: torch.Tensor) -> torch.Tensor | None:
        """The Newton Jacobian if it was computed at ``y0`` itself (dense or batched), else ``None``."""
        J = state.jacobian
        return J if isinstance(J, torch.Tensor) and state.jacobian_point is y0 else None

    def statistics(self, state: ImplicitState | None) -> dict:
        return dict(state.counters) if state is not None else {}

    def stiff_filter(self, outcome: StepOutcome, h: float):
        state = outcome.state
        gamma = self._filter_gamma
        if not isinstance(state, ImplicitState) or state.jacobian is None or gamma <= 0:
            return None
        system = None
        if self._diagonal:
            system = self._system(state, f"diagonal:{gamma!r}", np.array([[h * gamma]]))
        else:
            coupled = state.systems.get("coupled")
            if coupled is not None and isinstance(coupled[1], TransformedSystem):
                system = coupled[1].block(h * gamma)
            if system is None:   # (small systems keep the coupled LU: RADAU5's error estimate factorised this one)
                system = self._system(state, "radau_error" if self.radau_error else "filter", np.array([[h * gamma]]))
        m = state.unknowns
        if m is not None:   # (J of the leading components: the quadratures pass unfiltered)
            return gamma, lambda v: torch.cat((system.solve(v[None, :m])[0], v[m:]))
        return gamma, lambda v: system.solve(v[None])[0]

    # --- one step ------------------------------------------------------------------------------------
    def step(self, func: Callable, t0: float, y0: torch.Tensor, f0: torch.Tensor, h: float,
             error_norm: Callable, state: ImplicitState, explicit=None) -> StepOutcome:
        """One step; ``explicit``: an IMEX method's explicit term (:class:`~neuralode.solvers.imex.ExplicitTerm`),
        with ``func`` its implicit term and ``f0`` their sum at ``(t0, y0)``."""
        if y0.numel() == 0:
            # Nothing to solve (an empty state): every stage is y0, every derivative f0.
            ratio = y0.new_zeros(()) if self.adaptive else None
            return StepOutcome(y0 + 0 * h, f0, ratio, self.error_order, stages=(f0, [f0] * len(self._stages)),
                               state=state)
        unknowns = self._unknowns(func, y0)
        if unknowns != state.unknowns:   # (a J of the other size: formed again)
            state.jacobian, state.unknowns = None, unknowns
        fresh = state.jacobian_point is y0
        if state.jacobian is None or (not fresh and state.recompute):
            self._refresh_jacobian(func, t0, y0, state)
            fresh = True
        full_newton = False
        while True:
            try:
                return self._attempt(func, t0, y0, f0, h, error_norm, state, full_newton, explicit)
            except (NewtonFailure, SingularMatrixError) as failure:
                state.counters["n_newton_failures"] += 1
                reason = (failure.reason if isinstance(failure, (NewtonFailure, KrylovFailure)) else
                          f"the iteration matrix I - h*gamma*J is singular (h={abs(h):.3g})")
                if not fresh:
                    # A stale Jacobian is the usual cause: retry the same step with a fresh one.
                    self._refresh_jacobian(func, t0, y0, state)
                    fresh = True
                elif not self.adaptive and not full_newton:
                    # A fixed grid cannot shrink the step: last, full Newton (J at every iterate), which
                    # converges where J(y0) misleads (Robertson's y2 = 0 at t = 0 hides the 6e7 y2 term).
                    full_newton = True
                elif failure.non_finite:
                    # NaN or inf in the iterates: a failure of the vector field, reported as the loop
                    # reports any non-finite step (it shrinks the step, then names the time).
                    state.last_rejected = True
                    nan = torch.full_like(y0, math.nan)
                    return StepOutcome(nan, None, nan.sum() if self.adaptive else None, self.error_order,
                                       stages=(f0, [nan] * len(self._stages)), state=state)
                else:
                    state.last_rejected = True
                    return StepOutcome(y0, None, None, self.error_order, state=state,
                                       step_factor=_NEWTON_FAILURE_FACTOR, failure=reason)

    def _unknowns(self, func, y0) -> int | None:
        """How many leading components Newton iterates on, or ``None``: all. A field may declare its components from
        ``quadrature_from`` on quadratures, whose derivative depends on the others only (the adjoint's parameter
        cotangents ``a_theta``): a stage then solves for the leading ones, and the quadratures follow from the field's
        value, so the Jacobian and the iteration matrix have the leading size (the adjoint of a network with ``p``
        parameters solved systems of ``2 n + p`` unknowns, ``2 n`` now). Diagonally implicit stages without a graph
        only (the backward solves): a graph-carrying stage keeps the implicit function theorem's full system."""
        if not self._diagonal or self.preconditioner is not None:   # (a preconditioner is written for the whole state)
            return None
        return leading_unknowns(func, y0)

    def _refresh_jacobian(self, func, t0, y0, state):
        if state.unknowns is not None:
            m = state.unknowns
            state.jacobian = jacobian(self.jacobian, Leading(func, y0.detach()[m:]), t0, y0.detach()[:m],
                                      state.counters)
        else:
            state.jacobian = jacobian(self.jacobian, func, t0, y0.detach(), state.counters)
        state.jacobian_point = y0
        state.systems.clear()
        state.counters["n_jacobians"] += 1

    def _system(self, state: ImplicitState, key: str, C: np.ndarray):
        """The factorised ``I - C (x) J`` for the current J, refactorised only when ``C`` changed beyond rounding: a
        step kept at the same length advances the time by ``fl(t0 + h) - t0``, which differs from ``h`` in the last
        bits, and simplified Newton's matrix is an approximation anyway."""
        cached = state.systems.get(key)
        if cached is not None and np.allclose(cached[0], C, rtol=_SAME_MATRIX_RTOL, atol=0.0):
            system = cached[1]
        else:
            system = build_system(self.jacobian, C, state.jacobian, self.preconditioner)
            state.systems[key] = (C, system)
            state.counters["n_lu"] += 1
        return self._in_error_units(system, state)

    def _fresh_system(self, func, t: float, y: torch.Tensor, C: np.ndarray, state: ImplicitState):
        """Full Newton's iteration matrix, with J at the current iterate (not cached)."""
        state.counters["n_jacobians"] += 1
        state.counters["n_lu"] += 1
        linearization = jacobian(self.jacobian, func, t, y, state.counters)
        system = build_system(self.jacobian, C, linearization, self.preconditioner)
        return self._in_error_units(system, state)

    def _in_error_units(self, system, state: ImplicitState):
        """A Krylov system works in this step's error-norm units and stops at a fraction of Newton's tolerance
        (KrylovSystem.scale, .residual_rms); a factorised one needs neither."""
        if self.jacobian == "krylov":
            system.scale = state.scale
            system.residual_rms = _KRYLOV_NEWTON_FRACTION * state.kappa
        return system

    def _attempt(self, func, t0, y0, f0, h, error_norm, state, full_newton=False, explicit=None) -> StepOutcome:
        rtol = error_norm.rtol
        # The tightest component sets Newton's tolerance (a loose one must not loosen the others).
        rtol = float(rtol.min()) if isinstance(rtol, torch.Tensor) else float(rtol)
        eps = torch.finfo(y0.dtype if not y0.is_complex() else y0.real.dtype).eps
        kappa = _newton_kappa(rtol, eps)
        with torch.no_grad():
            # With atol = 0 a component that is 0 at y0 has no scale there: take it from the Euler predictor too
            # (a velocity that starts at 0 made every Newton correction infinite, blamed on the field).
            if error_norm.scale_can_vanish:
                scale = positive_scale(error_norm.scale(y0, y0 + h * f0), torch.finfo(y0.real.dtype).tiny)
            else:
                scale = error_norm.scale(y0)
        norm = _covering_norm(error_norm.norm)
        if state.unknowns is not None:
            # (Newton's unknowns only: a norm written for the whole state would misread them)
            scale, norm = scale[:state.unknowns], rms_norm
        state.scale, state.kappa = scale, kappa
        newton = _Newton(norm, scale, kappa, self.max_iters, state, full_newton,
                         divide=error_norm.scaled)
        grad = torch.is_grad_enabled()
        if self._diagonal:
            ks, y1 = self._diagonal_stages(func, t0, y0, f0, h, newton, state, grad, explicit)
        else:
            ks, y1, Z = self._coupled_stages(func, t0, y0, f0, h, newton, state, grad)
        # scipy's Radau rule: a Newton solve that needed more than two iterations at a contraction rate
        # above 1e-3 asks for a fresh Jacobian at the next point (RADAU5 refreshes on the rate alone,
        # which on Robertson recomputed J at 56 of 72 steps against scipy's 18).
        state.recompute = newton.iterations_max > 2 and newton.theta_max > _REUSE_JACOBIAN_THETA
        # (an IMEX step's last stage is no f(t1, y1): its explicit term's weights differ from its last row)
        f1 = ks[-1] if self.tableau.stiffly_accurate and explicit is None else None
        ratio = None
        if self.adaptive:
            with torch.no_grad():
                if self.radau_error:
                    ratio = self._radau_error(func, t0, y0, f0, y1, h, Z, error_norm, state)
                else:
                    ratio = error_norm(linear_combination(None, h, ks, self._b_err), y0, y1)
                state.last_rejected = not bool(ratio <= 1.0)
        # Hairer's RADAU5 (QUOT1 = 1, QUOT2 = 1.2): a step the controller would lengthen by less than 1.2
        # keeps its length while the Jacobian is kept, so that the next step reuses the factorised iteration
        # matrix. scipy's Radau also keeps it for any shrinking factor after an accepted step; we follow
        # RADAU5, which lets the error decide where it asks for a shorter step. GMRES factorises nothing.
        keep = self.keep_step if not (state.recompute or self.jacobian == "krylov") else None
        return StepOutcome(y1, f1, ratio, self.error_order, stages=(f0, ks), state=state, keep_step=keep)

    def _diagonal_stages(self, func, t0, y0, f0, h, newton, state, grad, explicit=None):
        # ks: the stage derivatives of func; with an explicit term (IMEX), kes those of that term, whose own stage
        # matrix enters every stage's known part psi (Kennedy and Carpenter 2003, eq. 3).
        ks, kes = [], []
        for i, (c, diagonal, terms) in enumerate(self._stages):
            t_i = t0 + c * h
            psi = linear_combination(y0, h, ks, terms) if terms else y0
            if explicit is not None and explicit.rows[i]:
                psi = linear_combination(psi, h, kes, explicit.rows[i])
            if diagonal == 0.0:
                # An explicit stage; ESDIRK's first (c = 0, at y0) reuses f0 (an IMEX method's, its terms' parts).
                first = i == 0 and c == 0.0
                if explicit is None:
                    ks.append(f0 if first else func(t_i, psi))
                else:
                    ks.append(explicit.implicit_start if first else func(t_i, psi))
                    kes.append(explicit.start if first else explicit.field(t_i, psi))
                continue
            coefficient = h * diagonal
            system = self._system(state, f"diagonal:{diagonal!r}", np.array([[coefficient]]))
            if state.unknowns is not None:
                k, stage = self._leading_stage(func, t_i, psi, coefficient, ks[-1] if ks else f0, newton, system,
                                               state)
                ks.append(k)
                if explicit is not None:
                    kes.append(explicit.field(t_i, stage))
                continue
            psi_known = psi.detach()
            guess = psi_known + coefficient * (ks[-1] if ks else f0).detach()

            def fixed_point(z, psi=psi, t_i=t_i, coefficient=coefficient):
                return psi + coefficient * func(t_i, z[0])[None]

            z = newton.solve(lambda z: fixed_point(z, psi_known) - z, guess[None], system,
                             lambda z, t_i=t_i, C=np.array([[coefficient]]): self._fresh_system(func, t_i, z[0], C, state))
            if grad:
                # Every name the closure needs is bound now: it runs in the backward pass, after the loop.
                z = attach_implicit_gradient(
                    z, fixed_point, lambda z, phi=fixed_point, psi_known=psi_known: phi(z, psi_known), self.jacobian)
            ks.append((z[0] - psi) / coefficient)
            if explicit is not None:
                kes.append(explicit.field(t_i, z[0]))
        if explicit is not None:
            # (both terms weigh their stages by one b: summed once here, the weights, the error estimate and the dense
            # output apply to the sum)
            ks = [k + ke for k, ke in zip(ks, kes)]
        # For a stiffly accurate method this is the last stage state itself, up to rounding.
        y1 = linear_combination(None, h, ks, self._b).add_(y0)
        return ks, y1

    def _leading_stage(self, func, t_i, psi, coefficient, previous, newton, system, state):
        """A diagonally implicit stage solved for the leading components only (see :meth:`_unknowns`): returns the
        stage derivative and the stage state. The quadratures' derivative is the field's value at the converged leading
        components: one evaluation more a stage. (Newton's last evaluation, one correction earlier, saved it, but the
        gradients moved by up to 8x their error: kvaerno5's from 9.7e-8 to 8.7e-7 on benchmarks/imex.py's case 3.)"""
        m = state.unknowns
        psi_u, psi_q = psi[:m], psi[m:]

        def residual(z):
            return psi_u + coefficient * func(t_i, torch.cat((z[0], psi_q)))[None, :m] - z

        def fresh_system(z):
            return self._fresh_system(Leading(func, psi_q), t_i, z[0], np.array([[coefficient]]), state)
        z = newton.solve(residual, (psi_u + coefficient * previous[:m])[None], system, fresh_system)
        k_q = func(t_i, torch.cat((z[0], psi_q)))[m:]
        k = torch.cat(((z[0] - psi_u) / coefficient, k_q))
        return k, torch.cat((z[0], psi_q + coefficient * k_q))

    def _coupled_stages(self, func, t0, y0, f0, h, newton, state, grad):
        times = [t0 + c * h for c, _, _ in self._stages]
        C = h * self._A
        A_t = torch.as_tensor(C, dtype=y0.dtype, device=y0.device)
        system = self._system(state, "coupled", C)

        def fixed_point(Z, y0=y0):
            F = torch.stack([func(t_i, y0 + Z[i]) for i, t_i in enumerate(times)])
            return torch.einsum("ij,j...->i...", A_t, F)

        y0_known = y0.detach()
        guess = self._extrapolated_guess(state, y0, h)
        if guess is None:
            guess = torch.stack([(c * h) * f0.detach() for c, _, _ in self._stages])
        Z = newton.solve(lambda Z: fixed_point(Z, y0_known) - Z, guess, system,
                         lambda Z: self._fresh_system(func, times[-1], y0_known + Z[-1], C, state))
        if grad:
            Z = attach_implicit_gradient(Z, fixed_point, lambda Z: fixed_point(Z, y0_known), self.jacobian)
        if self._solution_weights:
            # h K = A^{-1} Z: the stage derivatives without evaluating f again.
            hK = torch.einsum("ij,j...->i...", torch.as_tensor(np.linalg.inv(self._A), dtype=y0.dtype,
                                                                device=y0.device), Z)
            ks = list((hK / h).unbind(0))
            y1 = y0 + torch.einsum("i,i...->...", torch.as_tensor(self._solution_weights, dtype=y0.dtype,
                                                                   device=y0.device), Z)
        else:
            ks = [func(t_i, y0 + Z[i]) for i, t_i in enumerate(times)]
            y1 = linear_combination(None, h, ks, self._b).add_(y0)
        state.attempted = (y1, h, Z.detach())   # a step that starts from y1 shows this attempt was accepted
        return ks, y1, Z

    def _extrapolated_guess(self, state: ImplicitState, y0: torch.Tensor, h: float):
        """Stage increments ``u(t0 + c_i h) - y0`` from the previous accepted step's collocation polynomial ``u``
        (degree s through ``(0, 0)`` and ``(c_j, Z_j)`` in that step's scaled time), or ``None`` without one. A
        step that starts where the last attempt ended shows that attempt was accepted."""
        if state.attempted is not None and state.attempted[0] is y0:
            state.accepted = state.attempted
        if state.accepted is None or state.accepted[0] is not y0 or not self.tableau.stiffly_accurate:
            return None
        _, h_previous, Z_previous = state.accepted
        nodes = np.concatenate([[0.0], np.asarray(self.tableau.c, dtype=np.float64)])
        thetas = 1.0 + np.asarray(self.tableau.c, dtype=np.float64) * (h / h_previous)
        # Lagrange weights of the nodes at each theta; the node 0 carries the value 0.
        weights = np.ones((len(thetas), len(nodes)))
        for j, node in enumerate(nodes):
            for m, other in enumerate(nodes):
                if m != j:
                    weights[:, j] *= (thetas - other) / (node - other)
        W = torch.as_tensor(weights[:, 1:], dtype=Z_previous.dtype, device=Z_previous.device)
        # u(theta) - y0 = u(theta) - u(1): y0 = y_previous + Z_s for a stiffly accurate method (c_s = 1)
        return torch.einsum("ij,j...->i...", W, Z_previous) - Z_previous[-1]

    def _radau_error(self, func, t0, y0, f0, y1, h, Z, error_norm, state):
        """Hairer's RADAU5 estimate: ``err = (I - h gamma0 J)^{-1} (gamma0 h f0 + gamma0 sum_i e_i Z_i)``.

        ``1 / gamma0`` is the real eigenvalue of ``A^{-1}`` (3 + 3^(2/3) - 3^(1/3)) and ``e`` the weights
        of the embedded formula (Hairer and Wanner, Solving ODEs II, Sec. IV.8, eq. 8.19-8.20; the values
        in scipy's ``radau.py``). The filter ``(I - h gamma0 J)^{-1}`` keeps the estimate bounded for
        stiff components. After a rejection (or on the first step) an estimate above 1 is refined once
        with ``f(t0, y0 + err)`` in place of ``f0`` (eq. 8.21), as RADAU5 does.
        """
        gamma0 = 1.0 / _RADAU_MU_REAL
        # h gamma0 is the real eigenvalue of C = h A: the transformed coupled system holds this LU already.
        coupled = state.systems.get("coupled")
        system = coupled[1].block(h * gamma0) if coupled and isinstance(coupled[1], TransformedSystem) else None
        if system is None:
            system = self._system(state, "radau_error", np.array([[h * gamma0]]))
        Z = Z.detach()
        ZE = torch.einsum("i,i...->...", torch.as_tensor(_RADAU_E, dtype=y0.dtype, device=y0.device), Z)
        error = system.solve((gamma0 * (h * f0.detach() + ZE))[None])[0]
        ratio = error_norm(error, y0, y1)
        if state.last_rejected and not bool(ratio <= 1.0):
            error = system.solve((gamma0 * (h * func(t0, y0.detach() + error) + ZE))[None])[0]
            ratio = error_norm(error, y0, y1)
        return ratio

    # --- dense output --------------------------------------------------------------------------------
    def dense_coefficients(self, func, t0: float, y0: torch.Tensor, h: float, outcome: StepOutcome,
                           f1: torch.Tensor) -> list:
        """The tableau's continuous extension on the stages where it has one (kvaerno5: order 4; radau5: the
        collocation polynomial), else the cubic Hermite through ``(y0, f0)`` and ``(y1, f1)`` (third order, as
        diffrax's Kvaerno uses)."""
        if self._dense_rows:
            ks = outcome.stages[1]
            return [y0] + [linear_combination(None, h, ks, terms) for terms in self._dense_rows]
        return hermite_coefficients(y0, outcome.stages[0], outcome.y1, f1, h)


def _covering_norm(norm: Callable) -> Callable:
    """The norm of Newton's convergence test: the error norm, but never blind to a component.

    An error norm may leave components out on purpose: the adjoint's seminorm drops the parameter
    adjoint ``a_theta`` from step-size control (Kidger et al. 2021), since no other component depends on
    it. Its stage values are still unknowns of the Newton system, and a convergence test in that norm
    would stop with them unconverged (the parameter gradient was then off by up to 1e-2 relative at
    rtol 1e-6). The larger of the error norm and the RMS over every component decides.
    """
    if norm is rms_norm:
        return norm
    return lambda x: torch.maximum(torch.as_tensor(norm(x), dtype=x.real.dtype), rms_norm(x))


def _sparse(weights) -> tuple:
    return tuple((j, float(w)) for j, w in enumerate(weights) if w != 0)


_RADAU_MU_REAL = 3 + 3 ** (2 / 3) - 3 ** (1 / 3)
_SQRT6 = math.sqrt(6.0)
_RADAU_E = (np.array([-13 - 7 * _SQRT6, -13 + 7 * _SQRT6, -1.0]) / 3).tolist()


class _Newton:
    """Simplified Newton with Hairer's convergence monitoring; one instance per step attempt."""

    def __init__(self, norm, scale, kappa, max_iters, state, full=False, divide=torch.div):
        self.norm, self.scale, self.kappa, self.max_iters, self.state = norm, scale, kappa, max_iters, state
        self.divide = divide   # the error norm's division (0/0 = 0 where atol = 0)
        self.full = full
        self.theta_max = 0.0
        self.iterations_max = 0

    def solve(self, residual: Callable, z: torch.Tensor, system, system_at: Callable) -> torch.Tensor:
        """Iterate ``z += M^{-1} residual(z)`` until converged; raises :class:`NewtonFailure`.

        ``system_at(z)`` builds the matrix at the iterate ``z``, used at every iteration in full mode.
        """
        state = self.state
        previous = None
        rates = 0
        with torch.no_grad():
            for k in range(self.max_iters):
                if self.full:
                    system = system_at(z)
                delta = system.solve(residual(z))
                z = z + delta
                state.counters["n_newton_iters"] += 1
                self.iterations_max = max(self.iterations_max, k + 1)
                # The error norm takes one state (tuple states are split by it): one norm per stage.
                size = float(torch.stack([self.norm(self.divide(d, self.scale)) for d in delta]).max())
                if not math.isfinite(size):
                    raise NewtonFailure("Newton's iteration produced non-finite values", non_finite=True)
                if size == 0.0:
                    break
                if previous is not None:
                    theta = size / previous
                    if theta >= _CONFIRM_THETA and _within_rounding(delta, z, self.scale):
                        # Converged to working precision: the correction no longer moves the iterate, so the
                        # same correction comes back and its rate reads 1 (float32 at rtol 1e-6 read that as
                        # divergence: kvaerno5 rejected 9,956 steps on a problem it now solves in 20).
                        break
                    self.theta_max = max(self.theta_max, theta)
                    # Full Newton may grow before it converges quadratically: only max_iters bounds it.
                    if theta >= 0.99 and not self.full:
                        raise NewtonFailure(f"Newton's iteration diverged (contraction rate {theta:.3g})")
                    eta = theta / (1 - theta) if theta < 1 else math.inf
                    remaining = self.max_iters - 1 - k
                    if not self.full and remaining > 0 and theta ** remaining / (1 - theta) * size > self.kappa:
                        raise NewtonFailure(f"Newton's iteration converges too slowly (rate {theta:.3g}) to "
                                            f"finish in max_iters={self.max_iters}")
                    # Converged only on a rate measured here: the first iteration's size says nothing about
                    # the components it has not yet moved (see the module docstring). A single rate above
                    # _CONFIRM_THETA is confirmed by a second one: the first two corrections can be ruled by
                    # components that converge fast while a slow one hides behind them.
                    rates += 1
                    if eta * size <= self.kappa and (rates > 1 or theta <= _CONFIRM_THETA):
                        break
                previous = size
            else:
                raise NewtonFailure(f"Newton's iteration did not converge in max_iters={self.max_iters} iterations")
        return z


def _within_rounding(delta: torch.Tensor, z: torch.Tensor, scale: torch.Tensor) -> bool:
    """Whether every component of Newton's correction is within rounding of the iterate ``z``: a couple of
    units in its last place, or of ``eps`` in the error norm's ``scale`` for components near zero."""
    eps = torch.finfo(z.real.dtype if z.is_complex() else z.dtype).eps
    return bool((delta.abs() <= eps * (2 * z.abs() + scale)).all())


def attach_implicit_gradient(z_star: torch.Tensor, fixed_point: Callable, fixed_point_known: Callable,
                             mode: str) -> torch.Tensor:
    """``z_star`` (converged, no graph), given the gradient of the implicit function theorem.

    ``fixed_point(z)`` is ``Phi`` of the stage equation ``z = Phi(z)``, built from tensors that carry
    the graph (``y0``, earlier stages, parameters inside ``func``). The result equals ``z_star``; in the
    backward pass the incoming cotangent ``g`` is replaced by ``lambda`` solving
    ``(I - dPhi/dz)^T lambda = g`` before it flows into ``Phi``'s inputs. ``dPhi/dz`` is evaluated at
    ``z_star`` (exactly: not the possibly stale Jacobian of the forward iteration). Dense and batched
    modes form it from ``s n`` (or ``s m``) vector-Jacobian products and solve directly; the Krylov
    mode runs GMRES with vector-Jacobian products and never forms it. ``fixed_point_known`` is the same
    map with its inputs detached: ``dPhi/dz`` is taken from it, in the backward pass only.

    Cost: one evaluation of ``Phi`` in the forward pass (only when grad mode is on; if nothing it
    depends on requires grad, ``z_star`` comes back unchanged) and one more in the backward pass.
    """
    with torch.enable_grad():
        out = fixed_point(z_star.detach())
    if not out.requires_grad:
        return z_star
    result = z_star.detach() + (out - out.detach())

    def transposed_solve(g: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            # A backward pass that records its own graph (create_graph=True) would need lambda's dependence on
            # z*, y0 and the parameters through dPhi/dz; computed without it, second derivatives came out wrong
            # (kvaerno5: 1700x too small) or without a graph. Refused rather than wrong.
            raise RuntimeError("double backward (create_graph=True) through an implicit method's stage equations is "
                               "not supported: use an explicit method or a Rosenbrock method (rodas5p, which "
                               "solves no nonlinear equation) for higher derivatives through the solve")
        z_leaf = z_star.detach().requires_grad_(True)
        with torch.enable_grad():
            out_z = fixed_point_known(z_leaf)
        if not out_z.requires_grad:   # Phi does not depend on z (f independent of y): lambda = g
            return g

        def pullback(v):
            (row,) = torch.autograd.grad(out_z, z_leaf, v, retain_graph=True, allow_unused=True)
            return torch.zeros_like(v) if row is None else row

        if mode == "krylov":
            eps = torch.finfo(g.dtype).eps
            solution, _ = gmres(lambda v: v - pullback(v), g, rtol=max(1e-12, 100 * eps), max_iters=2000)
            return solution
        if mode == "dense":
            size = z_star.numel()
            basis = torch.eye(size, dtype=g.dtype, device=g.device).reshape((size,) + g.shape)
            rows = _batched_pullback(out_z, z_leaf, basis).reshape(size, size)      # dPhi/dz
            matrix = torch.eye(size, dtype=g.dtype, device=g.device) - rows
            return torch.linalg.solve(matrix.T, g.reshape(-1, 1)).reshape(g.shape)
        # batched: z is (s, batch, ...); one (s m) block per sample from s m products.
        s, batch = g.shape[0], g.shape[1]
        m = g[0, 0].numel()
        eye = torch.eye(s * m, dtype=g.dtype, device=g.device).reshape(s * m, s, 1, m)
        basis = eye.expand(s * m, s, batch, m).reshape((s * m,) + g.shape)
        rows = _batched_pullback(out_z, z_leaf, basis).reshape(s * m, s, batch, m)
        blocks = rows.permute(2, 0, 1, 3).reshape(batch, s * m, s * m)
        matrix = torch.eye(s * m, dtype=g.dtype, device=g.device) - blocks
        rhs = g.reshape(s, batch, m).permute(1, 0, 2).reshape(batch, s * m, 1)
        solution = torch.linalg.solve(matrix.transpose(1, 2), rhs)
        return solution.reshape(batch, s, m).permute(1, 0, 2).reshape(g.shape)

    result.register_hook(transposed_solve)
    return result


def _batched_pullback(out, z_leaf, basis):
    try:
        (rows,) = torch.autograd.grad(out, z_leaf, basis, retain_graph=True, is_grads_batched=True,
                                      allow_unused=True)
    except (RuntimeError, NotImplementedError):
        rows = torch.stack([torch.autograd.grad(out, z_leaf, b, retain_graph=True, allow_unused=True)[0]
                            for b in basis])
    return torch.zeros_like(basis) if rows is None else rows


__all__ = ["ImplicitRungeKutta", "ImplicitState", "attach_implicit_gradient"]
