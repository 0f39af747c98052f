"""Gradients of a steady state: ImplicitAdjoint (implicit function theorem) against backpropagation and the adjoint.

A deep-equilibrium-style field f(t, y) = net(y + x) - y, net 64-128-64 (tanh), a batch of 256 inputs x, float32, solved
from y = 0 until neuralode.steady_state_event(rtol=1e-4, atol=1e-5) with dopri5 (rtol 1e-5, atol 1e-6); the loss is
the sum of squares of the steady state. Best of 3 (forward and backward), one thread, in one process; the gradient's
difference relative to direct backpropagation's (which differentiates the approach to the event state, while the
implicit function theorem differentiates the steady state itself: they differ by the event's residual).

``taskset -c 1 python benchmarks/steady_state.py`` (about 10 s) -> benchmarks/results/steady_state.json
"""
import json
import time
from pathlib import Path

import torch

import neuralode

torch.set_num_threads(1)


class Equilibrium(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.Tanh(), torch.nn.Linear(128, 64))
        self.register_buffer("x", torch.randn(256, 64))

    def forward(self, t, y):
        return self.net(y + self.x) - y


def main():
    field = Equilibrium()
    params = tuple(field.net.parameters())
    y0 = torch.zeros(256, 64)
    event = neuralode.steady_state_event(field, rtol=1e-4, atol=1e-5)
    span = torch.tensor([0.0, 100.0])
    strategies = {"direct": "direct", "adjoint": "adjoint", "interpolating adjoint": neuralode.Adjoint(interpolate=True),
                  "ImplicitAdjoint (batched)": neuralode.ImplicitAdjoint(linear_solver="batched"),
                  "ImplicitAdjoint (krylov)": neuralode.ImplicitAdjoint(linear_solver="krylov")}
    rows, reference = [], None
    for label, strategy in strategies.items():
        best = float("inf")
        for _ in range(3):
            start = time.perf_counter()
            sol = neuralode.solve(field, y0, span, events=[event], gradient=strategy, rtol=1e-5, atol=1e-6)
            grads = torch.autograd.grad(sol.event_y.pow(2).sum(), params)
            best = min(best, time.perf_counter() - start)
        flat = torch.cat([g.reshape(-1) for g in grads])
        reference = flat if reference is None else reference
        rows.append({"strategy": label, "seconds": best, "event_t": float(sol.event_t.detach()), "nfe": sol.stats["nfe"],
                     "nfe_backward": sol.stats.get("nfe_backward"),
                     "difference": float((flat - reference).norm() / reference.norm())})
    print("| strategy | forward + backward | nfe forward / backward | gradient vs direct |")
    print("|---|---|---|---|")
    for row in rows:
        backward = row["nfe_backward"] if row["nfe_backward"] is not None else "-"
        print(f"| {row['strategy']} | {row['seconds'] * 1e3:.0f} ms | {row['nfe']} / {backward} | "
              f"{row['difference']:.1e} |")
    out = Path(__file__).parent / "results" / "steady_state.json"
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"rows": rows, "torch": torch.__version__}, indent=1))
    tmp.replace(out)


if __name__ == "__main__":
    main()
