"""Global error on eccentric Kepler orbits, as a multiple of the tolerance (the issue-10 check).

    python benchmarks/kepler_accuracy.py

y'' = -y / |y|^3, y0 = [1 - e, 0, 0, sqrt((1 + e) / (1 - e))], t in [0, 20], rtol = atol = tol; the error
is max |y(20) - y_ref| with y_ref from scipy's DOP853 at 1e-13, and the same measure for scipy's
DOP853, RK45 and LSODA as references. Needs scipy.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy.integrate import solve_ivp

import neuralode


def kepler(t, y):
    return torch.cat([y[2:], -y[:2] / (y[:2] * y[:2]).sum().sqrt() ** 3])


def kepler_numpy(t, y):
    return np.r_[y[2:], -y[:2] / np.linalg.norm(y[:2]) ** 3]


def main():
    eccentricities = (0.1, 0.3, 0.5, 0.7, 0.9)
    print("tol    method          " + "  ".join(f"e={e:<7}" for e in eccentricities))
    for tol in (1e-3, 1e-6):
        rows = {m: [] for m in ("dopri5", "tsit5", "dopri8", "adams", "scipy DOP853", "scipy RK45", "scipy LSODA")}
        for e in eccentricities:
            y0 = [1 - e, 0.0, 0.0, math.sqrt((1 + e) / (1 - e))]
            reference = solve_ivp(kepler_numpy, (0, 20), y0, method="DOP853", rtol=1e-13, atol=1e-13).y[:, -1]
            for method in ("dopri5", "tsit5", "dopri8", "adams"):
                sol = neuralode.solve(kepler, torch.tensor(y0, dtype=torch.float64),
                                      torch.tensor([0.0, 20.0], dtype=torch.float64), method=method, rtol=tol,
                                      atol=tol, throw=False)
                error = np.abs(sol.ys[-1].numpy() - reference).max() if sol.success else math.nan
                rows[method].append(error / tol)
            for solver in ("DOP853", "RK45", "LSODA"):
                y = solve_ivp(kepler_numpy, (0, 20), y0, method=solver, rtol=tol, atol=tol).y[:, -1]
                rows[f"scipy {solver}"].append(np.abs(y - reference).max() / tol)
        for method, values in rows.items():
            print(f"{tol:<6g} {method:15s} " + "  ".join(f"{v:9.3g}" for v in values))


if __name__ == "__main__":
    main()
