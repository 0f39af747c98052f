"""The one stepper behind every explicit Runge-Kutta method.

A step from ``(t0, y0)`` with (signed) size ``h`` evaluates the stages

    k_i = f(t0 + c_i h, y0 + h sum_{j<i} a_ij k_j),      y1 = y0 + h sum_i b_i k_i,

and, for adaptive methods, the error estimate ``e = h sum_i b_err_i k_i``. Nothing here is specific to
a method: the tableau is data (:mod:`neuralode.tableaus`). The stage sums skip zero coefficients and
use Python floats, so a step allocates only the stage states and costs no host synchronisation; the
loop synchronises once per step, on the error ratio.

Differentiability: every operation is an ordinary autograd op (accumulation happens in place only
into fresh intermediates), so gradients, and gradients of gradients, flow through the steps.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ..tableaus import ButcherTableau
from .base import Solver


def _sparse(weights) -> tuple:
    return tuple((j, float(w)) for j, w in enumerate(weights) if w != 0)


def linear_combination(y0: torch.Tensor | None, h, ks, terms) -> torch.Tensor:
    """``y0 + h * sum_j w_j ks[j]`` over the nonzero ``terms = ((j, w_j), ...)``; ``y0=None`` drops it.

    ``h`` is a float (eager steps), a 0-dim float64 tensor (the compiled step, whose step size is an input
    of the compiled graph rather than a constant baked into it) or a float64 tensor of shape
    ``(batch, 1, ..., 1)`` (per-sample stepping: one step size per batch element).
    """
    (j0, w0), *rest = terms
    if isinstance(h, torch.Tensor) and h.ndim > 0:
        # One step size per sample: the weighted sum first (float weights, fused), then one multiplication
        # by h, instead of a (batch,)-shaped product h * w per term.
        acc = ks[j0] * w0
        for j, w in rest:
            acc.add_(ks[j], alpha=w)
        acc.mul_(h.to(acc.real.dtype if acc.is_complex() else acc.dtype))
        return acc if y0 is None else acc.add_(y0)
    if isinstance(h, torch.Tensor):
        # Each coefficient h * w is rounded to the stages' real dtype first, as the eager ``alpha`` is: a
        # float64 scalar tensor times a 0-dim float32 (or complex64) stage would otherwise promote the state.
        dtype = ks[j0].real.dtype if ks[j0].is_complex() else ks[j0].dtype
        acc = ks[j0] * (h * w0).to(dtype)
        if y0 is not None:
            acc = acc.add_(y0)
        for j, w in rest:
            acc.add_(ks[j] * (h * w).to(dtype))
        return acc
    # The first term creates the result (fused with y0 when there is one); the rest accumulate in place.
    acc = ks[j0] * (h * w0) if y0 is None else torch.add(y0, ks[j0], alpha=h * w0)
    for j, w in rest:
        acc.add_(ks[j], alpha=h * w)
    return acc


def step_result(y0: torch.Tensor, h, ks, terms) -> torch.Tensor:
    """``y1 = y0 + h * sum_j b_j ks[j]`` with the increments summed first and ``y0`` added last.

    That is torchdiffeq's order (a matrix product, then ``y0 +``): adding each small increment to a large
    ``y0`` in turn rounds at every addition, which in float32 cost ``rk4`` a 1.01e-4 relative error in an
    event time where summing first gives 2.9e-5 (torchdiffeq's event test allows 1e-4). Used for the
    step's result only; the stage states keep the fused form (one operation fewer each).
    """
    return linear_combination(None, h, ks, terms).add_(y0)


@dataclass
class StepOutcome:
    """What a stepper returns for one attempted step.

    ``y1`` is the proposed state; ``f1`` the derivative there if the step already computed it (FSAL),
    else ``None``; ``error_ratio`` a 0-dim tensor (the weighted error norm, <= 1 means acceptable) or
    ``None`` for fixed-step methods; ``error_order`` the order the controller should assume;
    ``stages`` whatever the stepper needs to build the dense output later; ``state`` the
    solver-specific state to carry into the next step if this one is accepted; ``step_factor``, if
    not ``None``, is the stepper's own choice of the next step length over this one after an accepted
    step (multistep methods whose step-size policy belongs to the method, see
    :class:`~neuralode.solvers.adams.VariableOrderAdams`), still clipped to the controller's bounds;
    after a rejected step, the factor to shrink by. ``failure``, if not ``None``, says why the stepper
    could not produce a result (an implicit method's Newton iteration failed): the step is rejected
    whatever ``error_ratio`` says, shrunk by ``step_factor``. ``keep_step``, if not ``None``, is a range
    ``(low, high)``: when the step is accepted and the controller's next length over this one lies in it,
    the length is kept instead (an implicit method then reuses its factorised iteration matrix).
    """

    y1: torch.Tensor
    f1: torch.Tensor | None
    error_ratio: torch.Tensor | None
    error_order: int | None
    stages: Any = None
    state: Any = None
    step_factor: float | None = None
    failure: str | None = None
    coefficients: list | None = None   # the dense output, when the step computed it already (compiled steps)
    keep_step: tuple | None = None


@dataclass(frozen=True, eq=False)
class ExplicitRungeKutta(Solver):
    """Runs a :class:`~neuralode.tableaus.ButcherTableau`. One instance per method, immutable."""

    tableau: ButcherTableau
    _rows: tuple = field(init=False, repr=False)
    _b: tuple = field(init=False, repr=False)
    _b_err: tuple = field(init=False, repr=False)
    _b_err_low: tuple = field(init=False, repr=False)
    _extra_rows: tuple = field(init=False, repr=False)
    _dense_rows: tuple = field(init=False, repr=False)   # the nonzero terms of each dense coefficient c_1..c_d
    _dense_cache: dict = field(init=False, repr=False, default_factory=dict)

    def __post_init__(self):
        tab = self.tableau
        set_ = object.__setattr__
        set_(self, "_rows", tuple((float(tab.c[i]), _sparse(tab.a[i])) for i in range(1, tab.stages)))
        set_(self, "_b", _sparse(tab.b))
        set_(self, "_b_err", _sparse(tab.b_err) if tab.b_err is not None else ())
        set_(self, "_b_err_low", _sparse(tab.b_err_low) if tab.b_err_low is not None else ())
        set_(self, "_extra_rows", tuple((float(c), _sparse(row)) for c, row in zip(tab.extra_c, tab.extra_a)))
        set_(self, "_dense_rows", tuple(_sparse(row) for row in tab.dense.T) if tab.dense is not None else ())

    @property
    def fsal(self) -> bool:
        return self.tableau.fsal

    @property
    def stage_rows(self) -> tuple:
        """``((c_i, ((j, a_ij), ...)), ...)`` for every stage ``i`` (stage 0 first, with no terms): the nonzero
        coefficients that build the stage states (the per-sample adjoint rebuilds them from the stages)."""
        return ((0.0, ()),) + self._rows

    @property
    def weights(self) -> tuple:
        """``((j, b_j), ...)``: the nonzero weights of the step's result."""
        return self._b

    @property
    def order(self) -> int:
        return self.tableau.order

    @property
    def adaptive(self) -> bool:
        return self.tableau.adaptive

    @property
    def initial_step_order(self) -> int:
        """The order q in Hairer's starting-step exponent 1/(q+1): that of the error estimator."""
        return self.tableau.error_order or self.tableau.order

    def init(self, func, t0: float, y0: torch.Tensor, f0: torch.Tensor):
        return None

    def statistics(self, state) -> dict:
        """Method-specific counters for ``Solution.stats`` (none for explicit methods)."""
        return {}

    def step(self, func: Callable, t0: float, y0: torch.Tensor, f0: torch.Tensor, h: float,
             error_norm: Callable | None, state=None) -> StepOutcome:
        """Attempt one step. ``func(t: float, y)``; ``error_norm(err, y0, y1) -> 0-dim tensor``.

        ``t0`` and ``h`` may also be 0-dim float64 tensors (the compiled step), or tensors of shape
        ``(batch, 1, ..., 1)`` with one time and step size per batch element (per-sample stepping,
        :mod:`neuralode.per_sample`): then ``func`` receives the stage times as tensors and
        ``error_norm`` returns one ratio per batch element."""
        ks = [f0]
        yi = y0
        last = len(self._rows) - 1
        for i, (c, terms) in enumerate(self._rows):
            if not terms:
                yi = y0
            elif i == last and self.tableau.fsal:
                yi = step_result(y0, h, ks, terms)  # this stage state is y1
            else:
                yi = linear_combination(y0, h, ks, terms)
            ks.append(func(t0 + c * h, yi))
        # FSAL: the last stage was evaluated at y1 itself.
        if self.tableau.fsal:
            y1, f1 = yi, ks[-1]
        else:
            y1, f1 = step_result(y0, h, ks, self._b), None
        ratio = None
        if error_norm is not None and self._b_err:
            # The error estimate only steers the step size: no graph is recorded for it.
            with torch.no_grad():
                ratio = error_norm(linear_combination(None, h, ks, self._b_err), y0, y1)
                if self._b_err_low:
                    # DOP853's combination of its 5th- and 3rd-order estimates (Hairer's dop853.f).
                    low = error_norm(linear_combination(None, h, ks, self._b_err_low), y0, y1)
                    # The ratio is 0 only where both estimates are 0; NaN must stay NaN (a comparison
                    # like `denominator > 0` would turn it into an accepted step with zero error).
                    denominator = torch.sqrt(ratio * ratio + 0.01 * low * low)
                    ratio = torch.where(denominator == 0, torch.zeros_like(ratio),
                                        ratio * ratio / denominator.clamp_min(1e-300))
        return StepOutcome(y1, f1, ratio, self.tableau.error_order, ks)

    def dense_coefficients(self, func, t0: float, y0: torch.Tensor, h: float, outcome: StepOutcome,
                           f1: torch.Tensor, stacked: bool = True) -> list:
        """Coefficients ``[c_0, ..., c_d]`` with ``y(t0 + theta h) = sum_m c_m theta**m``.

        One matrix product over the stacked stages gives all of ``c_1..c_d`` at once: fewer kernel
        launches than a sum per coefficient, and fewer passes over memory for large states. ``stacked=False``
        sums each coefficient's terms instead (the compiled loop: inductor writes stacked stages into one
        buffer, and a stage carried on from there to the next iteration would be misaligned).
        """
        ks = list(outcome.stages)
        if not self.tableau.fsal:
            ks.append(f1)
        for c, terms in self._extra_rows:
            ks.append(func(t0 + c * h, linear_combination(y0, h, ks, terms)))
        if not stacked:
            return [y0] + [linear_combination(None, h, ks, terms) for terms in self._dense_rows]
        stages = torch.stack(ks).reshape(len(ks), y0.numel())  # (explicit sizes: y0 may be empty)
        coefficients = torch.mm(self._dense_matrix(stages.dtype, stages.device), stages)
        coefficients = coefficients.view(coefficients.shape[0], *y0.shape)
        if isinstance(h, torch.Tensor) and h.ndim > 0:
            # Per-sample stepping: h has shape (batch, 1, ...), one step size per batch element.
            coefficients = coefficients * h.to(coefficients.real.dtype if coefficients.is_complex()
                                               else coefficients.dtype)
        else:
            coefficients = coefficients.mul_(h)
        return [y0] + list(coefficients.unbind(0))

    def _dense_matrix(self, dtype, device) -> torch.Tensor:
        key = (dtype, device)
        matrix = self._dense_cache.get(key)
        if matrix is None:
            matrix = torch.as_tensor(self.tableau.dense.T.copy(), dtype=dtype, device=device)
            self._dense_cache[key] = matrix
        return matrix
