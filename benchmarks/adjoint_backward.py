"""Backward-pass cost of the adjoint: evaluations and time per gradient against the forward pass.

    python benchmarks/adjoint_backward.py

Cases (one CPU thread, float32 MLP / float64 spiral): the P2 MLP field 64-256-256-64 (tanh), batch 512,
dopri5, rtol = atol = 1e-5, 10 output times, loss on every output; the spiral demo dy/dt = (y**3) @ A
with 1000 output times (rtol 1e-7, atol 1e-9). Prints forward and backward NFE, their ratio and the
best of three gradient times. See docs/benchmarks.md for the figures before the one-solve backward pass.
"""

from __future__ import annotations

import time

import torch

import neuralode


def run(name, func, params, y0, t, **kwargs):
    best, sol = float("inf"), None
    for _ in range(3):
        start = time.perf_counter()
        sol = neuralode.solve(func, y0, t, gradient="adjoint", adjoint_params=params, **kwargs)
        sol.ys.pow(2).mean().backward()
        best = min(best, time.perf_counter() - start)
    forward, backward = sol.stats["nfe"], sol.stats["nfe_backward"]
    print(f"{name:28s} forward NFE {forward:5d}  backward NFE {backward:5d}  ratio {backward / forward:4.2f}  "
          f"gradient {best * 1e3:7.1f} ms")


def main():
    torch.set_num_threads(1)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.Tanh(), torch.nn.Linear(256, 256), torch.nn.Tanh(),
                              torch.nn.Linear(256, 64))
    run("P2 MLP, 10 outputs", lambda t, y: net(y), tuple(net.parameters()), torch.randn(512, 64),
        torch.linspace(0, 1, 10), method="dopri5", rtol=1e-5, atol=1e-5)
    A = torch.tensor([[-0.1, 2.0], [-2.0, -0.1]], requires_grad=True)
    run("spiral demo, 1000 outputs", lambda t, y: (y ** 3) @ A, (A,), torch.tensor([[2.0, 0.0]]),
        torch.linspace(0, 25, 1000), method="dopri5", rtol=1e-7, atol=1e-9)


if __name__ == "__main__":
    main()
