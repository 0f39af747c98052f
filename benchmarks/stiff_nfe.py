"""Evaluations, steps, Newton iterations and error of the implicit methods on the stiff set, per tolerance.

    python benchmarks/stiff_nfe.py                       # radau5, kvaerno5, kvaerno3 at rtol 1e-4 and 1e-7
    python benchmarks/stiff_nfe.py --methods radau5 --rtols 1e-6

Problems from ``stiff_problems.py`` over their full spans (Robertson to 1e5, Van der Pol mu = 1000 on
[0, 3000], VDPOL mu = 1e6, HIRES, OREGO), float64, ``atol = rtol * atol_scale``. The error is the test set's
mixed error at the end against scipy's Radau at rtol 1e-12, over rtol (1 = the tolerance met exactly). A
quick way to see what a change of the Newton iteration or the controller costs: run it before and after.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import stiff_problems as sp  # noqa: E402

import neuralode  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="radau5,kvaerno5,kvaerno3")
    parser.add_argument("--rtols", default="1e-4,1e-7")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print("| problem | method | rtol | NFE | steps | Newton iterations | error / rtol | time |")
    print("|---|---|---|---|---|---|---|---|")
    for problem in (sp.robertson(), sp.van_der_pol(), sp.vdpol(), sp.hires(), sp.oregonator()):
        span = torch.tensor(problem.t_span, dtype=torch.float64)
        reference = sp.scipy_reference(problem, [problem.t_span[1]], rtol=1e-12)[-1]
        for method in args.methods.split(","):
            for rtol in (float(x) for x in args.rtols.split(",")):
                atol = rtol * np.asarray(problem.atol_scale)
                start = time.perf_counter()
                sol = neuralode.solve(problem.func, problem.y0, span, method=method, rtol=rtol,
                                      atol=torch.as_tensor(atol), options={"max_num_steps": 200_000})
                seconds = time.perf_counter() - start
                error = sp.mixed_error(sol.ys[-1].numpy(), reference, rtol, atol) / rtol
                stats = sol.stats
                print(f"| {problem.name} | {method} | {rtol:.0e} | {stats['nfe']} | {stats['n_steps']} | "
                      f"{stats.get('n_newton_iters', 0)} | {error:.3g} | {seconds:.2f} s |", flush=True)


if __name__ == "__main__":
    main()
