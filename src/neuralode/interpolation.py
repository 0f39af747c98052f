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
