"""Dense output: per-step polynomials in theta, and the global piecewise solution.

Every interpolant in neuralode is a polynomial ``y(t0 + theta h) = sum_m c_m theta**m`` on its step,
with ``c_0 = y0`` exactly; the steppers produce the coefficients (method-specific extensions or cubic
Hermite). Evaluating at a step boundary returns the stored step value itself, so dense output
reproduces the steps bit for bit.
"""

from __future__ import annotations

import bisect

import torch


def horner(coefficients, theta: float) -> torch.Tensor:
    """``sum_m c_m theta**m`` for a list of tensors ``c_m`` (Horner's scheme, one fused op per degree)."""
    result = coefficients[-1]
    for c in reversed(coefficients[:-1]):
        result = torch.add(c, result, alpha=theta)
    return result


def hermite_coefficients(y0: torch.Tensor, f0: torch.Tensor, y1: torch.Tensor, f1: torch.Tensor, h) -> list:
    """The cubic Hermite through ``(y0, f0)`` and ``(y1, f1)`` as coefficients in theta (third order)."""
    delta = y1 - y0
    return [y0, h * f0, 3 * delta - h * (2 * f0 + f1), h * (f0 + f1) - 2 * delta]


def horner_derivative(coefficients, theta: float) -> torch.Tensor:
    """``d/dtheta sum_m c_m theta**m`` (the step's interpolant's slope in theta: ``h y'``)."""
    degree = len(coefficients) - 1
    if degree == 0:
        return torch.zeros_like(coefficients[0])
    result = coefficients[-1] * degree
    for m in range(degree - 1, 0, -1):
        result = torch.add(coefficients[m] * m, result, alpha=theta)
    return result


# The interpolant is checked three quarters into the step. A collocation polynomial satisfies the ODE at its nodes
# (radau5's c = 0.155, 0.645, 1) and the error of a cubic Hermite on a smooth solution, ~theta^2 (1 - theta)^2, has
# no slope at 0.5, so the defect vanishes at those points whatever the error; at 0.25 or 0.75 the Hermite's h *
# defect is 3x its error at the middle. On stiff components the Hermite of kvaerno3/4 is worst late in the step
# (theta ~ 0.7: its end slope is a stage derivative): on Prothero-Robinson at rtol 1e-3 to 1e-8, checked at 0.25
# they stayed up to 61x and 27x the tolerance, at 0.75 within 2.3x and 2.0x, and in fewer evaluations; radau5,
# rodas5p and kvaerno5 were within 2.4x, 3.7x and 2.1x (4.3x, 6.6x, 2.1x at 0.25).
INTERPOLATION_CHECK_THETA = 0.75
# The filtered defect of a stiff component carries f's rounding, |lambda| eps |u|, divided by the filter's h gamma
# |lambda|, and the rounding of the interpolant and its slope, eps sum_m |c_m|: a few eps of the coefficients'
# size, and the rounding of t where f sees it in float32, eps |t| |y'|. That much of the estimate is noise, not
# interpolation error: in float32 at rtol 3e-7 it made ratios of 0.1-3 that kept the steps from growing (rodas5p on
# Prothero-Robinson ran out of steps near t = 4.8, where float32 resolves t to 4.8e-7).
_ROUNDING_ULPS = 16
_TIME_ROUNDING_ULPS = 4     # (t is rounded to half an ulp: 8x that)


def interpolation_error(func, t0: float, h: float, coefficients, stiff_filter, error_norm, y0, y1) -> torch.Tensor:
    """The error ratio of a step's dense output, from its defect: ``u(t)`` the interpolant and
    ``d = h (u' - f(t, u))`` at ``theta = INTERPOLATION_CHECK_THETA``, the estimate is

        e = (I - h gamma J)^{-1} gamma d

    with the step's own factorisation (``stiff_filter = (gamma, solve)``). A component where ``h |lambda|`` is
    small gets ``gamma d`` (about the error the defect drives over the step); a stiff one, where the
    solution is pulled onto a slow manifold, ``e -> u - (the manifold)``: the interpolant's distance from the
    true solution, which ``h d`` alone overstates by ``h |lambda|``. This is Shampine's error filtering (as in
    RADAU5's step error estimate) applied to the defect of the continuous solution (Enright's defect control).
    Less the rounding, per component: 16 eps ``sum_m |c_m|`` and 4 eps ``|t| |u'|``. Costs one evaluation of
    ``f`` and one solve with the factorisation of the step. A stiff method's step error estimate sees the step's end
    only: on ``y' = -1e5 (y - cos t) - sin t`` at rtol 1e-4 radau5 (like scipy's Radau) took a step
    of 7.7, over which its interpolant was 0.66 off ``cos t``. Returns a 0-dim ratio (<= 1: acceptable).
    """
    gamma, solve = stiff_filter
    theta = INTERPOLATION_CHECK_THETA
    with torch.no_grad():
        u = horner(coefficients, theta).detach()
        slope = horner_derivative(coefficients, theta).detach()
        t = t0 + theta * h
        defect = slope - h * func(t, u)
        error = solve(gamma * defect)
        magnitude = error.abs()
        # (f sees t in the state's dtype: its rounding moves a stiff solution's manifold by eps |t| |y'|)
        noise = (_ROUNDING_ULPS * sum(c.detach().abs() for c in coefficients)
                 + _TIME_ROUNDING_ULPS * (abs(t) / abs(h)) * slope.abs()) * torch.finfo(magnitude.dtype).eps
        error = error * ((magnitude - noise).clamp_min(0) / magnitude.clamp_min(torch.finfo(magnitude.dtype).tiny))
        return error_norm(error, y0.detach(), y1.detach())


def linear_coefficients(y0: torch.Tensor, y1: torch.Tensor) -> list:
    """Linear interpolation between step ends (torchdiffeq's default for fixed grids)."""
    return [y0, y1 - y0]


class DenseSolution:
    """The continuous solution assembled from accepted steps (internal time ``tau = direction * t``).

    ``starts[i]``, ``lengths[i]`` and ``coefficients[i]`` describe step ``i``; ``end_value`` is the state
    at the end of the last step.
    """

    def __init__(self, direction: int, start_tau: float | None = None, start_value: torch.Tensor | None = None):
        self.direction = direction
        self.starts: list = []
        self.lengths: list = []
        self.coefficients: list = []
        # Before the first step (a solve with one output time, or one that failed in its first step) the
        # solution is its initial value at the start.
        self.start_tau, self.end_value = start_tau, start_value
        self.end_tau: float | None = None  # set when an event ends the solution inside the last step

    def append(self, tau0: float, h: float, coefficients) -> None:
        self.starts.append(tau0)
        self.lengths.append(h)
        self.coefficients.append(coefficients)

    @property
    def span(self):
        if not self.starts:
            return None if self.start_tau is None else (self.start_tau, self.start_tau)
        end = self.starts[-1] + self.lengths[-1] if self.end_tau is None else self.end_tau
        return self.starts[0], end

    def step_ends(self) -> list:
        """The internal times at which the accepted steps end (the last one cut at an event that ended the
        solution inside it)."""
        ends = [s + h for s, h in zip(self.starts, self.lengths)]
        if self.end_tau is not None and ends:
            ends[-1] = self.end_tau
        return ends

    def truncate(self, count: int) -> None:
        """Keep the first ``count`` steps; the solution then ends where step ``count`` began."""
        if count >= len(self.starts):
            return
        self.end_value = self.coefficients[count][0]   # the polynomial's value at theta = 0
        del self.starts[count:], self.lengths[count:], self.coefficients[count:]
        self.end_tau = None

    def evaluate_one(self, t: float) -> torch.Tensor:
        tau = self.direction * t
        lo, hi = self.span
        if not (lo <= tau <= hi):
            a, b = sorted((self.direction * lo, self.direction * hi))
            raise ValueError(f"t={t} lies outside the solved span [{a}, {b}]; dense output does not extrapolate")
        if tau == hi:
            return self.end_value
        i = bisect.bisect_right(self.starts, tau) - 1
        theta = (tau - self.starts[i]) / self.lengths[i]
        if theta == 0.0:
            return self.coefficients[i][0]
        return horner(self.coefficients[i], theta)

    def derivative_one(self, t: float) -> torch.Tensor:
        """``dy/dt`` of the interpolant at ``t``: within a step, the slope of its polynomial; at a step boundary
        the slope of the step that starts there (of the last step at the end of the span)."""
        tau = self.direction * t
        lo, hi = self.span
        if not (lo <= tau <= hi):
            a, b = sorted((self.direction * lo, self.direction * hi))
            raise ValueError(f"t={t} lies outside the solved span [{a}, {b}]; dense output does not extrapolate")
        if not self.starts:
            raise ValueError("the solution has no step (one output time, or a failure in the first step), so its "
                             "dense output has no derivative; evaluate func(t, y) instead")
        i = min(bisect.bisect_right(self.starts, tau) - 1, len(self.starts) - 1)
        theta = (tau - self.starts[i]) / self.lengths[i]
        # theta = (tau - tau_i) / h_i and tau = direction * t: dy/dt = direction * (dp/dtheta) / h_i
        return horner_derivative(self.coefficients[i], theta) * (self.direction / self.lengths[i])


class PiecewiseDense:
    """The dense output of a solve whose state jumps (events with an ``affect``): one :class:`DenseSolution` per
    stretch between jumps, in time order. Right-continuous: at a jump time, the stretch that starts there (the
    state after the jump)."""

    def __init__(self, pieces: list):
        self.pieces = pieces
        self.direction = pieces[0].direction

    def _piece(self, t: float) -> DenseSolution:
        tau = self.direction * t
        lo, hi = self.pieces[0].span[0], self.pieces[-1].span[1]
        if not (lo <= tau <= hi):
            a, b = sorted((self.direction * lo, self.direction * hi))
            raise ValueError(f"t={t} lies outside the solved span [{a}, {b}]; dense output does not extrapolate")
        return next(piece for piece in reversed(self.pieces) if piece.span[0] <= tau)

    def evaluate_one(self, t: float) -> torch.Tensor:
        return self._piece(t).evaluate_one(t)

    def derivative_one(self, t: float) -> torch.Tensor:
        return self._piece(t).derivative_one(t)

    def step_ends(self) -> list:
        return [end for piece in self.pieces for end in piece.step_ends()]
