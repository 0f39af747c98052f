"""How often ``adams`` accepts a step whose local error exceeds its tolerance.

    python benchmarks/adams_local_error.py

Every DETEST problem of ``benchmarks/detest.py`` (A1-E5, t in [0, 20]) and Arenstorf's orbit, at rtol = atol =
1e-4, 1e-6 and 1e-8. Each accepted step of ``method="adams"`` is solved again from its start by scipy's DOP853 at
rtol = atol = 1e-14; its local error is the RMS over components of the difference, weighted by
``tol + tol * max(|y0|, |y1|)`` (the solver's own norm), so 1 is exactly the tolerance. Prints, per problem and
tolerance, the evaluations, the accepted steps over twice the tolerance, the largest local error and the global
error at the end over the tolerance, then the totals. Needs scipy. To compare two versions of the code, run it
with ``PYTHONPATH=<checkout>/src``.
"""

from __future__ import annotations

import math
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
from scipy.integrate import solve_ivp

sys.path.insert(0, str(Path(__file__).resolve().parent))
import detest  # noqa: E402

import neuralode  # noqa: E402
from neuralode.solvers.adams import VariableOrderAdams  # noqa: E402

F64 = torch.float64


def accepted_local_errors(field, y0, t_end, tol):
    """The solution, and the weighted local error of each accepted step (1 = the tolerance)."""
    attempts = []
    original = VariableOrderAdams.step

    def recording(self, func, t0, y, f0, h, error_norm, state=None):
        outcome = original(self, func, t0, y, f0, h, error_norm, state)
        attempts.append((t0, y.clone(), h, float(outcome.error_ratio), outcome.y1.clone()))
        return outcome

    VariableOrderAdams.step = recording
    try:
        solution = neuralode.solve(field, torch.tensor(y0, dtype=F64), torch.tensor([0.0, t_end], dtype=F64),
                                   method="adams", rtol=tol, atol=tol, throw=False)
    finally:
        VariableOrderAdams.step = original
    numpy_field = detest._numpy_field(field)
    errors = []
    for (t0, start, h, ratio, end), following in zip(attempts, attempts[1:]):
        # accepted: the next attempt starts where this one ended (the last step has no successor and is skipped)
        if ratio > 1 or abs(following[0] - (t0 + h)) > 1e-12 * max(1.0, abs(t0)):
            continue
        exact = solve_ivp(numpy_field, (t0, t0 + h), start.numpy(), method="DOP853", rtol=1e-14, atol=1e-14).y[:, -1]
        scale = tol + tol * np.maximum(np.abs(start.numpy()), np.abs(end.numpy()))
        errors.append(math.sqrt(np.mean(((exact - end.numpy()) / scale) ** 2)))
    return solution, np.array(errors)


def main():
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", message="At least one element of `rtol` is too small")
    problems = {name: (*detest.PROBLEMS[name], detest.T_END) for name in detest.PROBLEMS}
    problems["Arenstorf"] = detest.ARENSTORF
    totals = {"nfe": 0, "over": 0, "steps": 0}
    for name, (field, y0, t_end) in problems.items():
        line = f"{name:9s}"
        reference = solve_ivp(detest._numpy_field(field), (0.0, t_end), y0, method="DOP853", rtol=1e-13,
                              atol=1e-13).y[:, -1]
        for tol in (1e-4, 1e-6, 1e-8):
            solution, errors = accepted_local_errors(field, y0, t_end, tol)
            over = int((errors > 2).sum())
            global_error = (np.abs(solution.ys[-1].numpy() - reference).max() / tol if solution.success
                            else math.nan)
            largest = errors.max() if errors.size else 0.0
            line += (f" | {tol:g}: nfe {solution.stats['nfe']:5d}, over 2x {over:3d} of {errors.size:4d},"
                     f" max {largest:5.1f}, global {global_error:7.2g}")
            totals["nfe"] += solution.stats["nfe"]
            totals["over"] += over
            totals["steps"] += errors.size
        print(line, flush=True)
    print(f"total: {totals['nfe']} evaluations, {totals['over']} of {totals['steps']} accepted steps over twice the "
          "tolerance")


if __name__ == "__main__":
    main()
