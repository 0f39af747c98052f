"""Symplectic splitting methods (:class:`Symplectic`) and the leapfrog/midpoint multistep method.

:class:`Symplectic` runs any :class:`~neuralode.tableaus.splitting.SplittingMethod` on a separable system: a state
``(q, p)`` (a tuple of two tensors, or of two PyTrees) with ``q' = f(t, p)`` and ``p' = g(t, q)``, the field
returning ``(f, g)``. Fixed steps only: a step-size controller would break the symplectic structure that makes the
energy error stay bounded (Hairer, Lubich and Wanner, GNI, Sec. VIII.1), and diffrax's are fixed-step too.

- The field is evaluated whole (``func(t, (q, p))``) and each substep reads the part it moves, so a substep costs one
  evaluation; the step carries its last evaluation to the next step, where it serves a first substep of the same
  kind (``Solver.reads_derivative`` False: the loop hands ``f(t0, y0)`` only where the solve starts afresh).
- A field that is not separable would be integrated to a lower order without any sign, so the first step checks it,
  once a field: ``f`` must not change when ``q`` does, nor ``g`` when ``p`` does (three evaluations).
- Reversible: the inverse step runs the substeps backwards with ``-h``, reading each derivative at the same point
  as the forward substep (a drift leaves ``p``, which its ``f`` reads, unchanged). ``gradient="reversible"``
  walks the steps back with one evaluation and one vector-Jacobian product per substep (an exact gradient of the
  discrete solve, up to the rounding the reversal amplifies, which ``ReversibleAdjoint`` measures).
- Dense output is linear between the steps (diffrax's too); put the output times on the grid (a ``step_size`` that
  divides their spacing, or ``grid_constructor``) for the method's order there.

:class:`LeapfrogMidpoint` is diffrax's ``LeapfrogMidpoint`` (Shampine, "Stability of the leapfrog/midpoint method",
Appl. Math. Comput. 208 (2009) 293): the two-step ``y_{n+1} = y_{n-1} + (t_{n+1} - t_{n-1}) f(t_n, y_n)``, started
by an Euler step, order 2, one evaluation a step, for any state.
"""

from __future__ import annotations

import collections
import weakref
from dataclasses import dataclass

import torch

from ..tableaus.splitting import SPLITTING_METHODS, SplittingMethod
from .base import LinearDense, Solver, method_data, user_field
from .runge_kutta import StepOutcome


def _position_size(func, method_name: str) -> tuple[int, int]:
    """How many entries of the flat state are ``q`` (the first of the two parts of a ``(q, p)`` state), and how many of
    the state's tensors."""
    structure = getattr(func, "structure", None)
    numels = getattr(func, "numels", None)
    hint = (f"method {method_name!r} integrates a separable system: give y0 as a pair (q, p), tensors or PyTrees, and "
            "a field returning (dq/dt, dp/dt) with dq/dt depending on p only and dp/dt on q only (e.g. "
            "y0=(position, momentum))")
    if structure is None or numels is None or structure.kind == "tensor":
        raise ValueError(f"{hint}; got one tensor")
    if structure.kind == "tuple":
        if len(numels) != 2:
            raise ValueError(f"{hint}; got a tuple of {len(numels)} tensors")
        return numels[0], 1
    spec = structure.spec
    # (TreeSpec.children() in recent torch; children_specs, deprecated there, before)
    children = spec.children() if callable(getattr(spec, "children", None)) else spec.children_specs
    # (a named tuple (q, p) too: torch's TreeSpec names its kind collections.namedtuple, the class in its context)
    pair_like = spec.type is collections.namedtuple or (isinstance(spec.type, type) and
                                                        issubclass(spec.type, (tuple, list)))
    if not pair_like or len(children) != 2:
        raise ValueError(f"{hint}; got the structure {structure.describe()}")
    return sum(numels[:children[0].num_leaves]), children[0].num_leaves


# User fields found separable, by identity: a training loop solves with the same module at every iteration, and the
# checkpoint strategy solves again to replay; each would pay the check's three evaluations.
_SEPARABLE = weakref.WeakSet()


def _check_separable(func, t, y0, h, n_q: int, method_name: str) -> None:
    """Raise if ``dq/dt`` moves with ``q`` or ``dp/dt`` with ``p``, at ``t + 0.382 h`` (inside the first step: a
    time-dependent coupling may vanish at ``t0``, e.g. ``sin(t) p``), with each element moved by a different fraction
    (a coupling through ``p - mean(p)`` does not see a uniform move). Three evaluations, once a field. A separable field
    returns the very same values; a tolerance of rounding size allows a field that forms its parts from the whole state
    (``0 * q`` terms, a matrix product with zero blocks)."""
    key = user_field(func)
    try:
        if key in _SEPARABLE:
            return
    except TypeError:   # (not weakly referable: checked at every solve)
        key = None
    if n_q == 0 or n_q == y0.numel():
        return
    at = t + 0.382 * h
    base = func(at, y0).detach()
    real = y0.real.dtype if y0.is_complex() else y0.dtype
    spread = 1 + torch.arange(y0.numel(), device=y0.device).remainder(7).to(real) / 7
    for size in (0.1, 1e-4):   # (a field undefined at the larger move, as sqrt(1 - q) near q = 1, gets a smaller one)
        moved = y0.detach() + size * (y0.detach().abs() + 1) * spread
        values = [func(at, torch.cat((moved[:n_q], y0[n_q:])))[:n_q].detach(),
                  func(at, torch.cat((y0[:n_q], moved[n_q:])))[n_q:].detach()]
        if all(bool(torch.isfinite(v).all()) for v in values) and bool(torch.isfinite(base).all()):
            break
    else:
        return   # (nothing finite to compare)
    eps = torch.finfo(real).eps
    for label, changed, value, reference in (("dq/dt", "q", values[0], base[:n_q]), ("dp/dt", "p", values[1],
                                                                                      base[n_q:])):
        change = (value - reference).abs().amax()
        if bool(change > 64 * eps * (value.abs().amax() + reference.abs().amax())):
            raise ValueError(
                f"method {method_name!r} needs a separable field, but {label} changed by {float(change):.3g} when only "
                f"{changed} moved: with y0 = (q, p), dq/dt must depend on p (and t) only and dp/dt on q only, as for "
                "a Hamiltonian T(p) + V(q). Check the order of the pair (q first) and that the field is deterministic "
                "(no dropout in training mode, no sampling), or use a method for general fields (e.g. 'tsit5')")
    if key is not None:
        _SEPARABLE.add(key)


@dataclass(frozen=True, eq=False)
class Symplectic(LinearDense, Solver):
    """A symplectic splitting method on fixed steps (see the module docstring).

    Parameters
    ----------
    method : str or SplittingMethod, default "leapfrog"
        ``"semi_implicit_euler"`` (order 1), ``"leapfrog"`` (Stoermer-Verlet, order 2), ``"yoshida4"``,
        ``"mclachlan4"`` (order 4), ``"yoshida6"`` (order 6), or a
        :class:`~neuralode.tableaus.splitting.SplittingMethod` of your own.

    The state is a pair ``(q, p)``; the field returns ``(dq/dt, dp/dt)`` with ``dq/dt = f(t, p)`` and
    ``dp/dt = g(t, q)``. Evaluations a step: 1 less than the substeps when the first and last are of one kind
    (leapfrog 2, yoshida4 6, mclachlan4 10, yoshida6 14, semi-implicit Euler 2).
    """

    method: object = "leapfrog"

    reads_derivative = False
    reversible = True
    needs_pair = True
    linear_dense = True        # (gradient="reversible" splits an interpolated output's cotangent between step ends)
    lands_on_outputs = True

    def __post_init__(self):
        object.__setattr__(self, "method", method_data(self.method, SPLITTING_METHODS, SplittingMethod,
                                                       "Symplectic(method=...)", "a splitting method"))

    @property
    def name(self) -> str:
        return self.method.name

    @property
    def ordinary_counterpart(self) -> str:
        """The adjoint's default backward method (its augmented state is not a (q, p) pair): fixed steps of the
        same order where there is one."""
        return {1: "euler", 2: "midpoint"}.get(self.method.order, "rk4")

    @property
    def order(self) -> int:
        return self.method.order

    @property
    def adaptive(self) -> bool:
        return False

    def init(self, func, t0, y0, f0):
        n_q, k = _position_size(func, self.name)
        # The substeps move q's and p's tensors as they are and the field evaluates them so
        # (VectorField.evaluate_leaves), without building the flat state at each evaluation (a concatenation, a split,
        # a concatenation of the derivative and a slice less: leapfrog on Kepler 90 -> 52 us an evaluation,
        # benchmarks/symplectic.py). The layout: (q's tensor count, each tensor's size, each one's shape).
        return (n_q, None, False, (k, tuple(func.numels), tuple(func.shapes)))

    def step(self, func, t0, y0, f0, h, error_norm, state=None) -> StepOutcome:
        n_q, last, checked, (k, numels, shapes) = state
        if not checked:
            _check_separable(func, t0, y0, h, n_q, self.name)

        def parts(flat):
            return [piece.view(shape) for piece, shape in zip(torch.split(flat, numels), shapes)]
        # The derivative the first substep may read: f(t0, y0) on a fresh start (both parts), else the previous
        # step's last evaluation (one part, the kind of substep it was made for).
        known = ("both", parts(f0)) if f0 is not None else last
        leaves = parts(y0)
        q, p = leaves[:k], leaves[k:]
        value = None
        for index, (kind, coefficient, offset) in enumerate(self.method.substeps):
            if index == 0 and known is not None and known[0] in ("both", kind):
                value = known[1]
            else:
                value = func.evaluate_leaves(t0 + offset * h, q + p)
            if kind == "drift":
                q = [torch.add(x, dx, alpha=coefficient * h) for x, dx in zip(q, value[:k])]
            else:
                p = [torch.add(x, dx, alpha=coefficient * h) for x, dx in zip(p, value[k:])]
        y1 = torch.cat([x.reshape(-1) for x in q + p])
        return StepOutcome(y1, None, None, None, state=(n_q, (self.method.substeps[-1][0], value), True,
                                                        (k, numels, shapes)))

    # --- the reverse interface of neuralode.solvers.reversible (ReversibleAdjoint) ---------------------------------
    def reverse_begin(self, func, y, state):
        return state[0]

    def reverse_step(self, func, t0, h, t_start, y1, carry1, cot_y1, cot_carry1, params, fresh=False, interior=()):
        n_q = carry1
        y, cot_y = y1, cot_y1
        param_cots = [torch.zeros_like(p) for p in params]
        for kind, coefficient, offset in reversed(self.method.substeps):
            part = slice(0, n_q) if kind == "drift" else slice(n_q, None)
            # The substep read its derivative at a state equal to this one in the part it reads (a drift reads p and
            # moves q): evaluating here gives the same value, and its product the substep's.
            with torch.enable_grad():
                leaf = y.detach().requires_grad_(True)
                value = func(t0 + offset * h, leaf)[part]
            grads = torch.autograd.grad(value, (leaf, *params), (coefficient * h) * cot_y[part], allow_unused=True)
            if grads[0] is not None:
                cot_y = cot_y + grads[0]
            for total, g in zip(param_cots, grads[1:]):
                if g is not None:
                    total.add_(g)
            with torch.no_grad():
                undone = y[part] - (coefficient * h) * value.detach()
                y = torch.cat((undone, y[n_q:]) if kind == "drift" else (y[:n_q], undone))
        return y, n_q, cot_y, (), param_cots

    def reverse_end(self, func, t0, y0, carry0, cot_y0, cot_carry0, params):
        return cot_y0, ()   # (a step's derivatives are all read inside it: none depends on y0 beyond the steps)

    def zero_cotangent(self, y):
        return ()


@dataclass(frozen=True, eq=False)
class LeapfrogMidpoint(LinearDense, Solver):
    """The leapfrog/midpoint two-step method (diffrax's ``LeapfrogMidpoint``; see the module docstring).

    Order 2, one evaluation of ``f`` a step, fixed steps, linear dense output. Its second root makes it weakly
    unstable where the dynamics decay: a mode decaying at rate ``|lambda|`` excites a spurious one growing by about
    ``1 + h |lambda|`` a step (Shampine 2009). The solve fails at its end if that mode reached 10% of the solution's
    scale at any step (``final_check``), where diffrax's would return the result.
    """

    name = "leapfrog_midpoint"
    multistep = True
    replayable = False         # a step reads the state before its start
    lands_on_outputs = True
    # The adjoint's default backward method: its backward solve runs the dynamics the other way, where a growing mode
    # decays and the two-step method's spurious mode would take over.
    ordinary_counterpart = "midpoint"

    @property
    def order(self) -> int:
        return 2

    @property
    def adaptive(self) -> bool:
        return False

    def step(self, func, t0, y0, f0, h, error_norm, state=None) -> StepOutcome:
        # The state: (t_{n-1}, y_{n-1}, y_n as this method returned it, the largest spurious-mode ratio so far). A y0
        # that is not the state's y_n (the first step, or after a state jump) starts afresh with an Euler step.
        fresh = state is None or state[2] is not y0
        t_before, y_before = (t0, y0) if fresh else (state[0], state[1])
        y1 = torch.add(y_before, f0, alpha=(t0 + h) - t_before)
        worst = None if state is None else state[3]
        if not fresh and y0.numel():
            # The spurious mode alternates in sign from step to step: y_n - y_{n-1} - h f(t_{n-1}, y_{n-1}) is about
            # twice its size (the true solution leaves O(h^2) there). Its ratio to the solution's scale, kept as a
            # running maximum on the device (no host read a step), read once by final_check: a mode that took over
            # and then shrank against a growing solution was missed by a check at the end alone.
            with torch.no_grad():
                atol = torch.as_tensor(error_norm.atol).amax() if error_norm is not None else 0.0
                spurious = (y0 - y_before - (t0 - t_before) * state[4]).abs().amax() / 2
                scale = y0.abs().amax() + y_before.abs().amax() + atol
                ratio = spurious / scale
                worst = ratio if worst is None else torch.maximum(worst, ratio)
        return StepOutcome(y1, None, None, None, state=(t0, y0, y1, worst, f0))

    def final_check(self, func, t, y, state, error_norm) -> str | None:
        if state is None or state[3] is None:
            return None
        worst = float(state[3])
        if not worst > 0.1:   # (a NaN is the loop's to report)
            return None
        return (f"the leapfrog/midpoint method's spurious mode grew to {worst:.3g} times the solution's scale: it is "
                "weakly unstable where the dynamics decay (each step multiplies that mode by about 1 + h |lambda|). "
                "Use "
                "smaller steps, or a one-step method ('midpoint', 'rk4')")
