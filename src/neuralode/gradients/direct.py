"""Backpropagation through every step of the solve."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..integrate import integrate
from .base import GradientStrategy, RunResult


@dataclass(frozen=True)
class Direct(GradientStrategy):
    """Autograd records every operation of every step; ``backward()`` differentiates the discrete solve.

    Exact for the computed numbers, supports double backward (Laplacians through the solve for
    physics-informed losses), and needs memory proportional to the number of steps times one
    evaluation's activations. Step sizes are treated as constants (they are chosen on the host), which
    is the usual convention and keeps the gradient of the discrete map well defined.
    """

    def run(self, problem, stepper, control, **kwargs) -> RunResult:
        integration = integrate(problem, stepper, control, **kwargs)
        return RunResult(torch.stack(integration.outputs), integration)
