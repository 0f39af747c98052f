"""The non-stiff DETEST set, every adaptive method of ours beside scipy's four, at three tolerances.

    python benchmarks/detest.py                               # all adaptive methods, rtol = atol = 1e-4, 1e-7, 1e-10
    python benchmarks/detest.py --methods dopri5,kvaerno5 --tols 1e-6

Problems: classes A-E of Hull, Enright, Fellen and Sedgwick, "Comparing numerical methods for ordinary
differential equations", SIAM J. Numer. Anal. 9 (1972) 603-637 (the definitions as restated by Enright and
Pryce, ACM TOMS 13 (1987)), all on [0, 20], float64: A1-A5, B1-B5, C1-C4 (C5, the five-body problem, is
left out) and D1-D5 (Kepler orbits of eccentricity 0.1-0.9), E1-E5. The reference is scipy's DOP853 at
rtol = atol = 1e-13. The score of a solve is its global error at t = 20 (max over components) divided by the
tolerance; scipy's RK45, DOP853, Radau and LSODA get the same score on the same problems. Per method and
tolerance the table gives the median and the largest score over the 24 problems, the failures (a solve that
stopped, e.g. at the step budget, or that raised), and the problems where ours is more than 10x worse than the
worst of scipy's four ("outliers", listed below the table). Writes results/detest.json.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import markdown_table, write_json  # noqa: E402

import neuralode  # noqa: E402

F64 = torch.float64
T_END = 20.0
ADAPTIVE = ["dopri5", "tsit5", "bosh3", "dopri8", "adaptive_heun", "fehlberg2", "adams",
            "kvaerno3", "kvaerno4", "kvaerno5", "radau5", "rodas5", "rodas5p"]
SCIPY = ["RK45", "DOP853", "Radau", "LSODA"]


def _kepler(eccentricity):
    def field(t, y):
        r3 = (y[0] ** 2 + y[1] ** 2) ** 1.5
        return torch.stack([y[2], y[3], -y[0] / r3, -y[1] / r3])
    return field, [1 - eccentricity, 0.0, 0.0, math.sqrt((1 + eccentricity) / (1 - eccentricity))]


def _c1(t, y):  # a chain of linear decays; the last component collects
    return torch.cat([-y[:1], y[:-2] - y[1:-1], y[-2:-1]])


def _c2(t, y):
    i = torch.arange(1, 11, dtype=y.dtype)
    return torch.cat([-y[:1], (i[1:9] - 1) * y[:8] - i[1:9] * y[1:9], 9 * y[8:9]])


def _second_difference(n):  # C3 (n = 10) and C4 (n = 51): the discrete heat equation
    def field(t, y):
        zero = y.new_zeros(1)
        return torch.cat([zero, y[:-1]]) - 2 * y + torch.cat([y[1:], zero])
    return field, [1.0] + [0.0] * (n - 1)


def _b4(t, y):
    r = torch.sqrt(y[0] ** 2 + y[1] ** 2)
    return torch.stack([-y[1] - y[0] * y[2] / r, y[0] - y[1] * y[2] / r, y[0] / r])


PROBLEMS = {
    "A1": (lambda t, y: -y, [1.0]),
    "A2": (lambda t, y: -y ** 3 / 2, [1.0]),
    "A3": (lambda t, y: y * torch.cos(t), [1.0]),
    "A4": (lambda t, y: y / 4 * (1 - y / 20), [1.0]),
    "A5": (lambda t, y: (y - t) / (y + t), [4.0]),
    "B1": (lambda t, y: torch.stack([2 * (y[0] - y[0] * y[1]), -(y[1] - y[0] * y[1])]), [1.0, 3.0]),
    "B2": (lambda t, y: torch.stack([-y[0] + y[1], y[0] - 2 * y[1] + y[2], y[1] - y[2]]), [2.0, 0.0, 1.0]),
    "B3": (lambda t, y: torch.stack([-y[0], y[0] - y[1] ** 2, y[1] ** 2]), [1.0, 0.0, 0.0]),
    "B4": (_b4, [3.0, 0.0, 0.0]),
    "B5": (lambda t, y: torch.stack([y[1] * y[2], -y[0] * y[2], -0.51 * y[0] * y[1]]), [0.0, 1.0, 1.0]),
    "C1": (_c1, [1.0] + [0.0] * 9),
    "C2": (_c2, [1.0] + [0.0] * 9),
    "C3": _second_difference(10),
    "C4": _second_difference(51),
    **{f"D{k}": _kepler(e) for k, e in enumerate((0.1, 0.3, 0.5, 0.7, 0.9), start=1)},
    "E1": (lambda t, y: torch.stack([y[1], -(y[1] / (t + 1) + (1 - 0.25 / (t + 1) ** 2) * y[0])]),
           [0.6713967071418030, 0.09540051444747446]),
    "E2": (lambda t, y: torch.stack([y[1], (1 - y[0] ** 2) * y[1] - y[0]]), [2.0, 0.0]),
    "E3": (lambda t, y: torch.stack([y[1], y[0] ** 3 / 6 - y[0] + 2 * torch.sin(2.78535 * t)]), [0.0, 0.0]),
    "E4": (lambda t, y: torch.stack([y[1], 0.032 - 0.4 * y[1] ** 2]), [30.0, 0.0]),
    "E5": (lambda t, y: torch.stack([y[1], torch.sqrt(1 + y[1] ** 2) / (25 - t)]), [0.0, 0.0]),
}


def _arenstorf(t, y, mu=0.012277471):
    x, v = y[0], y[1]
    d1 = ((x + mu) ** 2 + v ** 2) ** 1.5
    d2 = ((x - 1 + mu) ** 2 + v ** 2) ** 1.5
    return torch.stack([y[2], y[3], x + 2 * y[3] - (1 - mu) * (x + mu) / d1 - mu * (x - 1 + mu) / d2,
                        v - 2 * y[2] - (1 - mu) * v / d1 - mu * v / d2])


# Arenstorf's periodic orbit of the restricted three-body problem (Hairer, Norsett and Wanner I, Sec. II.0): not a
# DETEST problem, so not in PROBLEMS; (field, y0, one period), for the tests and benchmarks that add it.
ARENSTORF = (_arenstorf, [0.994, 0.0, 0.0, -2.00158510637908252240537862224], 17.0652165601579625588917206249)


def _numpy_field(field):
    return lambda t, y: field(torch.tensor(t, dtype=F64), torch.tensor(y, dtype=F64)).numpy()


def _ours(field, y0, method, tol, reference):
    try:
        sol = neuralode.solve(field, torch.tensor(y0, dtype=F64), torch.tensor([0.0, T_END], dtype=F64),
                              method=method, rtol=tol, atol=tol, throw=False)
    except Exception as exc:  # a raise is a result here: it is counted and reported
        return {"failed": f"{type(exc).__name__}: {exc}"}
    if not sol.success:
        return {"failed": str(sol.message), "nfe": sol.stats["nfe"]}
    return {"error": float((sol.ys[-1] - torch.tensor(reference)).abs().max()), "nfe": sol.stats["nfe"]}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default=",".join(ADAPTIVE))
    parser.add_argument("--tols", default="1e-4,1e-7,1e-10")
    parser.add_argument("--json", default="detest.json", help="file name under benchmarks/results/")
    args = parser.parse_args()
    from scipy.integrate import solve_ivp

    torch.set_num_threads(1)
    methods, tols = args.methods.split(","), [float(x) for x in args.tols.split(",")]
    results, start = [], time.perf_counter()
    for name, (field, y0) in PROBLEMS.items():
        reference = solve_ivp(_numpy_field(field), (0, T_END), y0, method="DOP853", rtol=1e-13, atol=1e-13).y[:, -1]
        for tol in tols:
            scipy_errors = {}
            for method in SCIPY:
                sol = solve_ivp(_numpy_field(field), (0, T_END), y0, method=method, rtol=tol, atol=tol)
                scipy_errors[method] = float(np.abs(sol.y[:, -1] - reference).max())
                results.append({"problem": name, "tol": tol, "library": "scipy", "method": method,
                                "error": scipy_errors[method], "nfe": int(sol.nfev)})
            for method in methods:
                row = {"problem": name, "tol": tol, "library": "neuralode", "method": method,
                       "worst_scipy_error": max(scipy_errors.values())}
                row.update(_ours(field, y0, method, tol, reference))
                results.append(row)
        print(f"{name} done ({time.perf_counter() - start:.0f} s)", file=sys.stderr, flush=True)

    summary = []
    for library, names in (("neuralode", methods), ("scipy", SCIPY)):
        for method in names:
            for tol in tols:
                rows = [r for r in results if r["library"] == library and r["method"] == method and r["tol"] == tol]
                scores = [r["error"] / tol for r in rows if "error" in r]
                outliers = [r["problem"] for r in rows if "error" in r and library == "neuralode"
                            and r["error"] > 10 * max(r["worst_scipy_error"], tol)]
                summary.append({
                    "method": method if library == "neuralode" else f"scipy {method}", "tol": tol,
                    "median": statistics.median(scores) if scores else None, "max": max(scores) if scores else None,
                    "failed": ", ".join(r["problem"] for r in rows if "failed" in r) or "-",
                    "nfe": sum(r.get("nfe", 0) for r in rows),
                    "outliers": ", ".join(outliers) or "-"})
    print(markdown_table(summary, [("method", "method", None), ("rtol = atol", "tol", "{:.0e}"),
                                   ("median error / tol", "median", "{:.2g}"), ("max error / tol", "max", "{:.3g}"),
                                   ("NFE, 24 problems", "nfe", "{}"), ("failed", "failed", None),
                                   ("> 10x worst scipy", "outliers", None)]))
    for r in results:
        if "failed" in r:
            print(f"failed: {r['method']} {r['problem']} tol {r['tol']:.0e}: {r['failed'][:160]}")
    path = write_json(args.json, {"tols": tols, "results": results, "summary": summary,
                                      "seconds": time.perf_counter() - start})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
