"""Step-size control: error norms, Hairer's initial step, and integral / PI controllers.

The controller sees only floats: the loop synchronises once per step to read the error ratio, and
everything after that is Python arithmetic on the host, which costs far less than the tensor ops
torchdiffeq spends per step on the same decisions.

Default controller: the **integral** (I) controller, exactly as torchdiffeq and scipy use it:
``h_new = h * clip(safety * r**(-1/(q+1)), dfactor, ifactor)``, no shrinking after an accepted step.
We keep it as the default so that code moving from torchdiffeq takes the same steps and gets the
same numbers. The **PI** controller (Gustafsson 1991; Hairer and Wanner II, Sec. IV.2, eq. 2.43c)
``h_new = h * safety * r_n**(-0.7/(q+1)) * r_{n-1}**(0.4/(q+1))`` damps the oscillating accept/reject
pattern on mildly stiff problems and usually saves steps there; select it with
``options={"controller": "pi"}``. The **PID** controller (Söderlind's digital filters, "Digital filters
in adaptive time-stepping", ACM TOMS 29, 2003), with diffrax's parametrisation and defaults
(``PIDController``: ``pcoeff``, ``icoeff``, ``dcoeff``), ``h_new = h * safety * r_n**(-b1/k) *
r_{n-1}**(-b2/k) * r_{n-2}**(-b3/k)``, ``k = q + 1``, ``b1 = p + i + d``, ``b2 = -(p + 2 d)``, ``b3 = d``;
select it with ``options={"controller": "pid", "pcoeff": 0.4, "icoeff": 0.3, "dcoeff": 0.0}``. As in
diffrax, the same formula shrinks a rejected step (capped at ``safety``), an accepted step never
shrinks, and a zero or infinite past error counts as 1 in the history. The **predictive** controller
(Gustafsson 1994; Hairer and Wanner II, Sec. IV.8, eq. 8.25; the default of RADAU5, RODAS and scipy's
Radau, and here of the implicit and Rosenbrock methods) ``h_new = h * safety * r_n**(-1/k) *
min(1, (h_n / h_acc) * (r_acc / r_n)**(1/k))``, with ``h_acc``, ``r_acc`` the last accepted step and its
error ratio, predicts that the error keeps changing as it did between the last two steps: where an
implicit method's estimate grows more slowly than ``h**k`` (stiff components) the integral controller
grows the step until it is rejected, every second step. As in RADAU5 and scipy it may shrink the step
after an accepted one (down to ``dfactor``); select it with ``options={"controller": "predictive"}``.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import torch
import torch.utils._pytree as pytree

from ._numbers import real_number, whole_number


def rms_norm(x: torch.Tensor) -> torch.Tensor:
    """Root mean square over all elements (complex values by modulus); 0-dim tensor."""
    return torch.linalg.vector_norm(x) / math.sqrt(max(x.numel(), 1))


def mixed_norm(xs) -> torch.Tensor:
    """Largest RMS norm among the tensors of a tuple or PyTree state (torchdiffeq's default for tuples)."""
    return torch.stack([rms_norm(x) for x in pytree.tree_leaves(xs)]).max()


#: What a user's norm returns, in place of its value, when that value is NaN or negative for a finite scaled
#: error: no norm can be negative, so the reader of the ratio (one host read per step, already there) knows
#: the norm, not the vector field, is at fault (:func:`check_norm_value`).
BAD_NORM = -1.0


def _finite_or_nan(norm):
    def checked(x):
        flat = x if isinstance(x, torch.Tensor) else torch.cat([part.reshape(-1) for part in pytree.tree_leaves(x)])
        value = torch.as_tensor(norm(x))
        # shape and dtype are known without reading the device: no synchronisation per step
        if value.numel() != 1:
            raise ValueError(f"option 'norm' must return a scalar (one element), got shape {tuple(value.shape)}; "
                             "reduce the scaled error to one number, e.g. lambda x: x.abs().max()")
        if not value.dtype.is_floating_point:
            raise TypeError(f"option 'norm' must return a real floating-point number, got dtype {value.dtype}; "
                            "return the size of the scaled error, e.g. lambda x: x.abs().max()")
        sane = torch.where(value >= 0, value, torch.full_like(value, BAD_NORM))   # NaN >= 0 is False too
        return torch.where(torch.isfinite(flat).all(), sane, torch.full_like(value, math.nan))
    return checked


def check_norm_value(value: float) -> None:
    """Raise if ``value``, read from an error norm, is :data:`BAD_NORM` (a user norm's NaN or negative)."""
    if value < 0:
        raise ValueError("option 'norm' returned NaN or a negative number for a finite error; a norm must return "
                         "a size >= 0 of the scaled error it is given, e.g. lambda x: x.abs().max()")


#: The adaptive controllers' numeric settings (floats once checked).
_NUMERIC_SETTINGS = ("safety", "ifactor", "dfactor", "min_step", "max_step", "pcoeff", "icoeff", "dcoeff")

#: The adaptive controllers by name (``options={"controller": ...}``).
CONTROLLER_KINDS = ("integral", "pi", "pid", "predictive")


class ErrorNorm:
    """``norm(err / (atol + rtol * max(|y0|, |y1|)))``; the quantity compared with 1 to accept a step.

    ``norm`` receives a tensor shaped like the state, or the state's tuple or PyTree for structured states
    (``unflatten``).
    """

    def __init__(self, rtol, atol, norm=None, unflatten=None):
        self.rtol, self.atol = rtol, atol
        # With atol = 0 somewhere, a component that is exactly 0 has a zero scale; its error is then 0 too (a
        # component that stays 0), and 0/0 must count as no error rather than as a NaN blamed on the field.
        self.scale_can_vanish = bool((torch.as_tensor(atol) == 0).any())
        if norm is not None:
            # A user's norm may ignore NaN (nan_to_num, a masked max): a non-finite error estimate
            # must still reject the step, so the result is NaN whenever the scaled error is not
            # finite. The default norms propagate NaN and inf on their own and skip this check.
            norm = _finite_or_nan(norm)
        if unflatten is None:
            self.norm = norm or rms_norm
        else:
            user_norm = norm or mixed_norm
            self.norm = lambda x: user_norm(unflatten(x))

    def scale(self, y0: torch.Tensor, y1: torch.Tensor | None = None) -> torch.Tensor:
        magnitude = y0.abs() if y1 is None else torch.maximum(y0.abs(), y1.abs())
        return magnitude.mul_(self.rtol).add_(self.atol)

    def __call__(self, error: torch.Tensor, y0: torch.Tensor, y1: torch.Tensor) -> torch.Tensor:
        return self.norm(self.scaled(error, self.scale(y0, y1)))

    def scaled(self, error: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """``error / scale``, with ``0 / 0 = 0`` where ``atol`` is 0 (a nonzero error over a zero scale stays inf)."""
        if not self.scale_can_vanish:
            return error / scale
        return torch.where(error == 0, torch.zeros_like(error), error / scale)


def initial_step(func, t0: float, y0: torch.Tensor, f0: torch.Tensor, direction: int, order: int,
                 error_norm: ErrorNorm) -> float:
    """Hairer's starting step (Hairer, Norsett, Wanner I, Sec. II.4): one extra evaluation of ``func``.

    ``order`` is that of the error estimator (4 for dopri5), as in Hairer's HINIT, scipy and torchdiffeq.
    Returns a positive step length (in the direction of integration).
    """
    with torch.no_grad():
        scale = error_norm.scale(y0)
        if error_norm.scale_can_vanish:
            # atol = 0 and a component at exactly 0: its scale is 0 and its f0 / scale infinite, which made the
            # starting step 0 (pure relative control failed at t0). Such a component has no scale to suggest a step
            # by, so it is left out of the estimate; the step's own error test covers it from the first step on.
            scale = torch.where(scale == 0, torch.full_like(scale, math.inf), scale)
        d0 = float(error_norm.norm(error_norm.scaled(y0, scale)))
        d1 = float(error_norm.norm(error_norm.scaled(f0, scale)))
        check_norm_value(min(d0, d1))
        h0 = 1e-6 if (d0 < 1e-5 or d1 < 1e-5) else 0.01 * d0 / d1
        if not math.isfinite(h0) or h0 <= 0.0:
            h0 = 1e-6  # d1 overflowed (|f0| near the dtype's largest value): no scale to go by
        f1 = func(t0 + direction * h0, y0 + (direction * h0) * f0)
        d2 = float(error_norm.norm(error_norm.scaled(f1 - f0, scale))) / h0
    if not math.isfinite(d2):
        return h0 * 1e-3
    if max(d1, d2) <= 1e-15:
        h1 = max(1e-6, h0 * 1e-3)
    else:
        h1 = (0.01 / max(d1, d2)) ** (1.0 / (order + 1))
    return min(100 * h0, h1)


@dataclass(frozen=True)
class AdaptiveController:
    """Integral, PI, PID or predictive step-size controller with torchdiffeq's option names and defaults.

    Parameters
    ----------
    kind : {"integral", "pi", "pid", "predictive"}
    safety, ifactor, dfactor : float
        Safety factor, largest growth and largest shrink factor per step.
    min_step, max_step : float
        Bounds on the step length. A step at or below ``min_step`` is accepted whatever its error
        (torchdiffeq's semantics, diffrax's ``force_dtmin=True``), so ``min_step > 0`` trades accuracy for a
        bounded cost.
    force_min_step : bool
        ``True`` (default): as above. ``False``: a step at ``min_step`` is judged like any other, and its rejection
        fails the solve with ``StepSizeUnderflowError`` (diffrax's ``force_dtmin=False``, SciML's ``dtmin``): the
        tolerance is never traded away silently.
    first_step : float or None
        Initial step; ``None`` uses :func:`initial_step`.
    max_num_steps : int
        Attempted steps allowed before the solve fails with a message saying how to raise it.
    """

    kind: str = "integral"
    safety: float = 0.9
    ifactor: float = 10.0
    dfactor: float = 0.2
    min_step: float = 0.0
    max_step: float = math.inf
    first_step: float | None = None
    max_num_steps: int = 100_000
    pcoeff: float = 0.0
    icoeff: float = 1.0
    dcoeff: float = 0.0
    force_min_step: bool = True

    adaptive = True

    def __post_init__(self):
        # Every setting checked once, here, whether it came from an options dict or a controller object.
        if self.kind not in CONTROLLER_KINDS:
            raise ValueError(f"controller kind must be one of {list(CONTROLLER_KINDS)}, got {self.kind!r}")
        for name in _NUMERIC_SETTINGS:
            value = real_number(getattr(self, name))
            if value is None or math.isnan(value):
                raise TypeError(f"controller setting '{name}' must be a number, got {getattr(self, name)!r}")
            object.__setattr__(self, name, value)   # (a numpy or tensor scalar becomes a float once, here)
        first_step, max_num_steps = real_number(self.first_step), whole_number(self.max_num_steps)
        if first_step is not None:
            object.__setattr__(self, "first_step", first_step)
        if max_num_steps is not None:
            object.__setattr__(self, "max_num_steps", max_num_steps)
        if not 0 < self.safety <= 1:
            raise ValueError(f"'safety'={self.safety} must be in (0, 1]: above 1 the controller grows the step after "
                             "rejections and never converges")
        if self.ifactor < 1 or not 0 < self.dfactor <= 1:
            raise ValueError(f"the controller needs ifactor >= 1 and dfactor <= 1 (and > 0), got ifactor={self.ifactor}, "
                             f"dfactor={self.dfactor}")
        if not isinstance(self.force_min_step, bool):
            raise TypeError(f"controller setting 'force_min_step' must be True or False, got {self.force_min_step!r}")
        if self.min_step < 0 or self.max_step <= 0 or self.min_step > self.max_step:
            raise ValueError(f"the controller needs 0 <= min_step <= max_step and max_step > 0, got "
                             f"min_step={self.min_step}, max_step={self.max_step}")
        if self.first_step is not None and not (isinstance(self.first_step, (int, float)) and
                                                math.isfinite(self.first_step) and self.first_step > 0):
            per_sample = (" (a first step per sample goes in the solve's options={'first_step': tensor} with "
                          "per_sample=True, beside this controller)"
                          if isinstance(self.first_step, torch.Tensor) else "")
            raise ValueError(f"first_step must be a finite number > 0 (or None for Hairer's choice), got "
                             f"{self.first_step!r}{per_sample}")
        if isinstance(self.max_num_steps, bool) or not isinstance(self.max_num_steps, int) or self.max_num_steps < 1:
            raise ValueError(f"max_num_steps must be a positive integer, got {self.max_num_steps!r}")
        coefficients = (self.pcoeff, self.icoeff, self.dcoeff)
        if self.kind == "pid" and (not all(map(math.isfinite, coefficients)) or sum(coefficients) <= 0):
            raise ValueError(f"PID coefficients (pcoeff, icoeff, dcoeff) = {coefficients}: each must be finite and "
                             "pcoeff + icoeff + dcoeff must be > 0 (else the step never grows or shrinks); e.g. "
                             "pcoeff=0.4, icoeff=0.3")

    def start(self, stops: list, first_step, read_together: bool = False) -> AdaptiveStepping:
        """The running state of one solve: ``stops`` (internal times to land on, the end last) and
        ``first_step`` (a function giving Hairer's starting step, called only without ``first_step``)."""
        return AdaptiveStepping(self, stops, self.first_step if self.first_step is not None else first_step(),
                                read_together)

    @property
    def initial_history(self) -> tuple:
        """The two numbers remembered from accepted steps, before the first: the last two error ratios
        (PI, PID; 1 = no information), or for the predictive controller the last ratio and its step length
        (0 = no step yet)."""
        return (1.0, 0.0) if self.kind == "predictive" else (1.0, 1.0)

    def adapt(self, h: float, ratio: float, order: int, history: tuple | None = None,
              pinned: bool = False) -> tuple:
        """One accept/reject decision as a pure function: ``(accepted, h_next, history)``.

        ``h``: the step just attempted, ``ratio``: its error ratio (NaN or inf rejects and shrinks by
        ``dfactor``), ``order``: the error estimator's, ``history``: what the controller remembers of the
        accepted steps before (:attr:`initial_history`), ``pinned``: held at ``min_step`` (accepted
        whatever its error). The solve's stepping state (:class:`AdaptiveStepping`) calls this once per step.
        """
        if history is None:
            history = self.initial_history
        if not math.isfinite(ratio):
            return False, h * self.dfactor, history
        accepted = ratio <= 1.0 or pinned
        previous, older = history
        h_next = self.next_step(h, ratio, previous, order, accepted, older)
        if not accepted:
            return accepted, h_next, history
        return accepted, h_next, ((ratio, h) if self.kind == "predictive" else (ratio, previous))

    def next_step(self, h: float, ratio: float, previous_ratio: float, order: int, accepted: bool,
                  older_ratio: float = 1.0) -> float:
        """Length of the next step after a step of length ``h`` with error ratio ``ratio``;
        ``previous_ratio`` and ``older_ratio`` are those of the two accepted steps before it (for the
        predictive controller ``older_ratio`` is the last accepted step's length, 0 if none)."""
        if ratio == 0.0:
            return h * self.ifactor
        k = order + 1
        if self.kind == "predictive":
            factor = self.safety * ratio ** (-1.0 / k)
            h_accepted = older_ratio
            if h_accepted > 0.0 and 0.0 < previous_ratio < math.inf:
                factor *= min(1.0, h / h_accepted * (previous_ratio / ratio) ** (1.0 / k))
            low, high = (self.dfactor, self.ifactor) if accepted else (self.dfactor, self.safety)
            return h * min(high, max(factor, low))
        if self.kind == "pid":
            b1 = (self.pcoeff + self.icoeff + self.dcoeff) / k
            b2 = -(self.pcoeff + 2.0 * self.dcoeff) / k
            b3 = self.dcoeff / k
            previous = previous_ratio if 0.0 < previous_ratio < math.inf else 1.0
            older = older_ratio if 0.0 < older_ratio < math.inf else 1.0
            factor = self.safety * ratio ** (-b1) * previous ** (-b2) * older ** (-b3)
            low, high = (1.0, self.ifactor) if accepted else (self.dfactor, self.safety)
            return h * min(high, max(factor, low))
        if self.kind == "pi" and accepted:
            factor = self.safety * ratio ** (-0.7 / k) * max(previous_ratio, 1e-4) ** (0.4 / k)
        else:
            factor = self.safety * ratio ** (-1.0 / k)
        low = 1.0 if accepted else self.dfactor
        return h * min(self.ifactor, max(factor, low))

    def with_tensor_settings(self, device: torch.device) -> AdaptiveController:
        """A copy whose numeric settings are float64 tensors of shape ``(1,)`` on ``device``, for
        :meth:`adapt_on_device` inside compiled code: a setting that changes between solves is then an input
        of the graph, never a constant to recompile for (nor a symbolic float, which torch 2.13's
        ``while_loop`` cannot lift into its body). Shape ``(1,)`` rather than 0-dim: torch.compile reads a 0-dim
        float64 CPU input as a Python number, specialises it late and then traces the whole function a second
        time. The compiled code takes 0-dim views with :meth:`with_scalar_settings`. Not validated again: the
        settings are this object's."""
        copied = copy.copy(self)
        for name in _NUMERIC_SETTINGS:
            object.__setattr__(copied, name, torch.tensor((float(getattr(self, name)),), dtype=torch.float64,
                                                          device=device))
        return copied

    def with_scalar_settings(self) -> AdaptiveController:
        """The copy of :meth:`with_tensor_settings` with each setting a 0-dim view; called inside the compiled code,
        where the views are intermediates of the graph rather than its inputs."""
        copied = copy.copy(self)
        for name in _NUMERIC_SETTINGS:
            object.__setattr__(copied, name, getattr(self, name).reshape(()))
        return copied

    def adapt_on_device(self, h: torch.Tensor, ratio: torch.Tensor, order: int, previous: torch.Tensor,
                        older: torch.Tensor, pinned: torch.Tensor) -> tuple:
        """:meth:`adapt` with float64 tensors for ``h``, ``ratio`` and the history, and a bool tensor ``pinned``,
        0-dim (the compiled loop) or one per sample, elementwise (per-sample stepping); the settings floats or,
        see :meth:`with_tensor_settings`, tensors. No branch reads a value, so a compiled loop decides on the
        device without a host read. Returns ``(accepted, h_next, previous, older)``; the same arithmetic as :meth:`adapt` and
        :meth:`next_step` (tested against them), with ``torch.where`` for their branches."""
        finite = torch.isfinite(ratio) & (ratio >= 0.0)   # BAD_NORM (< 0) is rejected like NaN; the eager loop,
        accepted = finite & ((ratio <= 1.0) | pinned)       # to which a collapsing step is handed, names it
        k = order + 1

        def pick(if_accepted, if_rejected) -> torch.Tensor:
            # (in h's dtype: torch.where of two Python floats would give the default dtype, float32)
            as_tensor = lambda x: torch.as_tensor(x, dtype=h.dtype, device=h.device)  # noqa: E731
            return torch.where(accepted, as_tensor(if_accepted), as_tensor(if_rejected))

        if self.kind == "pid":
            b1 = (self.pcoeff + self.icoeff + self.dcoeff) / k
            b2 = -(self.pcoeff + 2.0 * self.dcoeff) / k
            b3 = self.dcoeff / k
            usable = lambda r: torch.where((r > 0.0) & (r < math.inf), r, torch.ones_like(r))  # noqa: E731
            factor = self.safety * ratio ** (-b1) * usable(previous) ** (-b2) * usable(older) ** (-b3)
            low, high = pick(1.0, self.dfactor), pick(self.ifactor, self.safety)
            scaled = h * torch.minimum(high, torch.maximum(factor, low))
        elif self.kind == "predictive":
            h_accepted = older
            known = (h_accepted > 0.0) & (previous > 0.0) & (previous < math.inf)
            growth = torch.where(known, previous, ratio) / ratio
            prediction = (h / torch.where(known, h_accepted, h) * growth ** (1.0 / k)).clamp(max=1.0)
            factor = self.safety * ratio ** (-1.0 / k) * torch.where(known, prediction, torch.ones_like(prediction))
            scaled = h * torch.minimum(pick(self.ifactor, self.safety), factor.clamp(min=self.dfactor))
        else:
            factor = self.safety * ratio ** (-1.0 / k)
            if self.kind == "pi":
                pi_factor = self.safety * ratio ** (-0.7 / k) * previous.clamp_min(1e-4) ** (0.4 / k)
                factor = torch.where(accepted, pi_factor, factor)
            low = pick(1.0, self.dfactor)
            scaled = h * torch.clamp(torch.maximum(factor, low), max=self.ifactor)
        h_next = torch.where(ratio == 0.0, h * self.ifactor, scaled)
        h_next = torch.where(finite, h_next, h * self.dfactor)
        # (what an accepted step leaves: its ratio, and the older ratio or, for the predictive one, its length)
        remembered = h if self.kind == "predictive" else previous
        return (accepted, h_next, torch.where(accepted, ratio, previous), torch.where(accepted, remembered, older))


@dataclass(frozen=True)
class IntegralController(AdaptiveController):
    """The integral controller (the default; torchdiffeq's and scipy's rule), as an object:
    ``solve(..., controller=IntegralController(safety=0.8, max_step=0.1))``."""

    kind: str = field(default="integral", init=False)


@dataclass(frozen=True)
class PIController(AdaptiveController):
    """The PI controller (Gustafsson 1991; Hairer and Wanner II, Sec. IV.2) as an object."""

    kind: str = field(default="pi", init=False)


@dataclass(frozen=True)
class PIDController(AdaptiveController):
    """Söderlind's PID controller in diffrax's parametrisation, as an object:
    ``solve(..., controller=PIDController(pcoeff=0.4, icoeff=0.3))``. The defaults (0, 1, 0) are the
    integral controller."""

    kind: str = field(default="pid", init=False)


@dataclass(frozen=True)
class PredictiveController(AdaptiveController):
    """Gustafsson's predictive controller (Hairer and Wanner II, Sec. IV.8; RADAU5's and scipy Radau's), as an
    object: ``solve(..., method="radau5", controller=PredictiveController(safety=0.8))``. The default of the
    implicit and Rosenbrock methods."""

    kind: str = field(default="predictive", init=False)


@dataclass(frozen=True)
class FixedGrid:
    """Steps exactly between consecutive points of ``grid`` (internal, increasing time)."""

    grid: tuple
    step: float | None = None  # the step size, for running past the grid until an event
    max_num_steps: int = 100_000  # only for running past the grid until an event (a grid is finite)

    adaptive = False

    def start(self, stops: list, first_step, read_together: bool = False) -> FixedStepping:
        """The running state of one solve (``stops`` and ``first_step`` concern adaptive control only)."""
        return FixedStepping(self)


# --- One solve's step-size state: what the loop asks for every step -------------------------------------------
#
# The controllers above are immutable settings; ``controller.start(...)`` returns the mutable state of one
# solve, with one interface for adaptive control and fixed grids, so the loop has no branch on the kind:
#   propose(tau) -> Proposal           the next step (clipped to the next stop, min/max step)
#   judge(proposal, outcome) -> bool   accept or reject it (reads the error ratio: the step's one host sync;
#                                      the decision itself is AdaptiveController.adapt, a pure function)
#   advance(proposal, state_jump)      after an accepted step
#   cannot_shrink(proposal)            why a step whose Newton iteration failed cannot be retried smaller
#   over_budget(n_steps, until_event)  max_num_steps reached
#   verdict_callbacks                  whether the user's accept/reject callbacks apply (torchdiffeq: adaptive only)
#   checks_each_step                   whether judge() saw the step's finiteness (else the loop checks at the end)


@dataclass(slots=True)
class Proposal:
    """A step the controller proposes from ``tau`` (internal time): to ``tau1``, of length ``h = tau1 - tau``.
    ``pinned``: held at ``min_step`` and accepted whatever its error (``force_min_step``); ``at_floor``: at
    ``min_step``, so it cannot shrink; ``unclipped``: the controller's length before it was shortened to land on a
    stop (carried across a state jump)."""

    tau1: float
    h: float
    pinned: bool = False
    unclipped: float = 0.0
    at_floor: bool = False


class AdaptiveStepping:
    """One adaptive solve's state: the next step length, the stops to land on, the error history and why
    the last step was rejected (for the failure message)."""

    verdict_callbacks = True
    checks_each_step = True   # a non-finite step is rejected when it is judged

    def __init__(self, controller: AdaptiveController, stops: list, h: float, read_together: bool):
        self.controller, self.stops, self.h = controller, stops, abs(float(h))
        self.stop_index = 0
        self.history = controller.initial_history   # what the controller remembers of accepted steps
        self.read_together = read_together              # one host read for ratio and finiteness (a device)
        self.non_finite = False                         # the last rejection: NaN or inf in the step
        self.newton_failure = None                      # the last rejection: an implicit method's Newton failed

    def propose(self, tau: float) -> Proposal:
        control = self.controller
        h = min(max(self.h, control.min_step), control.max_step)
        # A step held at min_step is accepted whatever its error, also when clipping to a stop makes it an ulp
        # longer or shorter.
        at_floor = h <= control.min_step
        pinned = at_floor and control.force_min_step
        stop = self.stops[self.stop_index]
        if tau + h >= stop:
            return Proposal(stop, stop - tau, pinned, h, at_floor)
        # The step is the time it advances, not the length asked for: at t = 1e12 a step of 2e-3 advances by a
        # multiple of 1.2e-4, and integrating over h while the time moved by fl(tau + h) - tau was 2.4% off.
        tau1 = tau + h
        return Proposal(tau1, tau1 - tau, pinned, h, at_floor)

    def cannot_shrink(self, proposal: Proposal) -> str | None:
        """Why a failed step cannot be retried smaller (``None``: it can)."""
        return f"at min_step={self.controller.min_step:.3g}" if proposal.at_floor else None

    def judge(self, proposal: Proposal, outcome) -> bool:
        control, h = self.controller, proposal.h
        if outcome.failure is not None:
            # An implicit method could not solve its stage equations: shrink the step.
            self.newton_failure = outcome.failure
            self.h = h * (outcome.step_factor or control.dfactor)
            return False
        # A step is accepted only if its result is finite: the weighted norm cannot see an infinite y1 (its
        # scale becomes infinite too) and a user's norm may hide NaN, so the sum of y1 (not finite iff some
        # element is not) is read with the ratio: on a device in the same host read, on the CPU as a second
        # float (measured: 3 us a step; torch.where(isfinite(y1).all(), ...) cost 23 us).
        total = outcome.y1.detach().sum()  # (no graph: a check, not part of the solution)
        if total.is_complex():
            total = total.real + total.imag
        if self.read_together:
            ratio, total = torch.stack([outcome.error_ratio.to(total.dtype), total]).tolist()
        else:                 # on the CPU two reads are cheaper than a stack (3 us against 7 us)
            ratio, total = float(outcome.error_ratio), float(total)
        check_norm_value(ratio)
        if not math.isfinite(total):
            ratio = math.nan
        accepted, h_next, self.history = control.adapt(h, ratio, outcome.error_order, self.history, proposal.pinned)
        self.non_finite = not math.isfinite(ratio)
        if not self.non_finite:
            self.newton_failure = None
        if accepted and outcome.step_factor is not None:
            h_next = h * outcome.step_factor   # a multistep method's own step policy
        elif accepted and outcome.keep_step is not None and outcome.keep_step[0] <= h_next / h <= outcome.keep_step[1]:
            h_next = h                         # an implicit method keeps its LU (Hairer's RADAU5)
        self.h = h_next
        return accepted

    def advance(self, proposal: Proposal, carry_step: bool) -> None:
        if carry_step:
            # The state changed on the stop, or the stop is an output landed on for its value alone: the step size
            # the controller proposed before landing there (not the clipped one) carries on. (Without it, pairs of
            # outputs 1e-6 apart cost kvaerno5 101 steps instead of 41, each landing restarting from a tiny step.)
            self.h = max(self.h, proposal.unclipped)
        if proposal.tau1 == self.stops[self.stop_index] and self.stop_index < len(self.stops) - 1:
            self.stop_index += 1

    def over_budget(self, n_steps: int, until_event: bool) -> bool:
        return n_steps >= self.controller.max_num_steps


class FixedStepping:
    """One fixed-grid solve's state: the index of the current grid point (past the grid, in event mode,
    steps of ``step``)."""

    verdict_callbacks = False
    checks_each_step = False  # no host read per step: the loop checks the outputs once, at the end
    non_finite, newton_failure = False, None

    def __init__(self, grid: FixedGrid):
        self.controller, self.index = grid, 0

    def propose(self, tau: float) -> Proposal:
        grid = self.controller.grid
        # Event mode runs past the end of t: keep stepping with the fixed step size.
        tau1 = grid[self.index + 1] if self.index + 1 < len(grid) else tau + self.controller.step
        return Proposal(tau1, tau1 - tau)

    def cannot_shrink(self, proposal: Proposal) -> str | None:
        return "on the fixed grid"

    def judge(self, proposal: Proposal, outcome) -> bool:
        return True   # (a Newton failure was handled by cannot_shrink; non-finite values are found at the end)

    def advance(self, proposal: Proposal, carry_step: bool) -> None:
        self.index += 1

    def over_budget(self, n_steps: int, until_event: bool) -> bool:
        # A grid is finite; past it, a fixed-step event solve runs until the event and is capped like adaptive.
        return until_event and self.index >= len(self.controller.grid) - 1 and n_steps >= self.controller.max_num_steps
