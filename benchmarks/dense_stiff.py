"""Error at output times of stiff solves: interpolated between the steps against steps that land on them.

    python benchmarks/dense_stiff.py [--problems hires,robertson,vdp1000,oregonator] [--rtols 1e-4,1e-7]

Problems from ``stiff_problems.py`` over their literature spans, 121 output times (evenly spaced; Robertson:
t = 0 and 120 log-spaced from 1e-5 to 1e5), atol = rtol times the problem's scale. Error: the test set's mixed
error (``stiff_problems.mixed_error``) divided by rtol, the worst over every output, against radau5 at rtol 1e-12
with its steps on the outputs. "interpolated" passes ``options={"land_on_outputs": False, "dense_error_control":
False}``; "landing" is the default of the implicit, Rosenbrock and auto methods; "checked" interpolates with the
check of each step's interpolant (``land_on_outputs=False`` alone): the error of what a user reads between the
steps (outputs, ``Solution.evaluate``, events). One thread.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import stiff_problems as sp  # noqa: E402
from _common import markdown_table, write_json  # noqa: E402

import neuralode  # noqa: E402

F64 = torch.float64


def output_times(key, problem):
    t0, t1 = problem.t_span
    if key == "robertson":
        return torch.cat([torch.zeros(1, dtype=F64), torch.logspace(-5, np.log10(t1), 120, dtype=F64)])
    return torch.linspace(t0, t1, 121, dtype=F64)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--problems", default="hires,robertson,vdp1000,oregonator")
    parser.add_argument("--rtols", default="1e-4,1e-7")
    parser.add_argument("--methods", default="kvaerno5,radau5,rodas5p,auto")
    args = parser.parse_args()
    torch.set_num_threads(1)
    problems = sp.problem_set()
    rows = []
    for key in args.problems.split(","):
        problem = problems[key]
        t = output_times(key, problem)
        reference = neuralode.solve(problem.func, problem.y0, t, method="radau5", rtol=1e-12,
                                    atol=problem.atol_tensor(1e-12)).ys.numpy()
        for rtol in (float(r) for r in args.rtols.split(",")):
            for method in args.methods.split(","):
                row = {"problem": key, "rtol": rtol, "method": method}
                for label, land, checked in (("interpolated", False, False), ("landing", True, True),
                                             ("checked", False, True)):
                    sol = neuralode.solve(problem.func, problem.y0, t, method=method, rtol=rtol,
                                          atol=problem.atol_tensor(rtol),
                                          options={"land_on_outputs": land, "dense_error_control": checked})
                    ys = sol.ys.numpy()
                    row[f"{label}_error"] = max(sp.mixed_error(y, r, rtol, problem.atol(rtol))
                                                for y, r in zip(ys, reference)) / rtol
                    row[f"{label}_steps"] = sol.stats["n_accepted"]
                    row[f"{label}_nfe"] = sol.stats["nfe"]
                rows.append(row)
                print(row, flush=True)
    print(markdown_table(rows, [("problem", "problem", "{}"), ("rtol", "rtol", "{:.0e}"), ("method", "method", "{}"),
                                ("interpolated: error / tol", "interpolated_error", "{:.2f}"),
                                ("steps", "interpolated_steps", "{}"), ("nfe", "interpolated_nfe", "{}"),
                                ("landing: error / tol", "landing_error", "{:.2f}"),
                                ("steps", "landing_steps", "{}"), ("nfe", "landing_nfe", "{}"),
                                ("checked: error / tol", "checked_error", "{:.2f}"),
                                ("steps", "checked_steps", "{}"), ("nfe", "checked_nfe", "{}")]))
    print(write_json("dense_stiff.json", {"rows": rows}))


if __name__ == "__main__":
    main()
