"""ReversibleRungeKutta's coupling: forward steps against the reversal's accuracy (docs/solvers.md, "Reversible
methods").

For an oscillator on [0, 300] and torchdiffeq's spiral (dy/dt = (y**3) @ A) on [0, 25], tsit5 as the base, rtol 1e-6,
atol 1e-8, float64, 10 outputs, loss = sum of squares of the outputs: the steps, the largest relative difference of
the parameter gradient under gradient="reversible" from backpropagation through the same steps, and the rebuilt
states' drift in tolerance units. ``python benchmarks/reversible_coupling.py`` (about a minute).
"""

import warnings

import torch

import neuralode
from neuralode.solvers import ReversibleRungeKutta


def main():
    torch.set_num_threads(1)
    f64 = torch.float64
    frequency = torch.tensor(1.0, dtype=f64, requires_grad=True)
    matrix = torch.tensor([[-0.1, 2.0], [-2.0, -0.1]], dtype=f64, requires_grad=True)
    problems = {
        "oscillator": (lambda t, y: torch.stack([y[1], -frequency * y[0]]), torch.tensor([1.0, 0.0], dtype=f64),
                       300.0, frequency),
        "spiral": (lambda t, y: (y ** 3) @ matrix, torch.tensor([[2.0, 0.0]], dtype=f64), 25.0, matrix),
    }
    for name, (field, y0, end, parameter) in problems.items():
        t = torch.linspace(0.0, end, 11, dtype=f64)
        alone = neuralode.solve(field, y0, t, method="tsit5", rtol=1e-6, atol=1e-8).stats["n_steps"]
        print(f"{name}: tsit5 alone {alone} steps")
        for coupling in (0.999, 0.99, 0.9):
            grads = []
            for gradient in ("direct", "reversible"):
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    sol = neuralode.solve(field, y0, t, method=ReversibleRungeKutta("tsit5", coupling), rtol=1e-6,
                                          atol=1e-8, gradient=gradient, adjoint_params=(parameter,))
                    grads.append(torch.autograd.grad(sol.ys.pow(2).sum(), parameter)[0])
            difference = float((grads[0] - grads[1]).abs().max() / grads[0].abs().max())
            print(f"  coupling {coupling}: {sol.stats['n_steps']} steps, gradient {difference:.1e} from "
                  f"backpropagation, drift {sol.stats['reversible_drift']:.1e} tolerances"
                  + (" (warned)" if caught else ""))


if __name__ == "__main__":
    main()
