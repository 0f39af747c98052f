"""A stiff method's dense output and events with and without the check of each step's interpolant.

    python benchmarks/dense_check.py

Prothero-Robinson, ``y' = -1e5 (y - cos t) - sin t``, ``y(0) = 1`` (``y = cos t``) over [0, 10], float64, one
thread, rtol = atol. "dense": ``dense=True``, the worst error of ``Solution.evaluate`` at 401 points over the
tolerance; "events": the crossings of ``y = 0.3`` (three, at acos 0.3, 2 pi -+ acos 0.3) found and the worst
error of their times. "unchecked" passes ``options={"dense_error_control": False}``. Also the sign checks inside
a step for events (``Event.samples``): ``x = cos t`` crossing 0.995, seven times in [0, 20], at rtol 1e-3, and
their cost per step on a batch of 128 states through a 2-64-2 MLP (dopri5, rtol 1e-6; interleaved, median).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import interleaved, markdown_table, median, write_json  # noqa: E402

from neuralode import Event, solve  # noqa: E402

F64 = torch.float64
METHODS = ["radau5", "rodas5p", "kvaerno3", "kvaerno5", "auto"]


def prothero_robinson(t, y):
    return -1e5 * (y - torch.cos(t)) - torch.sin(t)


def dense_rows():
    y0, span, grid = torch.ones(1, dtype=F64), torch.tensor([0.0, 10.0], dtype=F64), torch.linspace(0, 10, 401,
                                                                                                       dtype=F64)
    crossings = [math.acos(0.3), 2 * math.pi - math.acos(0.3), 2 * math.pi + math.acos(0.3)]
    rows = []
    for rtol in (1e-4, 1e-7):
        for method in METHODS:
            row = {"rtol": rtol, "method": method}
            for label, checked in (("unchecked", False), ("checked", True)):
                options = {"dense_error_control": checked}
                sol = solve(prothero_robinson, y0, span, method=method, rtol=rtol, atol=rtol, dense=True,
                            options=options)
                row[f"{label}_dense_error"] = float((sol.evaluate(grid)[:, 0] - torch.cos(grid)).abs().max()) / rtol
                row[f"{label}_steps"], row[f"{label}_nfe"] = sol.stats["n_accepted"], sol.stats["nfe"]
                sol = solve(prothero_robinson, y0, span, method=method, rtol=rtol, atol=rtol, options=options,
                            events=[Event(lambda t, y: y[0] - 0.3)])
                found = [float(r.t) for r in sol.events]
                row[f"{label}_events"] = len(found)
                row[f"{label}_event_error"] = max(min(abs(x - c) for c in crossings) for x in found) if found else None
            rows.append(row)
            print(row, flush=True)
    return rows


def sample_rows():
    def oscillator(t, y):
        return torch.stack([y[1], -y[0]])

    level, rows = 0.995, []
    for method in ("dopri5", "tsit5", "radau5"):
        row = {"method": method}
        for samples in (0, 4, 10):
            sol = solve(oscillator, torch.tensor([1.0, 0.0], dtype=F64), torch.tensor([0.0, 20.0], dtype=F64),
                        method=method, rtol=1e-3, atol=1e-6, events=[Event(lambda t, y: y[0] - level, samples=samples)])
            row[f"found_{samples}"] = len(sol.events)
            row["steps"] = sol.stats["n_accepted"]
        rows.append(row)
        print(row, flush=True)
    return rows


def sample_cost(repeats=15):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(2, 64), torch.nn.Tanh(), torch.nn.Linear(64, 2))

    def field(t, y):
        return net(y) + torch.stack([y[..., 1], -y[..., 0]], -1)

    y0, span = torch.randn(128, 2), torch.tensor([0.0, 30.0])

    def case(samples):
        def run():
            with torch.no_grad():
                return solve(field, y0, span, method="dopri5", rtol=1e-6, atol=1e-8,
                             events=[Event(lambda t, y: y[..., 0].max() - 3.0, samples=samples)])
        return run

    timed = interleaved({samples: case(samples) for samples in (0, 4, 10)}, repeats)
    rows = []
    for samples, (times, sol) in timed.items():
        steps = sol.stats["n_steps"]
        rows.append({"samples": samples, "steps": steps, "us_per_step": median(times) / steps * 1e6})
    for row in rows:
        row["ratio"] = row["us_per_step"] / rows[0]["us_per_step"]
        print(row, flush=True)
    return rows


def main():
    torch.set_num_threads(1)
    dense = dense_rows()
    samples = sample_rows()
    cost = sample_cost()

    def fmt(x):
        return "-" if x is None else f"{x:.2g}"

    print(markdown_table(dense, [
        ("rtol", "rtol", "{:.0e}"), ("method", "method", "{}"),
        ("unchecked: dense error / tol", "unchecked_dense_error", "{:.3g}"), ("steps", "unchecked_steps", "{}"),
        ("nfe", "unchecked_nfe", "{}"), ("events found", "unchecked_events", "{}"),
        ("checked: dense error / tol", "checked_dense_error", "{:.3g}"), ("steps", "checked_steps", "{}"),
        ("nfe", "checked_nfe", "{}"), ("events found", "checked_events", "{}")]))
    for row in dense:
        print(row["rtol"], row["method"], "worst event time error: unchecked", fmt(row["unchecked_event_error"]),
              "checked", fmt(row["checked_event_error"]))
    print(markdown_table(samples, [("method", "method", "{}"), ("steps", "steps", "{}"),
                                   ("found, samples=0", "found_0", "{}"), ("samples=4", "found_4", "{}"),
                                   ("samples=10", "found_10", "{}")]))
    print(markdown_table(cost, [("samples", "samples", "{}"), ("steps", "steps", "{}"),
                                ("us per step", "us_per_step", "{:.0f}"), ("ratio", "ratio", "{:.2f}")]))
    print(write_json("dense_check.json", {"dense": dense, "samples": samples, "cost": cost}))


if __name__ == "__main__":
    main()
