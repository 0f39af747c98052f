"""Algebraically reversible methods: a step can be undone exactly, so gradients need no stored states.

Each method carries a second quantity across steps beside ``y`` (its *companion*), and the map
``(y_n, companion_n) -> (y_{n+1}, companion_{n+1})`` has a closed-form inverse. The gradient strategy
:class:`~neuralode.gradients.reversible.ReversibleAdjoint` walks the steps backwards from the last state,
rebuilding each earlier state by the inverse and taking the vector-Jacobian product of the step there: the
exact gradient of the discrete solve (to rounding) with memory that does not grow with the number of steps.

Methods (``h`` the signed step, ``t1 = t0 + h``):

- :class:`ReversibleHeun` (Kidger, Foster, Li and Lyons, "Efficient and accurate gradients for neural SDEs",
  NeurIPS 2021; diffrax's ``ReversibleHeun``). Companion ``(yhat, v)`` with ``v = f(t, yhat)``::

      yhat1 = 2 y0 - yhat0 + h v0,   v1 = f(t1, yhat1),   y1 = y0 + h (v0 + v1) / 2,

  error estimate ``h (v1 - v0) / 2`` (order 1), order 2, one evaluation of ``f`` per step.
- :class:`AsynchronousLeapfrog` (ALF; Zhuang, Dvornek, Tatikonda and Duncan, "MALI: a memory efficient and
  reverse accurate integrator for neural ODEs", ICLR 2021, Algorithm 1; torchdyn's ``"alf"``). Companion
  ``v`` (an estimate of ``f``)::

      k = y0 + h v0 / 2,   u = f(t0 + h/2, k),   v1 = 2 u - v0,   y1 = k + h v1 / 2,

  order 2, one evaluation per step, fixed steps (no error estimate).
- :class:`ReversibleRungeKutta` (McCallum and Foster, "Efficient, accurate and stable gradients for neural
  ODEs", arXiv 2410.11648, 2024; diffrax's ``UReversible``): any explicit Runge-Kutta step ``Psi`` made
  reversible with a coupling ``lam`` in (0, 1] and companion ``z``::

      y1 = lam (y0 - z0) + Psi_h(t0, z0),   z1 = y1 + z0 - Psi_{-h}(t1, y1),

  the base method's order and error estimate (that of the step ``Psi_{-h}(t1, y1)``), two base steps per step.
  ``lam < 1`` damps the growth of the two solutions' difference that makes reversal unstable at ``lam = 1``.

The dense output of every one of them is linear between step ends (diffrax's too): the steps land on the
output times by default (``Solver.lands_on_outputs``), so outputs are step values, not interpolated.
Every step starts a fresh companion from ``y`` when the loop hands it ``f0`` (the first step, and after a
``jump_t`` or a state jump); otherwise ``f0`` is ``None`` and the step reads its companion, so the loop
evaluates nothing between steps (``Solver.reads_derivative`` is False).

The reverse interface (used by :class:`~neuralode.gradients.reversible.ReversibleAdjoint`): ``carry`` is
what a method keeps of a step end while walking back, with a graph where the next product needs one;
cotangents are tuples shaped like the companion.

- ``reverse_begin(func, y, state) -> carry``: from the last accepted step's end.
- ``reverse_step(func, t0, h, t_start, y1, carry1, cot_y1, cot_carry1, params, fresh) -> (y0, carry0, cot_y0,
  cot_carry0, param_cots)``: rebuild the step's start and pull the cotangents back through the step;
  ``t_start`` is the time at which the start's companion was evaluated (the previous step's ``t0 + h``);
  ``fresh``: the step started afresh (the first); ``interior``: ``[(theta, cotangent), ...]`` of outputs inside
  the step, for a method whose dense output is not linear (``linear_dense`` False).
- ``reverse_end(func, t0, y0, carry0, cot_y0, cot_carry0, params) -> (cot_y0, param_cots)``: through the
  companion's start from ``y0``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numbers

import torch

from ..problem import next_after
from ..tableaus import TABLEAUS, ButcherTableau
from .base import LinearDense, Solver, method_data
from .runge_kutta import ExplicitRungeKutta, StepOutcome


def _vjp(outputs, inputs, cotangents) -> list:
    """``autograd.grad`` that returns zeros (not ``None``) for inputs the outputs do not depend on."""
    grads = torch.autograd.grad(outputs, inputs, cotangents, allow_unused=True)
    return [torch.zeros_like(x) if g is None else g for x, g in zip(inputs, grads)]


def _leaf(x: torch.Tensor) -> torch.Tensor:
    return x.detach().requires_grad_(True)


class _Reversible(LinearDense, Solver):
    """What the reversible methods share: flags, the linear dense output, the restart rule."""

    reversible = True
    reads_derivative = False
    lands_on_outputs = True
    # The dense output is linear between the step ends (gradient="reversible" splits an interpolated output's
    # cotangent between them); ReversibleRungeKutta's is not.
    linear_dense = True
    # A step depends on the companion as well as on y: a replay from a stored y alone would differ.
    replayable = False

    # Said when the steps stall (integrate._stiffness_hint): reversible Heun and the leapfrog are stable only where
    # the dynamics oscillate (their companion's mode has modulus 1 on the imaginary axis and grows on a decaying mode).
    stall_hint = ("Reversible Heun and the asynchronous leapfrog are stable only on oscillating dynamics (eigenvalues "
                  "of df/dy on the imaginary axis); where the dynamics decay, their steps shrink without end. Use "
                  "neuralode.solvers.ReversibleRungeKutta('tsit5') (also reversible), or an ordinary method")


@dataclass(frozen=True, eq=False)
class ReversibleHeun(_Reversible):
    """Reversible Heun: order 2 with an embedded order-1 estimate, one evaluation of ``f`` per step.

    Algebraically reversible (see the module docstring for the step and the reference); linear dense output.
    """

    ordinary_counterpart = "adaptive_heun"   # (the adjoint's default backward method)

    @property
    def order(self) -> int:
        return 2

    @property
    def adaptive(self) -> bool:
        return True

    @property
    def initial_step_order(self) -> int:
        return 1

    def step(self, func, t0, y0, f0, h, error_norm, state=None) -> StepOutcome:
        yhat0, v0 = (y0, f0) if f0 is not None else state
        yhat1 = torch.add(2 * y0 - yhat0, v0, alpha=h)
        v1 = func(t0 + h, yhat1)
        y1 = torch.add(y0, v0 + v1, alpha=h / 2)
        ratio = None
        if error_norm is not None:
            with torch.no_grad():
                ratio = error_norm((v1 - v0) * (h / 2), y0, y1)
        return StepOutcome(y1, None, ratio, 1, state=(yhat1, v1))

    def reverse_begin(self, func, y, state):
        yhat, v = state
        return (yhat.detach(), v.detach(), None)   # v's graph is built by the step that ends here

    def reverse_step(self, func, t0, h, t_start, y1, carry1, cot_y1, cot_carry1, params, fresh=False, interior=()):
        yhat1, v1, v1_graph = carry1
        cot_yhat1, cot_v1 = cot_carry1
        cot_v1 = cot_v1 + (h / 2) * cot_y1           # y1 = y0 + h (v0 + v1) / 2
        if v1_graph is None:                          # (the last step: v1 = f(t1, yhat1) with a graph now)
            with torch.enable_grad():
                yhat1_leaf = _leaf(yhat1)
                v1_graph = (yhat1_leaf, func(t0 + h, yhat1_leaf))
        leaf, value = v1_graph
        grads = _vjp(value, (leaf, *params), cot_v1)
        cot_yhat1 = cot_yhat1 + grads[0]
        param_cots = grads[1:]
        # yhat1 = 2 y0 - yhat0 + h v0
        cot_y0 = cot_y1 + 2 * cot_yhat1
        cot_yhat0 = -cot_yhat1
        cot_v0 = h * cot_yhat1 + (h / 2) * cot_y1
        with torch.no_grad():
            yhat0 = 2 * y1 - yhat1 - h * v1
        with torch.enable_grad():
            yhat0_leaf = _leaf(yhat0)
            v0_value = func(t_start, yhat0_leaf)
        v0 = v0_value.detach()
        with torch.no_grad():
            y0 = y1 - (h / 2) * (v0 + v1)
        return y0, (yhat0, v0, (yhat0_leaf, v0_value)), cot_y0, (cot_yhat0, cot_v0), param_cots

    def reverse_end(self, func, t0, y0, carry0, cot_y0, cot_carry0, params):
        _, _, (leaf, value) = carry0
        cot_yhat0, cot_v0 = cot_carry0
        grads = _vjp(value, (leaf, *params), cot_v0)   # yhat0 = y0, v0 = f(t0, y0)
        return cot_y0 + cot_yhat0 + grads[0], grads[1:]

    def zero_cotangent(self, y):
        return (torch.zeros_like(y), torch.zeros_like(y))


@dataclass(frozen=True, eq=False)
class AsynchronousLeapfrog(_Reversible):
    """The asynchronous leapfrog (ALF) of MALI: order 2, one evaluation of ``f`` per step, fixed steps.

    Algebraically reversible (see the module docstring for the step and the reference); linear dense output.
    """

    ordinary_counterpart = "midpoint"   # (the adjoint's default backward method)

    @property
    def order(self) -> int:
        return 2

    @property
    def adaptive(self) -> bool:
        return False

    def step(self, func, t0, y0, f0, h, error_norm, state=None) -> StepOutcome:
        # The state: (v, the largest |y| where the solve started afresh), the latter for final_check only.
        if f0 is not None:
            v0, start_scale = f0, (y0.detach().abs().amax() if y0.numel() else y0.detach().abs().sum())
        else:
            v0, start_scale = state
        k = torch.add(y0, v0, alpha=h / 2)
        u = func(t0 + h / 2, k)
        v1 = 2 * u - v0
        y1 = torch.add(k, v1, alpha=h / 2)
        return StepOutcome(y1, None, None, None, state=(v1, start_scale))

    def final_check(self, func, t, y, state, error_norm) -> str | None:
        # The companion v estimates f(t, y). On a decaying mode the leapfrog's other mode grows by about
        # 1 + h |lambda| a step (y' = -y, h = 0.05: 3e8-fold by t = 20) and v leaves f behind: one evaluation at the
        # end tells, where nothing else would (status success with y at 1e18 on y' = -5 y + sin t). A mismatch
        # above 10% of the solution's scale (|f|, |y| and |y| at the start) fails the solve: the spurious mode then
        # grows by a constant factor a step and swamps y soon (y' = -y + sin t, h = 0.05: 30% of |y| at t = 5 with y
        # still 1e-4 off; 2e3-fold off by t = 20).
        v, start_scale = state
        with torch.no_grad():
            if not y.numel():
                return None
            f = func(t, y)
            mismatch = (v - f).abs()
            scale = f.abs().amax() + y.abs().amax() + start_scale
            if not bool(mismatch.amax() > 0.1 * scale + torch.as_tensor(error_norm.atol).amax()):
                return None
        return (f"the leapfrog's companion v left f(t, y) behind (largest |v - f| = {float(mismatch.max()):.3g} at the "
                f"end, against |f| up to {float(f.abs().max()):.3g}): the asynchronous leapfrog is stable only where "
                "the dynamics oscillate, and grows a spurious mode where they decay. Use "
                "neuralode.solvers.ReversibleRungeKutta('tsit5') (also reversible), or an ordinary method")

    def reverse_begin(self, func, y, state):
        return state[0].detach()

    def reverse_step(self, func, t0, h, t_start, y1, carry1, cot_y1, cot_carry1, params, fresh=False, interior=()):
        v1 = carry1
        (cot_v1,) = cot_carry1
        with torch.no_grad():
            k = y1 - (h / 2) * v1
        with torch.enable_grad():
            k_leaf = _leaf(k)
            u = func(t0 + h / 2, k_leaf)
        cot_k = cot_y1                                  # y1 = k + h v1 / 2
        cot_v1 = cot_v1 + (h / 2) * cot_y1
        grads = _vjp(u, (k_leaf, *params), 2 * cot_v1)  # v1 = 2 u - v0
        cot_k = cot_k + grads[0]
        cot_v0 = -cot_v1 + (h / 2) * cot_k              # k = y0 + h v0 / 2
        with torch.no_grad():
            v0 = 2 * u.detach() - v1
            y0 = k - (h / 2) * v0
        return y0, v0, cot_k, (cot_v0,), grads[1:]

    def reverse_end(self, func, t0, y0, carry0, cot_y0, cot_carry0, params):
        (cot_v0,) = cot_carry0
        with torch.enable_grad():
            leaf = _leaf(y0)
            v0 = func(t0, leaf)                         # v0 = f(t0, y0)
        grads = _vjp(v0, (leaf, *params), cot_v0)
        return cot_y0 + grads[0], grads[1:]

    def zero_cotangent(self, y):
        return (torch.zeros_like(y),)


@dataclass(frozen=True, eq=False)
class ReversibleRungeKutta(_Reversible):
    """An explicit Runge-Kutta method made algebraically reversible (McCallum and Foster 2024).

    Parameters
    ----------
    base : str or ButcherTableau
        The explicit method whose steps it couples, e.g. ``"tsit5"``, ``"dopri5"``, ``"rk4"``; its order and,
        if it has one, its error estimate (adaptive steps) carry over. Two base steps per step, no FSAL reuse.
    coupling : float, default 0.999
        ``lam`` in (0, 1] (diffrax's default): how strongly ``y`` is pulled towards the companion ``z``.
    """

    base: object = "tsit5"
    coupling: float = 0.999
    # Its dense output is the base step's (below), as accurate as the base method's: it interpolates at output times
    # as the explicit methods do, instead of landing on them.
    lands_on_outputs = False
    linear_dense = False

    stall_hint = ("With coupling lam, a mode that decays at rate |lambda| needs steps with R(h lambda) >= lam (R the "
                  "base method's stability function, about h |lambda| <= 1 - lam), or the gap between the two coupled "
                  "solutions grows; the steps shrink to keep it within the tolerance. A lower coupling (e.g. 0.9) "
                  "allows longer steps on decaying dynamics, at the price of a less stable reversal (the gradient's "
                  "rebuilt states drift; warned), or use an ordinary method with gradient='checkpoint'")

    def __post_init__(self):
        base = method_data(self.base, TABLEAUS, ButcherTableau, "ReversibleRungeKutta(base=...)",
                           "an explicit Runge-Kutta method")
        coupling = self.coupling
        if isinstance(coupling, torch.Tensor) and coupling.numel() == 1 and not coupling.dtype.is_complex:
            coupling = coupling.item()
        if isinstance(coupling, bool) or not isinstance(coupling, numbers.Real) or not 0 < coupling <= 1:
            raise ValueError(f"ReversibleRungeKutta(coupling=...) must be a number in (0, 1] (diffrax's default "
                             f"0.999), got {coupling!r}")
        object.__setattr__(self, "_stepper", ExplicitRungeKutta(base))
        object.__setattr__(self, "coupling", float(coupling))

    @property
    def name(self) -> str:
        return f"reversible_{self._stepper.tableau.name}"

    @property
    def ordinary_counterpart(self):
        """The base method, as a tableau (the adjoint's default backward method)."""
        return self._stepper.tableau

    @property
    def order(self) -> int:
        return self._stepper.order

    @property
    def adaptive(self) -> bool:
        return self._stepper.adaptive

    @property
    def initial_step_order(self) -> int:
        return self._stepper.initial_step_order

    def _base_step(self, func, t0, y0, h, error_norm=None, f0=None):
        return self._stepper.step(func, t0, y0, func(t0, y0) if f0 is None else f0, h, error_norm)

    @staticmethod
    def _from_the_right(func, t0, t1):
        """``func`` with an evaluation at ``t0`` itself, or past it (rounding: the stage time ``(t0 + h) - h``), moved
        to one representable time inside the step: a step that starts afresh (after a ``jump_t``) must not read
        ``f`` at the jump, and the backward base step's last stage lands there (an ordinary step's stages never
        do). Harmless at a solve's first step."""
        inside = next_after(t0, t1, getattr(func, "time_dtype", torch.float64))
        forwards = t1 > t0
        return lambda t, y: func(inside if (t <= t0 if forwards else t >= t0) else t, y)

    def step(self, func, t0, y0, f0, h, error_norm, state=None) -> StepOutcome:
        # The state: (z, accepted steps since the start, the gap's largest element after the last two steps whose
        # count was a power of two), the latter for final_check.
        fresh = f0 is not None
        z0, count, older, newer = (y0, 0, None, None) if fresh else state
        base = self._base_step(func, t0, z0, h, f0=f0)
        y1 = torch.add(base.y1, y0 - z0, alpha=self.coupling)
        back_field = self._from_the_right(func, t0, t0 + h) if fresh else func
        backward = self._base_step(back_field, t0 + h, y1, -h, error_norm if self._stepper.adaptive else None)
        z1 = y1 + z0 - backward.y1
        stages = (z0, base)
        ratio = backward.error_ratio
        if ratio is not None:
            # The error ratio is the larger of the step Psi_{-h}(t1, y1)'s own estimate (diffrax's UReversible stops
            # there) and the gap y1 - z1 between the two coupled solutions, which the next step carries into y
            # (times lam). On a decaying mode the gap grows by about lam * exp(|h lambda|) a step, so unless the steps
            # are short enough (R(h lambda) >= lam for the base method's stability function R) it grows without
            # bound: with the base estimate alone, Van der Pol (mu = 1, rtol 1e-6, lam = 0.999) ended 0.7 off with
            # status success. The gap stayed below 0.4 of the tolerance where the solution was right (an MLP, an
            # oscillator), so it costs those no steps. A step passes if the gap is within the tolerance, or no larger
            # than the step's start's (it cannot be shrunk below that: it decays by lam a step at best), or no larger
            # than what rounding alone keeps up, eps |y| / (1 - lam) (in float32 at rtol 1e-7, below float32's
            # resolution, that is ~1200 tolerances, and a gap at that level failed every step until max_num_steps).
            with torch.no_grad():
                scale = torch.maximum(y0.abs(), y1.abs()).mul_(torch.finfo(y1.real.dtype).eps / (1 - self.coupling)
                                                             if self.coupling < 1 else 0.0)
                allowed = torch.maximum(error_norm(y0 - z0, y0, y1), error_norm(scale, y0, y1)).clamp_min(1)
                ratio = torch.maximum(ratio, error_norm(y1 - z1, y0, y1) / allowed)
        count += 1
        if count & (count - 1) == 0:
            older, newer = newer, (y1 - z1).detach().abs().amax() if y1.numel() else None
        return StepOutcome(y1, None, ratio, self._stepper.tableau.error_order, stages=stages,
                           state=(z1, count, older, newer))

    def _base_dense(self, func, t0, z0, h, base, stacked=True) -> list:
        """The base step ``Psi_h(t0, z0)``'s dense coefficients (one more evaluation, at its end, for a base method
        that is not FSAL; dopri8's three extra stages)."""
        f1 = base.f1 if base.f1 is not None else func(t0 + h, base.y1)
        return self._stepper.dense_coefficients(func, t0, z0, h, base, f1, stacked)

    def dense_coefficients(self, func, t0, y0, h, outcome, f1, stacked=True) -> list:
        """``y(t0 + theta h) = Psi_theta(z0) + (1 + theta (lam - 1)) (y0 - z0)``: the base step's continuous extension
        from ``z0`` plus the coupling term, equal to ``y0`` at theta = 0 and to ``y1`` at theta = 1, and as accurate
        between them as the base method's dense output (the gap ``y0 - z0`` being within the tolerance). A linear
        interpolant left event times 7e-3 off at rtol 1e-8 with dopri8 as the base."""
        z0, base = outcome.stages
        coefficients = self._base_dense(func, t0, z0, h, base, stacked)
        gap = y0 - z0
        return [y0, coefficients[1] + (self.coupling - 1) * gap, *coefficients[2:]]

    def final_check(self, func, t, y, state, error_norm) -> str | None:
        # On a fixed grid (or at steps pinned at min_step) nothing rejects a step whose gap grew: with coupling 0.999
        # and rk4 at h = 0.05, y' = -y + sin t ended 0.67 off at t = 20 and 2e8 at t = 40 with status success, where
        # rk4 alone is 1e-8 off; y's error was about half the gap. The test is for growth, not size: a gap more than
        # 100 times what it was when the count of steps was half or less, and above 1e-3 of the largest |y| (+ atol),
        # fails the solve. The gap of an unstable coupling grows geometrically (there: 150-fold over the second half
        # of 200 steps, 7.7e-5 at t = 10, passed as below 1e-3; 3000-fold by t = 16); a stable one's stays at its
        # level, which for a low-order base can be its own error (reversible Euler at h = 0.125: 13% of |y|, fine:
        # a size test failed it, and passed the unstable solve 17% off at t = 18.25 when set at 50%).
        z, count, older, _ = state
        if not y.numel() or older is None:
            return None
        gap = (y - z).abs().amax()
        grown = (gap > 100 * older) & (gap > 1e-3 * y.abs().amax() + torch.as_tensor(error_norm.atol).amax())
        if not bool(grown):
            return None
        return (f"the reversible method's two coupled solutions came apart (their gap |y - z| grew to {float(gap):.3g} "
                f"at the end, {float(gap / older.clamp_min(1e-300)):.3g} times its size {count // 2} or more steps "
                f"before, against |y| up to {float(y.abs().max()):.3g}): with coupling {self.coupling}, a decaying "
                "mode is stable only for steps with about h |lambda| <= 1 - coupling, and these steps had no error "
                "control to shrink them. Use an adaptive base method (e.g. 'tsit5'), a lower coupling (e.g. 0.9), or "
                "shorter steps")

    def reverse_begin(self, func, y, state):
        return state[0].detach()

    def reverse_step(self, func, t0, h, t_start, y1, carry1, cot_y1, cot_carry1, params, fresh=False, interior=()):
        z1 = carry1
        (cot_z1,) = cot_carry1
        lam = self.coupling
        with torch.enable_grad():
            y1_leaf = _leaf(y1)
            backward = self._base_step(self._from_the_right(func, t0, t0 + h) if fresh else func, t0 + h, y1_leaf,
                                       -h).y1
        # z1 = y1 + z0 - Psi_{-h}(t1, y1)
        grads = _vjp(backward, (y1_leaf, *params), -cot_z1)
        cot_y1 = cot_y1 + cot_z1 + grads[0]
        param_cots = list(grads[1:])
        with torch.no_grad():
            z0 = z1 - y1 + backward.detach()
        with torch.enable_grad():
            z0_leaf = _leaf(z0)
            base = self._base_step(func, t0, z0_leaf, h)
            forward = base.y1
            outputs, cotangents = [forward], [cot_y1]
            if interior:
                # y(theta) = sum_{m >= 1} theta^m c_m(z0) + (1 + theta (lam - 1)) y0 - theta (lam - 1) z0: the
                # cotangents of the outputs inside the step weight the coefficients c_m.
                coefficients = self._base_dense(func, t0, z0_leaf, h, base)
                outputs += coefficients[1:]
                cotangents += [sum(theta ** m * cot for theta, cot in interior) for m in range(1, len(coefficients))]
        # y1 = lam (y0 - z0) + Psi_h(t0, z0)
        grads = _vjp(outputs, (z0_leaf, *params), cotangents)
        cot_y0 = lam * cot_y1
        cot_z0 = cot_z1 - lam * cot_y1 + grads[0]
        for theta, cot in interior:
            cot_y0 = cot_y0 + (1 + theta * (lam - 1)) * cot
            cot_z0 = cot_z0 - theta * (lam - 1) * cot
        param_cots = [a + b for a, b in zip(param_cots, grads[1:])]
        with torch.no_grad():
            y0 = (y1 - forward.detach()) / lam + z0
        return y0, z0, cot_y0, (cot_z0,), param_cots

    def reverse_end(self, func, t0, y0, carry0, cot_y0, cot_carry0, params):
        (cot_z0,) = cot_carry0
        return cot_y0 + cot_z0, [torch.zeros_like(p) for p in params]   # z0 = y0

    def zero_cotangent(self, y):
        return (torch.zeros_like(y),)
