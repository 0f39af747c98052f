"""Forward-solve benchmark: neuralode against torchdiffeq and torchode, side by side in one process.

    python benchmarks/solvers.py            # full run (a few minutes), writes results/solvers.json
    python benchmarks/solvers.py --quick    # < 1 minute: fewer repeats, shorter spans

Problems (all dopri5 unless the row says otherwise; forward solves under torch.no_grad()):

P1  spiral dy/dt = (y**3) @ A, y0 = [[2, 0]], 1000 output times on [0, 25], rtol 1e-7, atol 1e-9, float64
P2  MLP field 64 -> 256 -> 256 -> 64 (tanh), batch 512, 10 output times on [0, 1], rtol 1e-5, atol 1e-6, float32
P3  MLP field 2 -> 16 -> 2 (tanh), batch 1, 10 output times on [0, 10], rtol 1e-6, atol 1e-7, float32
P4  Van der Pol mu = 10, y0 = [[2, 0]], 100 output times on [0, 20], rtol 1e-7, atol 1e-9, float64

Columns: wall time (median over interleaved repeats), NFE, steps (attempted), max |error| at the output
times against scipy's DOP853 at rtol = atol = 1e-12 (the torch field evaluated in float64), time per
step, and the overhead ratio wall / (NFE * t_f), where t_f is the time of one evaluation of the field
(no grad) on the initial state, measured as one more interleaved case (as many bare evaluations as
neuralode dopri5 takes) so that every repeat divides by a t_f taken under the same load; the column
is the median over repeats of the per-repeat ratios. 1.0 is the floor.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (MLP, Counted, Problem, Spiral, TorchodeSolver, VanDerPol, interleaved, markdown_table,  # noqa: E402
                     max_error, median, run_neuralode, run_torchdiffeq, scipy_reference, time_f, write_json)


def make_problems(quick: bool):
    problems = []
    f = Spiral(torch.float64)
    t_end = 5.0 if quick else 25.0
    problems.append(Problem("P1", Counted(f), f, torch.tensor([[2.0, 0.0]], dtype=torch.float64),
                            torch.linspace(0, t_end, 1000, dtype=torch.float64), 1e-7, 1e-9,
                            f"spiral, float64, 1000 outputs on [0, {t_end:g}], rtol 1e-7 atol 1e-9"))
    mlp = MLP(64, 256, layers=2, seed=0, dtype=torch.float32)
    mlp64 = MLP(64, 256, layers=2, seed=0, dtype=torch.float64)
    y0 = torch.randn(512, 64, generator=torch.Generator().manual_seed(1))
    problems.append(Problem("P2", Counted(mlp), mlp64, y0, torch.linspace(0, 1, 10), 1e-5, 1e-6,
                            "MLP 64-256-256-64 tanh, batch 512, float32, 10 outputs on [0, 1], rtol 1e-5 atol 1e-6"))
    tiny = MLP(2, 16, layers=1, seed=2, dtype=torch.float32)
    tiny64 = MLP(2, 16, layers=1, seed=2, dtype=torch.float64)
    t_end = 5.0 if quick else 10.0
    problems.append(Problem("P3", Counted(tiny), tiny64, torch.tensor([[1.0, -0.5]]), torch.linspace(0, t_end, 10),
                            1e-6, 1e-7, f"MLP 2-16-2 tanh, batch 1, float32, 10 outputs on [0, {t_end:g}], "
                            "rtol 1e-6 atol 1e-7"))
    vdp = VanDerPol(10.0)
    t_end = 5.0 if quick else 20.0
    problems.append(Problem("P4", Counted(vdp), vdp, torch.tensor([[2.0, 0.0]], dtype=torch.float64),
                            torch.linspace(0, t_end, 100, dtype=torch.float64), 1e-7, 1e-9,
                            f"Van der Pol mu=10, float64, 100 outputs on [0, {t_end:g}], rtol 1e-7 atol 1e-9"))
    return problems


def cases_for(p: Problem):
    f, y0, t, rtol, atol = p.f, p.y0, p.t, p.rtol, p.atol
    tode = TorchodeSolver(f, rtol, atol)
    return {
        "neuralode dopri5": lambda: run_neuralode(f, y0, t, rtol, atol, "dopri5"),
        "torchdiffeq dopri5": lambda: run_torchdiffeq(f, y0, t, rtol, atol, "dopri5"),
        "torchode dopri5": lambda: tode(y0, t),
        "neuralode tsit5": lambda: run_neuralode(f, y0, t, rtol, atol, "tsit5"),
        "neuralode dopri5 PI": lambda: run_neuralode(f, y0, t, rtol, atol, "dopri5", {"controller": "pi"}),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats and shorter spans (< 1 minute)")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    parser.add_argument("--problems", default="P1,P2,P3,P4")
    parser.add_argument("--no-work-precision", action="store_true", help="skip the NFE-vs-error sweep")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    repeats = args.repeats or (2 if args.quick else 7)
    wanted = set(args.problems.split(","))
    rows, summary, refs = [], {}, {}
    for p in make_problems(args.quick):
        if p.name not in wanted:
            continue
        ref = refs[p.name] = scipy_reference(p.f64, p.y0.double(), p.t.double())
        t_f_separate = time_f(p.f.f, p.t[0], p.y0, min_time=0.1 if args.quick else 1.0)
        cases = cases_for(p)
        with torch.no_grad():
            n_floor = cases["neuralode dopri5"]()[1]["nfe"]
        # The floor is timed inside the interleaved rounds too: n_floor bare evaluations of the field on
        # y0, so that each repeat's overhead ratio divides by a t_f measured under the same load.
        f_bare, t0_, y0_ = p.f.f, p.t[0], p.y0

        def floor(n=n_floor, f=f_bare, t=t0_, y=y0_):
            for _ in range(n):
                f(t, y)

        cases[FLOOR] = floor
        with torch.no_grad():
            results = interleaved(cases, repeats)
        floor_times = results.pop(FLOOR)[0]
        t_fs = [x / n_floor for x in floor_times]
        t_f = median(t_fs)
        prow = {}
        for name, (times, (ys, stats, _)) in results.items():
            wall = median(times)
            overheads = [w / (stats["nfe"] * tf) for w, tf in zip(times, t_fs)]
            row = {"problem": p.name, "library": name, "wall_ms": 1e3 * wall, "nfe": stats["nfe"],
                   "steps": stats["n_steps"], "error": max_error(ys, ref),
                   "us_per_step": 1e6 * wall / max(stats["n_steps"], 1),
                   "overhead": median(overheads), "overheads": overheads,
                   "overhead_separate_t_f": wall / (stats["nfe"] * t_f_separate),
                   "t_f_us": 1e6 * t_f, "t_f_separate_us": 1e6 * t_f_separate,
                   "times_ms": [1e3 * x for x in times]}
            rows.append(row)
            prow[name] = row
        base = prow["torchdiffeq dopri5"]
        for row in prow.values():
            row["time_vs_torchdiffeq"] = row["wall_ms"] / base["wall_ms"]
            row["step_time_vs_torchdiffeq"] = row["us_per_step"] / base["us_per_step"]
        summary[p.name] = p.description
        print(f"\n### {p.name}: {p.description}  (t_f = {1e6 * t_f:.1f} us interleaved, "
              f"{1e6 * t_f_separate:.1f} us separately; {repeats} repeats, "
              f"{torch.get_num_threads()} thread(s))\n")
        print(markdown_table(list(prow.values()), COLUMNS), flush=True)
    wp = work_precision(args.quick, refs) if not args.no_work_precision else []
    if wp:
        print("\n### Work-precision (NFE against max error, dopri5, same integral controller)\n")
        print(markdown_table(wp, WP_COLUMNS))
    targets = check_targets(rows)
    print("\n### Targets\n")
    for line in targets:
        print("- " + line)
    path = write_json("solvers_quick.json" if args.quick else "solvers.json",
                      {"repeats": repeats, "problems": summary, "rows": rows, "work_precision": wp,
                       "targets": targets})
    print(f"\nwrote {path}")


FLOOR = "field alone (floor)"

COLUMNS = [("library", "library", None), ("wall ms", "wall_ms", "{:.1f}"), ("vs tdq", "time_vs_torchdiffeq", "{:.2f}x"),
           ("NFE", "nfe", "{}"), ("steps", "steps", "{:g}"), ("max err", "error", "{:.2e}"),
           ("us/step", "us_per_step", "{:.0f}"), ("step vs tdq", "step_time_vs_torchdiffeq", "{:.2f}x"),
           ("overhead", "overhead", "{:.2f}")]


WP_COLUMNS = [("problem", "problem", None), ("rtol", "rtol", "{:.0e}"), ("library", "library", None),
              ("NFE", "nfe", "{}"), ("max err", "error", "{:.2e}")]


def work_precision(quick, refs=None):
    """NFE and error of neuralode and torchdiffeq dopri5 across tolerances (atol = rtol / 100) on P1 and P4.

    Not timed: it answers whether, at *equal error*, one library needs fewer evaluations than the other
    (the two dopri5 codes use different embedded error estimators, so equal tolerances are not equal
    accuracy).
    """
    rows = []
    problems = [p for p in make_problems(quick) if p.name in ("P1", "P4")]
    rtols = (1e-5,) if quick else (1e-4, 1e-5, 1e-6, 1e-7, 1e-8, 1e-9, 1e-10)
    for p in problems:
        ref = (refs or {}).get(p.name)
        if ref is None:
            ref = scipy_reference(p.f64, p.y0.double(), p.t.double())
        for rtol in rtols:
            with torch.no_grad():
                for lib, run in (("neuralode dopri5", run_neuralode), ("torchdiffeq dopri5", run_torchdiffeq)):
                    ys, st, _ = run(p.f, p.y0, p.t, rtol, rtol / 100, "dopri5")
                    rows.append({"problem": p.name, "rtol": rtol, "library": lib, "nfe": st["nfe"],
                                 "error": max_error(ys, ref)})
    return rows


def check_targets(rows):
    by = {(r["problem"], r["library"]): r for r in rows}
    out = []

    def get(p, lib):
        return by.get((p, lib))

    r = get("P2", "neuralode dopri5")
    if r:
        out.append(f"P2 overhead ratio <= 1.2: {r['overhead']:.2f} -> {'MET' if r['overhead'] <= 1.2 else 'MISSED'}")
    r, b = get("P3", "neuralode dopri5"), get("P3", "torchdiffeq dopri5")
    if r and b:
        ratio = r["us_per_step"] / b["us_per_step"]
        out.append(f"P3 time per step <= 0.5x torchdiffeq: {ratio:.2f}x -> {'MET' if ratio <= 0.5 else 'MISSED'}")
    for p in ("P1", "P2", "P4"):
        r, b = get(p, "neuralode dopri5"), get(p, "torchdiffeq dopri5")
        if r and b:
            ok = r["nfe"] <= b["nfe"] and r["error"] <= b["error"] * 1.0000001
            out.append(f"{p} NFE and error at least as good as torchdiffeq: NFE {r['nfe']} vs {b['nfe']}, "
                       f"error {r['error']:.2e} vs {b['error']:.2e} -> {'MET' if ok else 'MISSED'}")
    return out


if __name__ == "__main__":
    main()
