"""Issue 13's CPU targets, measured in one process against torchdiffeq and torchode (interleaved rounds).

    python benchmarks/speed.py            # about 5 minutes on one thread
    python benchmarks/speed.py --quick    # smoke test

Cases (one thread, float32):
- P3 forward: MLP 2-16-2 (tanh), batch 1, 10 outputs on [0, 10], dopri5, rtol 1e-6, atol 1e-7, no grad;
  neuralode eager and with ``compile=True`` (compile time reported separately).
- P2 forward: MLP 64-256-256-64 (tanh), batch 512, 10 outputs on [0, 1], dopri5, rtol 1e-5, atol 1e-6.
- P2 adjoint gradient: the same solve, loss = mean of squares of every output, forward + backward, each
  library's adjoint (torchdiffeq ``odeint_adjoint`` with its default full norm and with the seminorm,
  torchode ``BacksolveAdjoint``), backward tolerances = forward ones.
- ode_demo training iteration: torchdiffeq's ``examples/ode_demo.py`` with ``--adjoint``: true dynamics
  ``y' = (y**3) A`` sampled at 1000 times on [0, 25], a batch of 20 windows of 10 times, the model
  ``y**3 -> Linear(2, 50) -> tanh -> Linear(50, 2)``, dopri5 at torchdiffeq's defaults (rtol 1e-7,
  atol 1e-9), L1 loss, RMSprop step. Both libraries draw the same windows.

Ratios are the median over rounds of (neuralode time / the faster peer's time in that round).
Writes results/speed.json.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import MLP, TorchodeSolver, markdown_table, write_json  # noqa: E402

import neuralode  # noqa: E402


def _forward_cases(field, y0, t, rtol, atol):
    """A forward solve (dopri5, no grad) in each library: neuralode eager and compiled, torchdiffeq, torchode."""
    import torchdiffeq
    tode = TorchodeSolver(field, rtol, atol)
    kw = dict(rtol=rtol, atol=atol)
    return {
        "neuralode": lambda: neuralode.solve(field, y0, t, method="dopri5", **kw).ys,
        "neuralode compile": lambda: neuralode.solve(field, y0, t, method="dopri5", compile=True, **kw).ys,
        "torchdiffeq": lambda: torchdiffeq.odeint(field, y0, t, method="dopri5", **kw),
        "torchode": lambda: tode(y0, t)[0],
    }, ("torchdiffeq", "torchode"), True


def p3_cases():
    return _forward_cases(MLP(2, 16, layers=1, seed=2, dtype=torch.float32), torch.tensor([[1.0, -0.5]]),
                          torch.linspace(0, 10, 10), 1e-6, 1e-7)


def p2_forward_cases():
    return _forward_cases(MLP(64, 256, layers=2, seed=0, dtype=torch.float32),
                          torch.randn(512, 64, generator=torch.Generator().manual_seed(1)), torch.linspace(0, 1, 10),
                          1e-5, 1e-6)


def p2_adjoint_cases():
    mlp = MLP(64, 256, layers=2, seed=0, dtype=torch.float32)
    params = tuple(mlp.parameters())
    y0 = torch.randn(512, 64, generator=torch.Generator().manual_seed(1))
    t = torch.linspace(0, 1, 10)
    kw = dict(rtol=1e-5, atol=1e-6)
    tode = TorchodeSolver(mlp, 1e-5, 1e-6, backsolve=True)
    import torchdiffeq

    def gradient(run):
        def call():
            mlp.zero_grad(set_to_none=True)
            ys = run()
            ys.pow(2).mean().backward()
            return params[0].grad
        return call

    return {
        "neuralode": gradient(lambda: neuralode.solve(mlp, y0, t, method="dopri5", gradient="adjoint", **kw).ys),
        "neuralode compile": gradient(lambda: neuralode.solve(mlp, y0, t, method="dopri5", gradient="adjoint",
                                                              compile=True, **kw).ys),
        "torchdiffeq": gradient(lambda: torchdiffeq.odeint_adjoint(mlp, y0, t, method="dopri5", **kw)),
        "torchdiffeq seminorm": gradient(lambda: torchdiffeq.odeint_adjoint(
            mlp, y0, t, method="dopri5", adjoint_options={"norm": "seminorm"}, **kw)),
        "torchode": gradient(lambda: tode(y0, t)[0]),
    }, ("torchdiffeq", "torchdiffeq seminorm", "torchode"), False


class _DemoField(torch.nn.Module):
    """torchdiffeq ode_demo's ODEFunc: y**3 -> Linear(2, 50) -> tanh -> Linear(50, 2)."""

    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(2, 50), torch.nn.Tanh(), torch.nn.Linear(50, 2))
        for m in self.net.modules():
            if isinstance(m, torch.nn.Linear):
                torch.nn.init.normal_(m.weight, mean=0, std=0.1)
                torch.nn.init.constant_(m.bias, val=0)

    def forward(self, t, y):
        return self.net(y ** 3)


def ode_demo_cases():
    import torchdiffeq
    true_y0 = torch.tensor([[2.0, 0.0]])
    t = torch.linspace(0.0, 25.0, 1000)
    A = torch.tensor([[-0.1, 2.0], [-2.0, -0.1]])
    with torch.no_grad():
        true_y = torchdiffeq.odeint(lambda t, y: torch.mm(y ** 3, A), true_y0, t, method="dopri5")
    batch_time, batch_size = 10, 20
    generator = torch.Generator().manual_seed(0)

    def make(run):
        torch.manual_seed(0)
        func = _DemoField()
        optimizer = torch.optim.RMSprop(func.parameters(), lr=1e-3)

        def iteration():
            s = torch.randperm(1000 - batch_time, generator=generator)[:batch_size]
            batch_y0, batch_t = true_y[s], t[:batch_time]
            batch_y = torch.stack([true_y[s + i] for i in range(batch_time)], dim=0)
            optimizer.zero_grad()
            pred_y = run(func, batch_y0, batch_t)
            loss = torch.mean(torch.abs(pred_y - batch_y))
            loss.backward()
            optimizer.step()
            return loss.detach()
        return iteration

    return {
        "neuralode": make(lambda f, y0, tt: neuralode.odeint_adjoint(f, y0, tt)),
        "neuralode compile": make(lambda f, y0, tt: neuralode.solve(f, y0, tt, method="dopri5", gradient="adjoint",
                                                                   compile=True).ys),
        "torchdiffeq": make(lambda f, y0, tt: torchdiffeq.odeint_adjoint(f, y0, tt)),
    }, ("torchdiffeq",), False


def measure(name, factory, rounds, target=None):
    cases, peers, no_grad = factory()
    compile_s = None
    context = torch.no_grad if no_grad else torch.enable_grad
    with context():
        for label, fn in cases.items():           # warm-up; the compiled case's first call compiles
            start = time.perf_counter()
            fn()
            fn()
            if label.endswith("compile"):
                compile_s = time.perf_counter() - start
        times = {label: [] for label in cases}
        for _ in range(rounds):
            for label, fn in cases.items():
                start = time.perf_counter()
                fn()
                times[label].append(time.perf_counter() - start)
    best_peer = [min(times[p][i] for p in peers) for i in range(rounds)]
    rows = []
    for label, ts in times.items():
        ratios = [x / b for x, b in zip(ts, best_peer)]
        rows.append({"case": name, "library": label, "median_ms": 1e3 * statistics.median(ts),
                     "vs_best_peer": statistics.median(ratios), "ratios": ratios, "times_ms": [1e3 * x for x in ts]})
    print(f"\n### {name} ({rounds} rounds; compile + first call: {compile_s:.1f} s)\n")
    print(markdown_table(rows, [("library", "library", None), ("median ms", "median_ms", "{:.2f}"),
                                ("vs best peer", "vs_best_peer", "{:.2f}x")]), flush=True)
    return rows, compile_s


def per_evaluation(rounds):
    """Backward time per evaluation of the adjoint against forward time per evaluation (issue 13 item 2):
    (gradient time - forward time) / backward NFE over forward time / forward NFE, P2 and the ode_demo
    field (a batch of 20 windows), eager and compiled."""
    mlp = MLP(64, 256, layers=2, seed=0, dtype=torch.float32)
    cases = [("P2 MLP, batch 512", mlp, torch.randn(512, 64, generator=torch.Generator().manual_seed(1)),
              torch.linspace(0, 1, 10), dict(rtol=1e-5, atol=1e-6))]
    torch.manual_seed(0)
    demo = _DemoField()
    cases.append(("ode_demo field, 20 windows", demo, torch.randn(20, 1, 2) * 0.5 + torch.tensor([2.0, 0.0]),
                  torch.linspace(0, 0.24, 10), dict(rtol=1e-7, atol=1e-9)))
    rows = []
    for name, field, y0, t, kw in cases:
        params = tuple(field.parameters())
        for compile_ in (False, True):
            def forward():
                with torch.no_grad():
                    return neuralode.solve(field, y0, t, method="dopri5", compile=compile_, **kw)

            def gradient():
                field.zero_grad(set_to_none=True)
                sol = neuralode.solve(field, y0, t, method="dopri5", gradient="adjoint", compile=compile_, **kw)
                sol.ys.pow(2).mean().backward()
                return sol
            forward(), gradient()   # warm-up (compiles)
            f_times, g_times = [], []
            for _ in range(rounds):
                start = time.perf_counter()
                sol = forward()
                f_times.append(time.perf_counter() - start)
                start = time.perf_counter()
                gsol = gradient()
                g_times.append(time.perf_counter() - start)
            forward_s, gradient_s = statistics.median(f_times), statistics.median(g_times)
            nfe, nfe_back = sol.stats["nfe"], gsol.stats["nfe_backward"]
            per_forward = forward_s / nfe
            per_backward = (gradient_s - forward_s) / nfe_back
            rows.append({"case": name, "library": "neuralode compile" if compile_ else "neuralode",
                         "nfe": nfe, "nfe_backward": nfe_back, "forward_us_per_eval": 1e6 * per_forward,
                         "backward_us_per_eval": 1e6 * per_backward, "ratio": per_backward / per_forward})
    print("\n### Adjoint: backward time per evaluation against forward time per evaluation\n")
    print(markdown_table(rows, [("case", "case", None), ("", "library", None), ("NFE fwd / bwd", "nfe", "{}"),
                                ("", "nfe_backward", "{}"), ("us per forward eval", "forward_us_per_eval", "{:.0f}"),
                                ("us per backward eval", "backward_us_per_eval", "{:.0f}"),
                                ("ratio", "ratio", "{:.2f}")]), flush=True)
    return rows


TARGETS = {"P3 forward": ("neuralode compile", 0.25), "P2 adjoint gradient": ("neuralode", 0.4),
           "ode_demo adjoint iteration": ("neuralode", 0.35)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--cases", default="p3,p2,p2adj,demo,perf")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    chosen = {"p3": ("P3 forward", p3_cases, 30), "p2": ("P2 forward", p2_forward_cases, 7),
              "p2adj": ("P2 adjoint gradient", p2_adjoint_cases, 5),
              "demo": ("ode_demo adjoint iteration", ode_demo_cases, 30)}
    all_rows, compile_times, verdicts = [], {}, []
    for key in args.cases.split(","):
        if key == "perf":
            continue
        name, factory, rounds = chosen[key]
        rows, compile_s = measure(name, factory, 3 if args.quick else rounds)
        all_rows += rows
        compile_times[name] = compile_s
        if name in TARGETS:
            label, limit = TARGETS[name]
            for label_ in dict.fromkeys((label, "neuralode compile")):
                value = next(r["vs_best_peer"] for r in rows if r["library"] == label_)
                verdicts.append(f"{name} {label_}: {value:.2f}x the best peer (target <= {limit}x: "
                                f"{'PASS' if value <= limit else 'FAIL'})")
    per_eval = per_evaluation(3 if args.quick else 10) if "perf" in args.cases.split(",") else []
    print("\n### Targets\n")
    for line in verdicts:
        print("- " + line)
    path = write_json("speed_quick.json" if args.quick else "speed.json",
                      {"rows": all_rows, "compile_s": compile_times, "targets": verdicts,
                       "per_evaluation": per_eval})
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
