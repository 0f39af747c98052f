"""The Krylov mode's Jacobian-vector products: the recorded double backward against torch.func.jvp.

    python benchmarks/krylov_products.py [--repeats 3] [--threads 1]

Part 1 times one product ``J v`` at a fixed point, three ways: ``f`` alone (for scale), ``torch.func.jvp``
(what ``Linearization`` did before 2026-11-28, and still does for complex states and fields it cannot
differentiate twice) and one backward pass through the recorded vector-Jacobian product (what it does now; the
record itself, one evaluation of ``f`` and one backward pass with ``create_graph`` plus a check against a central
difference, is timed apart). Part 2 solves with ``options={"jacobian": "krylov"}``, once with each route (the
old one forced by making the recorded route unavailable), interleaved in one process, and reports the median
time, the ratio and the counts; both routes must take the same steps.

Fields: a batch of 4 Robertson problems (12 states), a tanh MLP 32-64-32 on a batch of 16, the method-of-lines
heat equation (n = 400). Writes results/krylov_products.json.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import neuralode
from neuralode.solvers import linear

from _common import interleaved, markdown_table, write_json
import stiff_problems as sp


class TanhMLP(torch.nn.Module):
    """A small neural field, mildly stiff through its damping term (-10 y)."""

    def __init__(self, width=32, hidden=64):
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.w1 = torch.nn.Parameter(torch.randn(hidden, width, generator=generator, dtype=torch.float64) / 8)
        self.w2 = torch.nn.Parameter(torch.randn(width, hidden, generator=generator, dtype=torch.float64) / 8)

    def forward(self, t, y):
        return torch.tanh(y @ self.w1.T) @ self.w2.T - 10.0 * y


def _cases():
    k = sp.sample_rate_constants(4, seed=1)
    robertson = sp.robertson_batch(k, t_end=10.0)
    heat = sp.heat(400, t_end=0.1)
    mlp = TanhMLP()
    y_mlp = torch.randn(16, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    return [
        ("Robertson x4", robertson.func, robertson.y0, torch.tensor([0.0, 1.0, 10.0], dtype=torch.float64),
         dict(rtol=1e-7, atol=1e-11), ("kvaerno5", "radau5", "rodas5p")),
        ("MLP 32-64-32, batch 16", mlp, y_mlp, torch.tensor([0.0, 1.0], dtype=torch.float64),
         dict(rtol=1e-6, atol=1e-9), ("kvaerno5", "rodas5p")),
        ("heat n=400", heat.func, heat.y0, torch.tensor([0.0, 0.1], dtype=torch.float64),
         dict(rtol=1e-6, atol=1e-9), ("kvaerno5",)),
    ]


def _per_call(fn, calls=200):
    fn()
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - t0) / calls)
    return statistics.median(times)


def products(name, func, y0):
    y = y0.clone() + 0.01
    v = torch.randn(y.shape, dtype=y.dtype, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        f_alone = _per_call(lambda: func(0.3, y))
        forward = _per_call(lambda: torch.func.jvp(lambda x: func(0.3, x), (y,), (v,))[1])
        record = _per_call(lambda: linear.Linearization(func, 0.3, y)(v), calls=50)
        linearization = linear.Linearization(func, 0.3, y)
        linearization(v)
        assert linearization._how == "reverse", linearization._how
        reverse = _per_call(lambda: linearization(v))
    return {"field": name, "f_us": f_alone * 1e6, "jvp_us": forward * 1e6, "recorded_us": reverse * 1e6,
            "record_us": record * 1e6, "speedup": forward / reverse}


def _solve(func, y0, t, method, tolerances, route):
    original = linear.Linearization._reverse_product

    def unavailable(self, v):
        raise RuntimeError("forced: the forward-mode route")

    if route == "torch.func.jvp":
        linear.Linearization._reverse_product = unavailable
    try:
        return neuralode.solve(func, y0, t, method=method, options={"jacobian": "krylov"}, **tolerances)
    finally:
        linear.Linearization._reverse_product = original


def solves(name, func, y0, t, tolerances, methods, repeats):
    rows = []
    for method in methods:
        cases = {route: (lambda route=route: _solve(func, y0, t, method, tolerances, route))
                 for route in ("torch.func.jvp", "recorded")}
        results = interleaved(cases, repeats)
        (old_times, old), (new_times, new) = results["torch.func.jvp"], results["recorded"]
        assert old.stats["n_steps"] == new.stats["n_steps"], (old.stats, new.stats)
        rows.append({"field": name, "method": method, "steps": new.stats["n_steps"], "n_jvp": new.stats["n_jvp"],
                     "nfe_old": old.stats["nfe"], "nfe_new": new.stats["nfe"],
                     "old_s": statistics.median(old_times), "new_s": statistics.median(new_times),
                     "ratio": statistics.median(new_times) / statistics.median(old_times),
                     "max_diff": float((old.ys - new.ys).detach().abs().max())})
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    product_rows, solve_rows = [], []
    for name, func, y0, t, tolerances, methods in _cases():
        product_rows.append(products(name, func, y0))
        solve_rows += solves(name, func, y0, t, tolerances, methods, args.repeats)
    print(markdown_table(product_rows, [("field", "field", None), ("f alone (us)", "f_us", "{:.0f}"),
                                        ("torch.func.jvp (us)", "jvp_us", "{:.0f}"),
                                        ("recorded product (us)", "recorded_us", "{:.0f}"),
                                        ("record + check (us)", "record_us", "{:.0f}"),
                                        ("jvp / recorded", "speedup", "{:.1f}x")]))
    print()
    print(markdown_table(solve_rows, [("field", "field", None), ("method", "method", None),
                                      ("steps", "steps", None), ("products", "n_jvp", None),
                                      ("nfe, jvp route", "nfe_old", None), ("nfe, recorded", "nfe_new", None),
                                      ("jvp route (s)", "old_s", "{:.3f}"), ("recorded (s)", "new_s", "{:.3f}"),
                                      ("time ratio", "ratio", "{:.2f}"), ("max |diff|", "max_diff", "{:.1e}")]))
    path = write_json("krylov_products.json", {"products": product_rows, "solves": solve_rows,
                                               "repeats": args.repeats, "threads": args.threads})
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
