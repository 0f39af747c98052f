"""Backward-pass cost of the adjoint: evaluations and time per gradient against the forward pass.

    python benchmarks/adjoint_backward.py

Cases (one CPU thread, float32 MLP / float64 spiral): the P2 MLP field 64-256-256-64 (tanh), batch 512,
dopri5, rtol = atol = 1e-5, 10 output times, loss on every output; the spiral demo dy/dt = (y**3) @ A
with 1000 output times (rtol 1e-7, atol 1e-9). Prints forward and backward NFE, their ratio and the
best of three gradient times. See docs/benchmarks.md for the figures before the one-solve backward pass.

    python benchmarks/adjoint_backward.py --backward-methods dopri5,tsit5,bosh3

compares the method of the backward solve (``Adjoint(method=...)``; the forward solve stays dopri5) in
float64 on the same cases plus torchdiffeq's ode_demo step (20 windows of 10 times, a 2-50-2 MLP of y**3):
backward NFE, the gradient's largest relative error against a dopri8 ``direct`` gradient at rtol = atol =
1e-12, and the best of three gradient times.
"""

from __future__ import annotations

import argparse
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


def _gradient(func, params, y0, t, gradient, **kwargs):
    for p in params:
        p.grad = None
    extra = {} if gradient == "direct" else {"adjoint_params": params}
    sol = neuralode.solve(func, y0, t, gradient=gradient, **extra, **kwargs)
    sol.ys.pow(2).mean().backward()
    return [p.grad.clone() for p in params], sol.stats


def compare_backward_methods(name, func, params, y0, t, rtol, atol, methods):
    reference, _ = _gradient(func, params, y0, t, "direct", method="dopri8", rtol=1e-12, atol=1e-12)
    for method in methods:
        best = float("inf")
        for _ in range(3):
            start = time.perf_counter()
            grads, stats = _gradient(func, params, y0, t, neuralode.Adjoint(method=method), method="dopri5",
                                     rtol=rtol, atol=atol)
            best = min(best, time.perf_counter() - start)
        error = max(((g - r).abs().max() / r.abs().max()).item() for g, r in zip(grads, reference))
        print(f"{name:28s} backward {method:7s} forward NFE {stats['nfe']:5d}  backward NFE "
              f"{stats['nfe_backward']:5d}  ratio {stats['nfe_backward'] / stats['nfe']:4.2f}  "
              f"gradient error {error:.1e}  {best * 1e3:7.1f} ms")


def backward_methods(methods):
    torch.set_num_threads(1)
    torch.manual_seed(0)
    f64 = torch.float64
    net = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.Tanh(), torch.nn.Linear(256, 256), torch.nn.Tanh(),
                              torch.nn.Linear(256, 64)).double()
    compare_backward_methods("P2 MLP, 10 outputs", lambda t, y: net(y), tuple(net.parameters()),
                             torch.randn(512, 64, dtype=f64), torch.linspace(0, 1, 10, dtype=f64), 1e-5, 1e-5, methods)
    A = torch.tensor([[-0.1, 2.0], [-2.0, -0.1]], dtype=f64, requires_grad=True)
    times = torch.linspace(0, 25, 1000, dtype=f64)
    compare_backward_methods("spiral demo, 1000 outputs", lambda t, y: (y ** 3) @ A, (A,),
                             torch.tensor([[2.0, 0.0]], dtype=f64), times, 1e-7, 1e-9, methods)
    with torch.no_grad():
        true_y = neuralode.solve(lambda t, y: (y ** 3) @ A, torch.tensor([[2.0, 0.0]], dtype=f64), times).ys
    starts = torch.randint(0, 990, (20,))
    mlp = torch.nn.Sequential(torch.nn.Linear(2, 50), torch.nn.Tanh(), torch.nn.Linear(50, 2)).double()
    compare_backward_methods("ode_demo step, 20 x 10 times", lambda t, y: mlp(y ** 3), tuple(mlp.parameters()),
                             true_y[starts], times[:10], 1e-7, 1e-9, methods)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backward-methods", default="",
                        help="comma-separated methods for the backward solve (float64 comparison; see above)")
    args = parser.parse_args()
    if args.backward_methods:
        backward_methods(args.backward_methods.split(","))
        return
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
