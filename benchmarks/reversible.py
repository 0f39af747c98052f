"""The reversible gradient against the other strategies: time of one gradient, evaluations, and accuracy.

    taskset -c 1 python benchmarks/reversible.py            # writes results/reversible.json
    taskset -c 1 python benchmarks/reversible.py --quick    # fewer repeats (a smoke test)

Problems, float64, loss = sum of squares of every output, one forward solve + ``backward()``: an MLP field
2 -> 64 -> 64 -> 2 (tanh), batch 64, t in [0, 5] with 10 output times; torchdiffeq's spiral (dy/dt = (y**3) @ A with
A learnable), batch 16 around (2, 0), t in [0, 25] with 10 output times. Strategies at rtol = 1e-6, atol = 1e-8:
tsit5 with direct backpropagation, checkpointing and the adjoint; ``ReversibleRungeKutta("tsit5")`` and
``"reversible_heun"`` with ``gradient="reversible"`` (and with ``"direct"``, the gradient they should equal), and
``ReversibleRungeKutta("tsit5", coupling=0.9)``.
Accuracy: relative max difference of the parameter gradient from a reference (dopri8, direct, rtol 1e-12).
Times are medians of interleaved repeats in one process, one thread.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import MLP, interleaved, markdown_table, median, write_json  # noqa: E402

import neuralode  # noqa: E402
from neuralode.solvers import ReversibleRungeKutta  # noqa: E402


class LearnableSpiral(torch.nn.Module):
    """torchdiffeq's ode_demo dynamics, dy/dt = (y**3) @ A, with A a parameter."""

    def __init__(self):
        super().__init__()
        self.A = torch.nn.Parameter(torch.tensor([[-0.1, 2.0], [-2.0, -0.1]], dtype=torch.float64))

    def forward(self, t, y):
        return (y ** 3) @ self.A


def problems():
    """name -> (field, y0, t)."""
    generator = torch.Generator().manual_seed(1)
    return {
        "mlp": (MLP(2, 64, layers=2, seed=0, dtype=torch.float64),
                torch.randn(64, 2, generator=generator, dtype=torch.float64), torch.linspace(0.0, 5.0, 11,
                                                                                             dtype=torch.float64)),
        "spiral": (LearnableSpiral(), torch.tensor([[2.0, 0.0]], dtype=torch.float64)
                   + 0.1 * torch.randn(16, 2, generator=generator, dtype=torch.float64),
                   torch.linspace(0.0, 25.0, 11, dtype=torch.float64)),
    }


def compare(field, y0, t, repeats):
    params = tuple(field.parameters())

    def gradient(method, strategy, rtol=1e-6, atol=1e-8):
        def run():
            sol = neuralode.solve(field, y0, t, method=method, rtol=rtol, atol=atol, gradient=strategy)
            grads = torch.autograd.grad(sol.ys.pow(2).sum(), params)
            return torch.cat([g.flatten() for g in grads]), sol.stats
        return run

    reference, _ = gradient("dopri8", "direct", 1e-12, 1e-14)()
    cases = {
        "tsit5 direct": gradient("tsit5", "direct"),
        "tsit5 checkpoint": gradient("tsit5", "checkpoint"),
        "tsit5 adjoint": gradient("tsit5", "adjoint"),
        "reversible tsit5, reversible": gradient(ReversibleRungeKutta("tsit5"), "reversible"),
        "reversible tsit5, direct": gradient(ReversibleRungeKutta("tsit5"), "direct"),
        "reversible tsit5 (coupling 0.9), reversible": gradient(ReversibleRungeKutta("tsit5", coupling=0.9),
                                                                "reversible"),
        "reversible_heun, reversible": gradient("reversible_heun", "reversible"),
    }
    results = interleaved(cases, repeats=repeats)
    base = median(results["tsit5 direct"][0])
    rows = []
    for name, (times, (grad, stats)) in results.items():
        rows.append({"case": name, "ms": 1e3 * median(times), "ratio": median(times) / base,
                     "n_steps": stats["n_steps"], "nfe": stats["nfe"], "nfe_backward": stats.get("nfe_backward"),
                     "error": float((grad - reference).abs().max() / reference.abs().max()),
                     "drift": stats.get("reversible_drift")})
    direct_of_reversible = results["reversible tsit5, direct"][1][0]
    reversible = results["reversible tsit5, reversible"][1][0]
    same = float((reversible - direct_of_reversible).abs().max() / direct_of_reversible.abs().max())
    return rows, same


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    payload = {}
    for name, (field, y0, t) in problems().items():
        rows, same = compare(field, y0, t, repeats=2 if args.quick else 5)
        print(f"\n### {name}\n")
        print(markdown_table(rows, [("case", "case", None), ("ms", "ms", "{:.1f}"),
                                    ("/ tsit5 direct", "ratio", "{:.2f}"), ("steps", "n_steps", None),
                                    ("nfe forward", "nfe", None), ("nfe backward", "nfe_backward", None),
                                    ("gradient error", "error", "{:.1e}"), ("drift (tol. units)", "drift", "{:.1e}")]))
        print(f"\nreversible tsit5: gradient='reversible' against 'direct' of the same steps: {same:.1e} relative")
        payload[name] = {"rows": rows, "reversible_vs_direct_same_steps": same}
    path = write_json("reversible_quick.json" if args.quick else "reversible.json", payload)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
