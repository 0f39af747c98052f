"""Peak memory of one gradient against the number of steps: direct, checkpoint, adjoint, reversible.

    python benchmarks/memory.py            # 10, 100, 1000 steps; writes results/memory.json and memory.png
    python benchmarks/memory.py --quick    # 10 and 40 steps, batch 64 (< 1 minute, a smoke test)
    python benchmarks/memory.py --strategies reversible   # some strategies only: results/memory_reversible.json

Problem: MLP 64 -> 256 -> 256 -> 64 (tanh), batch 512, float32, fixed-step rk4 on t = [0, 1] with
step_size = 1 / steps, loss = sum of squares of y(1); one forward solve + ``backward()``. ``reversible`` runs
``ReversibleRungeKutta("rk4")`` (two rk4 steps a step) with ``gradient="reversible"``.

Method: every (strategy, steps) case runs in a FRESH Python process. The child builds the model and
state, runs one tiny warm-up gradient (2 steps, so that one-off allocations such as thread pools and
autograd's engine do not count), then resets the kernel's peak-RSS counter by writing ``5`` to
``/proc/self/clear_refs``, reads the current RSS (``VmRSS``) as the baseline, runs the measured
gradient and reads ``VmHWM`` (peak resident set since the reset). We report ``VmHWM - baseline``:
the extra resident memory the gradient needed at its peak, which is what an out-of-memory kill sees.
Children run with ``MALLOC_MMAP_THRESHOLD_=131072`` so that RSS follows live tensors (see ``main``);
cases run two at a time (``--jobs``), which does not change per-process RSS. ``--quick`` (a smoke test)
runs one process per strategy, measuring its step counts in turn (the peak counter is reset before
each).
(tracemalloc does not see torch's allocations; torch keeps no CPU allocator statistics.) The state
itself is 512 x 64 x 4 B = 128 KiB; one evaluation's saved activations are about 1.2 MiB.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, markdown_table, write_json  # noqa: E402


STRATEGIES = ("direct", "checkpoint", "adjoint", "reversible")


def _status_kib(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def child(strategy, steps, batch, threads):
    import time

    import torch

    import neuralode
    from _common import MLP
    torch.set_num_threads(threads)
    f = MLP(64, 256, layers=2, seed=0, dtype=torch.float32)
    y0 = torch.randn(batch, 64, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([0.0, 1.0])

    def gradient(n):
        for p in f.parameters():
            p.grad = None
        y = y0.detach().requires_grad_(True)
        method = neuralode.solvers.ReversibleRungeKutta("rk4") if strategy == "reversible" else "rk4"
        sol = neuralode.solve(f, y, t, method=method, options={"step_size": 1.0 / n}, gradient=strategy)
        sol.ys[-1].pow(2).sum().backward()
        return sol

    gradient(2)
    for n in steps:  # one step count per process in the full run; --quick runs its few in one process
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        baseline = _status_kib("VmRSS")
        t0 = time.perf_counter()
        sol = gradient(n)
        wall = time.perf_counter() - t0
        peak = _status_kib("VmHWM")
        print(json.dumps({"strategy": strategy, "steps": n, "batch": batch, "baseline_mib": baseline / 1024,
                          "peak_mib": peak / 1024, "delta_mib": (peak - baseline) / 1024, "wall_s": wall,
                          "n_steps": sol.stats["n_steps"], "nfe_backward": sol.stats.get("nfe_backward")}),
              flush=True)
        del sol


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--jobs", type=int, default=None,
                        help="cases run at once, each in its own process (default 2; 3 with --quick)")
    parser.add_argument("--batch", type=int, default=512, help="batch of the full run (default 512)")
    parser.add_argument("--steps", default=None, help="comma-separated step counts (default 10,100,1000)")
    parser.add_argument("--strategies", default=",".join(STRATEGIES),
                        help=f"comma-separated strategies (default {','.join(STRATEGIES)})")
    parser.add_argument("--child", nargs=3, metavar=("STRATEGY", "STEPS", "BATCH"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.child[0], [int(x) for x in args.child[1].split(",")], int(args.child[2]), args.threads)
        return
    steps_list = (10, 40) if args.quick else (10, 100, 1000)
    if args.steps:
        steps_list = tuple(int(x) for x in args.steps.split(","))
    batch = 64 if args.quick else args.batch
    # A fixed mmap threshold: every tensor >= 128 KiB gets its own mapping, returned to the OS when freed,
    # so RSS follows the live tensors. (With glibc's default *dynamic* threshold, freed large blocks raise
    # the threshold and later tensors come from the heap, whose fragmentation then grows RSS with the
    # number of steps even when live memory does not.)
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")

    def one(case):
        strategy, steps = case
        out = subprocess.run([sys.executable, __file__, "--threads", str(args.threads), "--child", strategy,
                              ",".join(map(str, steps)), str(batch)], capture_output=True, text=True, env=env)
        rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
        for row in rows:
            print(f"{strategy:10s} {row['steps']:5d} steps: +{row['delta_mib']:.1f} MiB peak, {row['wall_s']:.1f} s",
                  flush=True)
        if out.returncode != 0:
            print(out.stderr[-2000:], file=sys.stderr)
            done = {r["steps"] for r in rows}
            rows += [{"strategy": strategy, "steps": n, "batch": batch, "error": out.returncode}
                     for n in steps if n not in done]
        return rows

    strategies = tuple(args.strategies.split(","))
    if args.quick:
        # smoke test: one process per strategy running all its step counts (importing torch costs
        # several seconds per process on a loaded machine); the full run uses one process per case
        cases = [(strategy, steps_list) for strategy in strategies]
    else:
        cases = [(strategy, (steps,)) for steps in steps_list for strategy in strategies]
    jobs = args.jobs or (3 if args.quick else 2)
    with ThreadPoolExecutor(max_workers=jobs) as pool:  # processes are independent: RSS is per process
        rows = [row for rs in pool.map(one, cases) for row in rs]
    table = []
    for strategy in strategies:
        r = {"strategy": strategy}
        for row in rows:
            if row["strategy"] == strategy and "delta_mib" in row:
                r[f"s{row['steps']}"] = row["delta_mib"]
        table.append(r)
    columns = [("strategy", "strategy", None)] + [(f"{s} steps (MiB)", f"s{s}", "{:.1f}") for s in steps_list]
    print(f"\n### Peak extra RSS of one gradient, rk4, batch {batch}\n")
    print(markdown_table(table, columns))
    targets = []
    by = {(r["strategy"], r["steps"]): r.get("delta_mib") for r in rows}
    lo, hi = steps_list[0], steps_list[-1]
    a_lo, a_hi = by.get(("adjoint", lo)), by.get(("adjoint", hi))
    if a_lo and a_hi:
        targets.append(f"adjoint flat ({hi} steps within 1.1x of {lo}): {a_hi / a_lo:.2f}x -> "
                       f"{'MET' if a_hi <= 1.1 * a_lo else 'MISSED'}")
    for s in ("checkpoint", "direct", "reversible"):
        v_lo, v_hi = by.get((s, lo)), by.get((s, hi))
        if v_lo and v_hi:
            targets.append(f"{s}: {hi} steps / {lo} steps = {v_hi / v_lo:.1f}x (steps ratio {hi // lo}x)")
    print("\n### Targets\n")
    for line in targets:
        print("- " + line)
    name = "memory_quick" if args.quick else "memory"
    if set(strategies) != set(STRATEGIES):
        name += "_" + "_".join(strategies)
    plot(rows, steps_list, batch, RESULTS / f"{name}.png")
    path = write_json(f"{name}.json", {"rows": rows, "targets": targets, "method": "VmHWM - VmRSS baseline, "
                                       "fresh process per case, after clear_refs=5"})
    print(f"\nwrote {path} and {RESULTS / (name + '.png')}")


def plot(rows, steps_list, batch, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    RESULTS.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(5, 4))
    labels = {"direct": "direct backprop, O(L)", "checkpoint": "checkpoint, O(sqrt L)", "adjoint": "adjoint, O(1)",
              "reversible": "reversible rk4, O(1)"}
    for strategy in STRATEGIES:
        pts = [(r["steps"], r["delta_mib"]) for r in rows if r["strategy"] == strategy and "delta_mib" in r]
        if pts:
            ax.plot(*zip(*pts), "o-", label=labels[strategy])
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("rk4 steps L")
    ax.set_ylabel("peak extra RSS of one gradient (MiB)")
    ax.set_title(f"MLP 64-256-256-64, batch {batch}, float32", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
