"""Per-sample stepping (issue 11, item 5) on torchode's benchmark problem, in one process.

    python benchmarks/per_sample.py            # about three minutes on one thread
    python benchmarks/per_sample.py --quick    # smoke test

Problems: a batch of 256 Van der Pol oscillators ``x'' = mu (1 - x^2) x' - x`` with ``mu`` drawn uniformly
from [1, 10] (seeded), ``(x, x')(0) = (2, 0)``, 200 output times on [0, 10], dopri5, rtol = atol = 1e-5,
float32, one thread (torchode's benchmark problem); and the same batch, times and tolerances with a field
that costs far more per evaluation, Van der Pol plus a small neural correction ``0.01 MLP(y)``
(2-256-256-2, tanh, fixed random weights). Solvers:
- neuralode ``per_sample=True``: every oscillator its own steps;
- neuralode joint (``per_sample=False``): one step size and one error norm for the whole batch;
- torchode ``AutoDiffAdjoint(Dopri5, IntegralController)`` with the batch as torchode's batch (its
  per-sample stepping).
Two tasks: the forward solve (no grad), and forward + backward of ``mean(ys**2)`` with respect to ``mu``
and the MLP's weights: backpropagation through the steps in all three, neuralode's per-sample checkpointing,
and neuralode's adjoint, per sample and joint (torchode's ``BacksolveAdjoint`` calls the field on single samples under ``vmap``, which a field with
a parameter per sample does not allow). Reported: batched vector-field evaluations (one call
evaluates all 256 oscillators), wall time (median over interleaved rounds), the time ratio against
torchode in the same round, and the largest error against a per-sample solve at rtol = atol = 1e-10 in
float64. Writes results/per_sample.json.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import markdown_table, write_json  # noqa: E402

import neuralode  # noqa: E402


class VanDerPol(torch.nn.Module):
    def __init__(self, mu):
        super().__init__()
        self.mu = torch.nn.Parameter(mu)
        self.nfe = 0

    def forward(self, t, y):
        if not torch.compiler.is_compiling():   # (a counter traced into a compiled step would recompile it per call)
            self.nfe += 1
        x, v = y[:, 0], y[:, 1]
        return torch.stack([v, self.mu * (1 - x * x) * v - x], dim=1)


class HybridVanDerPol(VanDerPol):
    """Van der Pol plus a small neural correction, ``y' = f_vdp(y; mu_b) + 0.01 MLP(y)`` (2-256-256-2, tanh,
    fixed random weights): a hybrid model (a known law with a learned term) whose evaluation costs far more
    than the bookkeeping of a step, while the oscillators keep their phases of their own."""

    def __init__(self, mu):
        super().__init__(mu)
        generator = torch.Generator().manual_seed(3)
        self.layers = torch.nn.ModuleList(torch.nn.Linear(a, b, dtype=mu.dtype) for a, b in ((2, 256), (256, 256),
                                                                                               (256, 2)))
        with torch.no_grad():
            for layer in self.layers:
                layer.weight.copy_(torch.randn(layer.weight.shape, generator=generator, dtype=mu.dtype)
                                   / layer.in_features ** 0.5)
                layer.bias.zero_()

    def forward(self, t, y):
        h = torch.tanh(self.layers[0](y))
        h = torch.tanh(self.layers[1](h))
        return super().forward(t, y) + 0.01 * self.layers[2](h)


PROBLEMS = {"vdp": VanDerPol, "hybrid_vdp": HybridVanDerPol}


def problem(batch, n_times, dtype):
    mu = 1 + 9 * torch.rand(batch, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    y0 = torch.tensor([[2.0, 0.0]], dtype=torch.float64).repeat(batch, 1)
    t = torch.linspace(0, 10, n_times, dtype=torch.float64)
    return mu.to(dtype), y0.to(dtype), t.to(dtype)


def solvers(field, y0, t, tol, task):
    """The solvers of one task; the adjoint variants only for the gradient (their forward is the same solve)."""
    import torchode as to
    term = to.ODETerm(field)
    step, control = to.Dopri5(term=term), to.IntegralController(atol=tol, rtol=tol, term=term)
    torchode = to.AutoDiffAdjoint(step, control)
    t_eval = t.unsqueeze(0).expand(y0.shape[0], -1)
    problem = to.InitialValueProblem(y0=y0, t_eval=t_eval)
    kw = dict(method="dopri5", rtol=tol, atol=tol)
    # neuralode's cases return the Solution (its stats count the evaluations, also inside a compiled step, where the
    # field's own counter is not traced); torchode's the outputs, transposed from (batch, n, ...) to (n, batch, ...).
    cases = {
        "neuralode per-sample": lambda: neuralode.solve(field, y0, t, per_sample=True, **kw),
        "neuralode per-sample, compile=True": lambda: neuralode.solve(field, y0, t, per_sample=True, compile=True,
                                                                      **kw),
        "neuralode joint": lambda: neuralode.solve(field, y0, t, **kw),
        "torchode per-sample": lambda: torchode.solve(problem).ys.transpose(0, 1),
    }
    if task == "gradient":
        # (torchode's BacksolveAdjoint evaluates the field on one sample at a time under vmap, which a field with
        # a parameter per sample, mu[b], does not allow; it is left out.)
        cases["neuralode per-sample adjoint"] = lambda: neuralode.solve(field, y0, t, per_sample=True,
                                                                        gradient="adjoint", **kw)
        cases["neuralode joint adjoint"] = lambda: neuralode.solve(field, y0, t, gradient="adjoint", **kw)
        cases["neuralode per-sample checkpoint"] = lambda: neuralode.solve(field, y0, t, per_sample=True,
                                                                           gradient="checkpoint", **kw)
        cases["neuralode per-sample checkpoint, compile=True"] = lambda: neuralode.solve(
            field, y0, t, per_sample=True, gradient="checkpoint", compile=True, **kw)
    return cases


def _outputs(result):
    return result if isinstance(result, torch.Tensor) else result.ys


def run_problem(model, mu, y0, t, tol, rounds):
    """Both tasks for one vector field: NFE, accuracy, and interleaved timings of the three solvers."""
    reference_field = model(mu.double())
    if hasattr(reference_field, "layers"):
        reference_field.load_state_dict({k: v.double() for k, v in model(mu.clone()).state_dict().items()})
    with torch.no_grad():
        reference = neuralode.solve(reference_field, y0.double(), t.double(), method="dopri5", rtol=1e-10,
                                    atol=1e-10, per_sample=True).ys
    field = model(mu.clone())
    results = {}
    for task in ("forward", "gradient"):
        cases = solvers(field, y0, t, tol, task)
        times = {name: [] for name in cases}
        nfe, error = {}, {}
        for name, run in cases.items():       # warm-up (and compilation, untimed); records NFE and accuracy
            field.nfe = 0
            if task == "forward":
                with torch.no_grad():
                    result = run()
                error[name] = float((_outputs(result).double() - reference).abs().max())
            else:
                field.zero_grad()
                result = run()
                _outputs(result).square().mean().backward()
            nfe[name] = field.nfe if isinstance(result, torch.Tensor) else (result.stats["nfe"]
                                                                            + result.stats.get("nfe_backward", 0))
        for _ in range(rounds):               # interleaved: every solver once per round
            for name, run in cases.items():
                start = time.perf_counter()
                if task == "forward":
                    with torch.no_grad():
                        run()
                else:
                    field.zero_grad()
                    _outputs(run()).square().mean().backward()
                times[name].append(time.perf_counter() - start)
        peer = times["torchode per-sample"]
        results[task] = [{
            "solver": name, "nfe": nfe[name], "median_s": statistics.median(times[name]),
            "ratio_to_torchode": statistics.median(a / b for a, b in zip(times[name], peer)),
            "max_error": error.get(name),
        } for name in cases]
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a small batch and two rounds (smoke test)")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    batch, n_times, rounds = (16, 20, 2) if args.quick else (256, 200, args.rounds)
    dtype = getattr(torch, args.dtype)
    tol = 1e-5
    mu, y0, t = problem(batch, n_times, dtype)

    results = {}
    for problem_name, model in PROBLEMS.items():
        results[problem_name] = run_problem(model, mu, y0, t, tol, rounds)
        for task, rows in results[problem_name].items():
            print(f"\n{problem_name}, {task} (batch {batch}, {n_times} outputs, {args.dtype}, {args.threads} "
                  f"thread(s), {rounds} rounds)")
            print(markdown_table(rows, [("solver", "solver", None), ("batched NFE", "nfe", "{}"),
                                        ("median time (s)", "median_s", "{:.3f}"),
                                        ("time / torchode", "ratio_to_torchode", "{:.2f}x"),
                                        ("max error vs 1e-10 reference", "max_error", "{:.1e}")]))
    name = "per_sample_quick.json" if args.quick else "per_sample.json"
    path = write_json(name, {"batch": batch, "n_times": n_times, "dtype": args.dtype, "threads": args.threads,
                             "tol": tol, "rounds": rounds, "results": results})
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
