"""IMEX (kencarp4/5 on a SplitField) against fully implicit, Rosenbrock and explicit methods on the whole field.

Case 1, a neural reaction-diffusion system (the setting IMEX is for): u_t = D u_xx + r_theta(u) on 128 interior points
of [0, 1] (Dirichlet), D = 0.1, so the diffusion's stiffness is about 4 D / dx^2 = 6.5e3; r_theta is a pointwise MLP
1-32-32-1 (tanh), a batch of 8 initial conditions, t in [0, 1], rtol 1e-5, atol 1e-7, float64, the batched Jacobian
(one 128 x 128 block a sample). The IMEX methods put the diffusion in the implicit term and the network in the
explicit one; every other method solves the sum. Error: against rodas5p at rtol 1e-10.

Case 2, where the split matters: y' = cos t - 0.05 sin y - 1e4 (y - sin t), the forcing cos t in the explicit term or
in the implicit one (kvaerno4 on the whole field for reference). A stiff term relaxing towards a state that the
explicit term moves is the IMEX methods' weak spot (their explicit weights leave y1 off the slow manifold by O(h^2)).

Case 3, gradients with respect to the network's parameters (32 points, a batch of 4): direct backpropagation and
the interpolating adjoint, whose backward solve steps with the forward method (an IMEX one on the augmented terms).

Wall times are medians of 3 runs in one process, one thread; ratios are to kencarp4's time in the same run.
``taskset -c 1 python benchmarks/imex.py`` (about two minutes) -> benchmarks/results/imex.json
"""
import json
import math
import time
from pathlib import Path

import torch

import neuralode

torch.set_num_threads(1)
D = torch.float64
N, BATCH, DIFFUSION = 128, 8, 0.1


class Reaction(torch.nn.Module):
    """A pointwise network r(u): (batch, N) -> (batch, N)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(1, 32), torch.nn.Tanh(), torch.nn.Linear(32, 32),
                                       torch.nn.Tanh(), torch.nn.Linear(32, 1)).double()

    def forward(self, t, u):
        return self.net(u.unsqueeze(-1)).squeeze(-1)


class Diffusion(torch.nn.Module):
    """D u_xx with zero Dirichlet values outside the grid (second differences)."""

    def forward(self, t, u):
        dx = 1.0 / (u.shape[-1] + 1)
        padded = torch.nn.functional.pad(u, (1, 1))
        return DIFFUSION * (padded[:, 2:] - 2 * u + padded[:, :-2]) / dx ** 2


def timed(run, repeats=3):
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = run()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2], result


def case_reaction_diffusion():
    reaction, diffusion = Reaction(), Diffusion()
    x = torch.linspace(0, 1, N + 2, dtype=D)[1:-1]
    u0 = torch.stack([torch.sin(math.pi * x) * (0.5 + 0.1 * k) + 0.2 * torch.exp(-200 * (x - 0.3 - 0.04 * k) ** 2)
                      for k in range(BATCH)])
    t = torch.linspace(0, 1, 5, dtype=D)
    split = neuralode.SplitField(explicit=reaction, implicit=diffusion)

    def whole(t, u):
        return reaction(t, u) + diffusion(t, u)
    options = {"jacobian": "batched"}
    with torch.no_grad():
        reference = neuralode.solve(whole, u0, t, method="rodas5p", rtol=1e-10, atol=1e-12, options=options).ys
    rows = []
    for method in ("kencarp4", "kencarp5", "kvaerno4", "kvaerno5", "rodas5p", "tsit5", "dopri5"):
        field = split if method.startswith("kencarp") else whole
        settings = options if not method in ("tsit5", "dopri5") else None

        def run():
            with torch.no_grad():
                return neuralode.solve(field, u0, t, method=method, rtol=1e-5, atol=1e-7, options=settings)
        seconds, sol = timed(run)
        stats = sol.stats
        rows.append({"method": method, "seconds": seconds, "accepted": stats["n_accepted"],
                     "rejected": stats["n_rejected"], "nfe": stats["nfe"],
                     "nfe_explicit": stats.get("nfe_explicit"), "nfe_implicit": stats.get("nfe_implicit"),
                     "jacobians": stats.get("n_jacobians"), "error": float((sol.ys - reference).abs().max())})
    base = rows[0]["seconds"]
    print(f"1. reaction-diffusion, network reaction, {BATCH} x {N}, rtol 1e-5 (ratios to kencarp4's time)")
    print("| method | field | time | ratio | accepted / rejected | nfe (explicit / implicit) | Jacobians | error |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        row["ratio"] = row["seconds"] / base
        split_nfe = (f" ({row['nfe_explicit']} / {row['nfe_implicit']})" if row["nfe_explicit"] is not None else "")
        field = "SplitField" if row["method"].startswith("kencarp") else "whole"
        print(f"| {row['method']} | {field} | {row['seconds'] * 1e3:.0f} ms | {row['ratio']:.2f} | {row['accepted']} / "
              f"{row['rejected']} | {row['nfe']}{split_nfe} | {row['jacobians'] if row['jacobians'] is not None else '-'}"
              f" | {row['error']:.1e} |")
    return rows


def case_forcing():
    rate = 1e4
    y0 = torch.tensor([0.0, 0.3], dtype=D)
    t = torch.linspace(0, 2, 5, dtype=D)
    fields = {
        "forcing explicit": neuralode.SplitField(explicit=lambda t, y: torch.cos(t) - 0.05 * torch.sin(y),
                                                 implicit=lambda t, y: -rate * (y - torch.sin(t))),
        "forcing implicit": neuralode.SplitField(explicit=lambda t, y: -0.05 * torch.sin(y),
                                                 implicit=lambda t, y: torch.cos(t) - rate * (y - torch.sin(t))),
    }
    whole = fields["forcing explicit"]
    reference = neuralode.solve(whole, y0, t, method="kvaerno5", rtol=1e-12, atol=1e-14).ys
    rows = []
    for label, field, method in [(label, field, method) for label, field in fields.items()
                                 for method in ("kencarp4", "kencarp5")] + [("whole field", whole, "kvaerno4"),
                                                                              ("whole field", whole, "kvaerno5")]:
        run_field = field if method.startswith("kencarp") else (lambda t, y, f=field: f(t, y))
        sol = neuralode.solve(run_field, y0, t, method=method, rtol=1e-6, atol=1e-8)
        rows.append({"split": label, "method": method, "accepted": sol.stats["n_accepted"],
                     "rejected": sol.stats["n_rejected"], "error": float((sol.ys - reference).abs().max())})
    print("\n2. y' = cos t - 0.05 sin y - 1e4 (y - sin t), rtol 1e-6, atol 1e-8")
    print("| split | method | accepted / rejected | error |")
    print("|---|---|---|---|")
    for row in rows:
        print(f"| {row['split']} | {row['method']} | {row['accepted']} / {row['rejected']} | {row['error']:.1e} |")
    return rows


def case_gradients(n=32, batch=4):
    """The gradient of the outputs' sum of squares with respect to the network's parameters, on a smaller grid (the
    backward solve's Newton systems hold the parameter adjoints too). The backsolve adjoint (y rebuilt backwards) is
    left out: diffusion is unstable backwards in time, and it warns and is far off there for every method."""
    reaction, diffusion = Reaction(), Diffusion()
    grid = torch.linspace(0, 1, n + 2, dtype=D)[1:-1]
    u0 = torch.stack([torch.sin(math.pi * grid) * (0.5 + 0.1 * k) for k in range(batch)])
    t = torch.linspace(0, 1, 5, dtype=D)
    split = neuralode.SplitField(explicit=reaction, implicit=diffusion)

    def whole(t, u):
        return reaction(t, u) + diffusion(t, u)
    params = tuple(reaction.parameters())
    options = {"jacobian": "batched"}

    def gradient(method, field, strategy, rtol):
        sol = neuralode.solve(field, u0, t, method=method, rtol=rtol, atol=rtol * 1e-2, gradient=strategy,
                              adjoint_params=params, options=options)
        grads = torch.autograd.grad(sol.ys.pow(2).sum(), params)
        return torch.cat([g.reshape(-1) for g in grads]), sol.stats
    reference, _ = gradient("kvaerno5", whole, "direct", 1e-10)
    rows = []
    for method in ("kencarp4", "kvaerno4", "kvaerno5"):
        field = split if method.startswith("kencarp") else whole
        for label, strategy in (("direct", "direct"), ("interpolating adjoint", neuralode.Adjoint(interpolate=True))):
            seconds, (grad, stats) = timed(lambda: gradient(method, field, strategy, 1e-5))
            rows.append({"method": method, "gradient": label, "seconds": seconds, "nfe": stats["nfe"],
                         "nfe_backward": stats.get("nfe_backward"),
                         "error": float((grad - reference).norm() / reference.norm())})
    print(f"\n3. gradients, {batch} x {n}, rtol 1e-5: time of forward and backward, relative gradient error")
    print("| method | gradient | time | nfe forward / backward | error |")
    print("|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['method']} | {row['gradient']} | {row['seconds'] * 1e3:.0f} ms | {row['nfe']} / "
              f"{row['nfe_backward'] if row['nfe_backward'] is not None else '-'} | {row['error']:.1e} |")
    return rows


if __name__ == "__main__":
    results = {"reaction_diffusion": case_reaction_diffusion(), "forcing": case_forcing(),
               "gradients": case_gradients(), "torch": torch.__version__}
    out = Path(__file__).parent / "results" / "imex.json"
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=1))
    tmp.replace(out)
