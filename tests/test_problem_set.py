"""A standard non-stiff problem set (DETEST-style; Hull, Enright, Fellen and Sedgwick, SIAM J. Numer. Anal. 9
(1972), plus Arenstorf's orbit from Hairer, Norsett and Wanner I, Sec. II.0) solved by our methods and by
scipy's implementation of the same method, at the same tolerance: our global error at the end must be within
a small factor of scipy's. Global errors on these problems are 1x-10^4x the tolerance for *both* libraries
(the orbits amplify local errors), so the comparison is with the same method elsewhere, not with the
tolerance. Reference: scipy's DOP853 at rtol = atol = 1e-13.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import neuralode

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import detest  # noqa: E402

scipy_integrate = pytest.importorskip("scipy.integrate")

F64 = torch.float64


# The DETEST fields are the benchmark's (benchmarks/detest.py, all on [0, 20]), and so is Arenstorf's orbit.
_DETEST = ("A2", "A3", "A4", "B1", "B4", "D5", "E2")   # D5: eccentricity 0.9
PROBLEMS = {
    **{name: (*detest.PROBLEMS[name], detest.T_END) for name in _DETEST},
    "Arenstorf": detest.ARENSTORF,
}
# Our method -> scipy's implementation of the same method (same pair, same error estimate).
SAME_METHOD = {"dopri5": "RK45", "dopri8": "DOP853", "radau5": "Radau"}
# Ours may be this much less accurate than scipy's. dopri5 and dopri8 step with torchdiffeq's controller (an
# accepted step never shrinks the next), scipy with its own, so the step sequences and errors differ. Measured
# on 2026-11-28: ours over scipy's at most 3.3 (dopri8 on A3 at 1e-9) at the tolerances below, and 6.4 for
# dopri5 on B1 at 1e-5 (not tested); radau5 at most 1.7. (Tableaus are checked against their order conditions
# when built; this guards the loop around them: an error estimate or norm off by 10x shows here as 10x.)
FACTOR = 8.0
CASES = [(method, tol) for method in ("dopri5", "dopri8") for tol in (1e-6, 1e-9)] + [("radau5", 1e-6)]


@pytest.mark.parametrize("method, tol", CASES)
@pytest.mark.parametrize("name", sorted(PROBLEMS))
def test_global_error_matches_scipys_same_method(name, method, tol):
    func, y0, t_end = PROBLEMS[name]
    reference = scipy_integrate.solve_ivp(detest._numpy_field(func), (0.0, t_end), y0, method="DOP853",
                                          rtol=1e-13, atol=1e-13).y[:, -1]
    scale = 1.0 + np.abs(reference).max()
    theirs = scipy_integrate.solve_ivp(detest._numpy_field(func), (0.0, t_end), y0, method=SAME_METHOD[method],
                                       rtol=tol, atol=tol).y[:, -1]
    ours = neuralode.solve(func, torch.tensor(y0, dtype=F64), torch.tensor([0.0, t_end], dtype=F64),
                           method=method, rtol=tol, atol=tol).ys[-1].numpy()
    our_error = np.abs(ours - reference).max() / scale
    their_error = np.abs(theirs - reference).max() / scale
    # The floor: where scipy is lucky (an error far below the tolerance), ours need only meet the tolerance.
    assert our_error <= FACTOR * max(their_error, tol), (our_error / tol, their_error / tol)
