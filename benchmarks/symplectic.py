"""Symplectic splitting methods against Runge-Kutta methods at equal evaluations: energy over many Kepler orbits.

    python benchmarks/symplectic.py [--orbits 50] [--eccentricity 0.5]

The Kepler problem q'' = -q / |q|^3 as a separable pair (q, p), H = |p|^2 / 2 - 1 / |q|, from perihelion with
eccentricity e (period 2 pi), float64, one thread. Every method gets the same evaluations per unit time: the
leapfrog (2 a step) h, yoshida4 (6) 3h, mclachlan4 (10) 5h, yoshida6 (14) 7h, rk4 (4) 2h, midpoint (2) h; tsit5
adaptive at two tolerances for comparison. Reported: the largest energy error over the run and in its first and last
tenth (a symplectic method's stays bounded, a Runge-Kutta method's grows), the position error after the last orbit
(against scipy's DOP853 at 1e-13), evaluations, wall time and time per evaluation (the splitting methods' pair state
against the Runge-Kutta methods' flat one). Writes results/symplectic.json.
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
import torch
from _common import markdown_table, write_json

import neuralode

F64 = torch.float64


def kepler_pair(t, y):
    q, p = y
    return p, -q / (q * q).sum().sqrt() ** 3


def kepler_flat(t, y):
    return torch.cat([y[2:], -y[:2] / (y[:2] * y[:2]).sum().sqrt() ** 3])


def energy(q, p):
    return (p * p).sum(-1) / 2 - 1 / (q * q).sum(-1).sqrt()


def reference(e, t_end):
    from scipy.integrate import solve_ivp
    y0 = [1 - e, 0.0, 0.0, math.sqrt((1 + e) / (1 - e))]
    def rhs(t, y):
        r3 = (y[0] ** 2 + y[1] ** 2) ** 1.5
        return [y[2], y[3], -y[0] / r3, -y[1] / r3]
    return solve_ivp(rhs, (0, t_end), y0, method="DOP853", rtol=1e-13, atol=1e-13).y[:2, -1]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--orbits", type=int, default=50)
    parser.add_argument("--eccentricity", type=float, default=0.5)
    parser.add_argument("--h", type=float, default=0.01, help="the leapfrog's step; the others scale with it")
    args = parser.parse_args()
    torch.set_num_threads(1)
    e, t_end = args.eccentricity, 2 * math.pi * args.orbits
    q0 = torch.tensor([1 - e, 0.0], dtype=F64)
    p0 = torch.tensor([0.0, math.sqrt((1 + e) / (1 - e))], dtype=F64)
    exact_end = reference(e, t_end)
    cases = [("leapfrog", 1), ("yoshida4", 3), ("mclachlan4", 5), ("yoshida6", 7), ("rk4", 2), ("midpoint", 1)]
    rows = []
    for method, multiple in cases:
        h = multiple * args.h
        n = int(round(t_end / h))
        t = torch.linspace(0, t_end, n + 1, dtype=F64)   # (the outputs on the step grid)
        pair = method not in ("rk4", "midpoint")
        start = time.perf_counter()
        if pair:
            sol = neuralode.solve(kepler_pair, (q0, p0), t, method=method,
                                  options={"grid_constructor": lambda f, y0, t: t})
            q, p = sol.ys
        else:
            sol = neuralode.solve(kepler_flat, torch.cat([q0, p0]), t, method=method,
                                  options={"grid_constructor": lambda f, y0, t: t})
            q, p = sol.ys[:, :2], sol.ys[:, 2:]
        seconds = time.perf_counter() - start
        rows.append(_row(method, f"h = {h:g}", q, p, exact_end, sol.stats["nfe"], seconds))
    for tol in (1e-6, 1e-9):
        t = torch.linspace(0, t_end, 20 * args.orbits + 1, dtype=F64)
        start = time.perf_counter()
        sol = neuralode.solve(kepler_flat, torch.cat([q0, p0]), t, method="tsit5", rtol=tol, atol=tol)
        seconds = time.perf_counter() - start
        rows.append(_row("tsit5", f"rtol = atol = {tol:g}", sol.ys[:, :2], sol.ys[:, 2:], exact_end, sol.stats["nfe"],
                         seconds))
    columns = ["method", "setting", "nfe", "energy error, first tenth", "last tenth", "largest",
               "position error at the end", "seconds", "us per evaluation"]
    print(markdown_table(rows, [(c, c, None) for c in columns]))
    write_json("symplectic.json", {"orbits": args.orbits,
                              "eccentricity": e, "h": args.h, "rows": rows})


def _row(method, setting, q, p, exact_end, nfe, seconds):
    error = (energy(q, p) - energy(q[:1], p[:1])).abs()
    tenth = max(1, len(error) // 10)
    return {"method": method, "setting": setting, "nfe": nfe,
            "energy error, first tenth": f"{error[:tenth].max().item():.2e}",
            "last tenth": f"{error[-tenth:].max().item():.2e}", "largest": f"{error.max().item():.2e}",
            "position error at the end": f"{np.abs(q[-1].numpy() - exact_end).max():.2e}",
            "seconds": round(seconds, 2), "us per evaluation": round(seconds / nfe * 1e6, 1)}


if __name__ == "__main__":
    main()
