"""P3 tiny forward, P2 forward and adjoint gradient: neuralode against diffrax (JAX) on the CPU, same thread count,
one process.

    pip install jax diffrax                 # a benchmark environment; not a dependency of neuralode
    taskset -c 0 python benchmarks/diffrax_cpu.py --threads 1
    python benchmarks/diffrax_cpu.py --threads 2

The P2 field (MLP 64-256-256-64, tanh, float32; the same weights in both libraries), batch 512 solved as one
state (one RMS error norm over all of it, as diffrax does for one array), 10 output times on [0, 1],
dopri5 / diffrax.Dopri5 with the integral controller (diffrax's PIDController with its defaults is the
integral controller), rtol 1e-5, atol 1e-6. Gradient: loss = mean of squares of all outputs, with respect
to the weights; neuralode's adjoint (seminorm, its default) against diffrax's BacksolveAdjoint (also with
its default, which takes the full norm) and against diffrax's default RecursiveCheckpointAdjoint (an
exact, discretise-then-optimise gradient like neuralode's ``gradient="direct"``, which is timed beside it).
JAX functions are jitted and warmed up; rounds are interleaved. Threads: torch.set_num_threads(n); XLA's
CPU client is limited with ``--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1`` for
n = 1 (and the whole process should be pinned to one core with taskset), and left at its default (all
cores) otherwise. Writes results/diffrax_cpu_<n>threads.json. P3 (the tiny 2-16-2 field of benchmarks/speed.py, batch 1,
10 outputs on [0, 10], rtol 1e-6, atol 1e-7, no gradient) measures the solver's own work per step.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args(argv)
    if args.threads == 1:
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1").strip()
    import diffrax
    import equinox  # noqa: F401  (diffrax's dependency; imported here so a missing one fails early)
    import jax
    import jax.numpy as jnp
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _common import MLP, markdown_table, write_json

    import neuralode

    torch.set_num_threads(args.threads)
    mlp = MLP(64, 256, layers=2, seed=0, dtype=torch.float32)
    params_torch = tuple(mlp.parameters())
    y0_torch = torch.randn(512, 64, generator=torch.Generator().manual_seed(1))
    t_torch = torch.linspace(0, 1, 10)
    rtol, atol = 1e-5, 1e-6

    linears = [m for m in mlp.net if isinstance(m, torch.nn.Linear)]
    weights = [(jnp.asarray(m.weight.detach().numpy().T), jnp.asarray(m.bias.detach().numpy())) for m in linears]
    y0 = jnp.asarray(y0_torch.numpy())
    ts = jnp.asarray(t_torch.numpy())

    def field(t, y, weights):
        for i, (w, b) in enumerate(weights):
            y = y @ w + b
            if i < len(weights) - 1:
                y = jnp.tanh(y)
        return y

    term = diffrax.ODETerm(field)
    controller = diffrax.PIDController(rtol=rtol, atol=atol)

    def solve(weights, adjoint):
        return diffrax.diffeqsolve(term, diffrax.Dopri5(), t0=0.0, t1=1.0, dt0=None, y0=y0, args=weights,
                                   saveat=diffrax.SaveAt(ts=ts), stepsize_controller=controller,
                                   adjoint=adjoint, max_steps=4096)

    # P3: the tiny field (MLP 2-16-2, tanh, batch 1, 10 outputs on [0, 10], rtol 1e-6, atol 1e-7), where the
    # per-step overhead outside the field decides (benchmarks/speed.py's P3).
    tiny = MLP(2, 16, layers=1, seed=2, dtype=torch.float32)
    tiny_weights = [(jnp.asarray(m.weight.detach().numpy().T), jnp.asarray(m.bias.detach().numpy()))
                    for m in tiny.net if isinstance(m, torch.nn.Linear)]
    tiny_y0_torch, tiny_t_torch = torch.tensor([[1.0, -0.5]]), torch.linspace(0, 10, 10)
    tiny_controller = diffrax.PIDController(rtol=1e-6, atol=1e-7)
    tiny_forward_jax = jax.jit(lambda w: diffrax.diffeqsolve(
        term, diffrax.Dopri5(), t0=0.0, t1=10.0, dt0=None, y0=jnp.asarray(tiny_y0_torch.numpy()), args=w,
        saveat=diffrax.SaveAt(ts=jnp.asarray(tiny_t_torch.numpy())), stepsize_controller=tiny_controller,
        max_steps=4096).ys)

    def tiny_forward(compile_):
        def call():
            with torch.no_grad():
                return neuralode.solve(tiny, tiny_y0_torch, tiny_t_torch, method="dopri5", rtol=1e-6, atol=1e-7,
                                       compile=compile_)
        return call

    forward_jax = jax.jit(lambda w: solve(w, diffrax.RecursiveCheckpointAdjoint()).ys)
    grad_backsolve = jax.jit(jax.grad(lambda w: jnp.mean(solve(w, diffrax.BacksolveAdjoint()).ys ** 2)))
    grad_checkpoint = jax.jit(jax.grad(lambda w: jnp.mean(solve(w, diffrax.RecursiveCheckpointAdjoint()).ys ** 2)))

    def jax_call(fn):
        return lambda: jax.block_until_ready(fn(weights))

    def torch_forward(compile_):
        def call():
            with torch.no_grad():
                return neuralode.solve(mlp, y0_torch, t_torch, method="dopri5", rtol=rtol, atol=atol, compile=compile_)
        return call

    def torch_gradient(gradient, compile_):
        def call():
            mlp.zero_grad(set_to_none=True)
            sol = neuralode.solve(mlp, y0_torch, t_torch, method="dopri5", rtol=rtol, atol=atol, gradient=gradient,
                                  compile=compile_)
            sol.ys.pow(2).mean().backward()
            return sol
        return call

    field_jax = jax.jit(lambda y, w: field(0.0, y, w))

    def torch_field():
        with torch.no_grad():
            return mlp(t_torch[0], y0_torch)

    groups = {
        "P2 field alone (one evaluation)": {"torch": torch_field,
                                            "diffrax": lambda: jax.block_until_ready(field_jax(y0, weights))},
        "P3 tiny forward": {"neuralode": tiny_forward(False), "neuralode compile": tiny_forward(True),
                            "diffrax": lambda: jax.block_until_ready(tiny_forward_jax(tiny_weights))},
        "P2 forward": {"neuralode": torch_forward(False), "neuralode compile": torch_forward(True),
                       "diffrax": jax_call(forward_jax)},
        "P2 adjoint gradient": {"neuralode adjoint": torch_gradient("adjoint", False),
                                "neuralode adjoint compile": torch_gradient("adjoint", True),
                                "diffrax BacksolveAdjoint": jax_call(grad_backsolve)},
        "P2 exact gradient": {"neuralode direct": torch_gradient("direct", False),
                              "neuralode direct compile": torch_gradient("direct", True),
                              "diffrax RecursiveCheckpointAdjoint": jax_call(grad_checkpoint)},
    }
    # The same solution? (max difference of the outputs; both in float32)
    with torch.no_grad():
        ours = neuralode.solve(mlp, y0_torch, t_torch, method="dopri5", rtol=rtol, atol=atol).ys.numpy()
    theirs = forward_jax(weights)
    agreement = float(abs(ours - jax.device_get(theirs)).max())
    stats = solve(weights, diffrax.RecursiveCheckpointAdjoint()).stats
    diffrax_steps = int(stats["num_steps"])

    rows = []
    for group, cases in groups.items():
        for fn in cases.values():   # warm-up: jit and torch.compile
            fn()
            fn()
        times = {name: [] for name in cases}
        for _ in range(args.rounds):
            for name, fn in cases.items():
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
        reference = next(name for name in cases if name.startswith("diffrax"))
        for name, values in times.items():
            ratios = [v / r for v, r in zip(values, times[reference])]
            rows.append({"case": group, "library": name, "median_ms": 1e3 * statistics.median(values),
                         "vs_diffrax": statistics.median(ratios), "times_ms": [1e3 * v for v in values]})
    print(f"\n### P3 and P2 on the CPU, {args.threads} thread(s), {args.rounds} interleaved rounds "
          f"(torch {torch.__version__}, jax {jax.__version__}, diffrax {diffrax.__version__})\n")
    print(f"outputs agree to {agreement:.2e}; diffrax took {diffrax_steps} steps\n")
    print(markdown_table(rows, [("case", "case", None), ("library", "library", None),
                                ("median ms", "median_ms", "{:.1f}"), ("vs diffrax", "vs_diffrax", "{:.2f}x")]))
    path = write_json(f"diffrax_cpu_{args.threads}threads.json",
                      {"threads": args.threads, "rounds": args.rounds, "rows": rows, "agreement": agreement,
                       "diffrax_steps": diffrax_steps, "jax": jax.__version__, "diffrax": diffrax.__version__})
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
