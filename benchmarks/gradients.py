"""Gradient benchmark: time per gradient against torchdiffeq and torchode, seminorm savings, and
backward-vs-forward NFE across tolerances.

    python benchmarks/gradients.py            # full run, writes results/gradients.json and gradients_nfe.png
    python benchmarks/gradients.py --quick    # < 1 minute

Problem (issue 3, the P2 field of benchmarks/solvers.py): MLP 64 -> 256 -> 256 -> 64 (tanh), batch 512,
float32, t = [0, 1] (the output at t = 1 only, as in an ODE block), dopri5, rtol 1e-5, atol 1e-6 (backward
solve: the same method and tolerances), loss = sum of squares of y(1). ``--quick`` uses batch 128. One "gradient" = forward solve +
``loss.backward()``, timed together.

Rows: neuralode ``gradient="adjoint"`` (default: the seminorm) and ``neuralode.Adjoint(seminorm=False)``
(full norm), torchdiffeq ``odeint_adjoint`` (default: full norm, and with
``adjoint_options={"norm": "seminorm"}``), torchode ``BacksolveAdjoint`` (batch
flattened to one joint state so that every library controls the same error norm), and, for
information, neuralode ``"checkpoint"`` and ``"direct"``. NFE counts evaluations of the field by one
counting wrapper for all libraries; backward NFE = evaluations during ``backward()`` (each also costs
one vector-Jacobian product).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (MLP, RESULTS, Counted, TorchodeSolver, interleaved, markdown_table, median,  # noqa: E402
                     write_json)

import neuralode  # noqa: E402


def make_problem(t_end=1.0, n_out=2, batch=512):
    mlp = MLP(64, 256, layers=2, seed=0, dtype=torch.float32)
    f = Counted(mlp)
    y0 = torch.randn(batch, 64, generator=torch.Generator().manual_seed(1))
    t = torch.linspace(0, t_end, n_out)
    return f, y0, t


def loss_of(ys):
    return ys[-1].pow(2).sum()


class Gradient:
    """One forward + backward; returns (seconds not included) the stats: nfe_forward, nfe_backward."""

    def __init__(self, lib, f, y0, t, rtol, atol, norm=None):
        # norm: None = the library's default (neuralode: seminorm, torchdiffeq: full), "seminorm" or "full"
        self.lib, self.f, self.y0, self.t, self.rtol, self.atol, self.norm = lib, f, y0, t, rtol, atol, norm
        if lib == "torchode":
            self.solver = TorchodeSolver(f, rtol, atol, backsolve=True)

    def __call__(self):
        f = self.f
        for p in f.parameters():
            p.grad = None
        y0 = self.y0.detach().requires_grad_(True)
        f.nfe = 0
        if self.lib == "neuralode":
            strategy = "adjoint" if self.norm is None else neuralode.Adjoint(seminorm=self.norm == "seminorm")
            ys = neuralode.solve(f, y0, self.t, method="dopri5", rtol=self.rtol, atol=self.atol,
                                 gradient=strategy).ys
        elif self.lib in ("neuralode-checkpoint", "neuralode-direct"):
            ys = neuralode.solve(f, y0, self.t, method="dopri5", rtol=self.rtol, atol=self.atol,
                                 gradient=self.lib.split("-")[1]).ys
        elif self.lib == "torchdiffeq":
            import torchdiffeq
            ys = torchdiffeq.odeint_adjoint(f, y0, self.t, rtol=self.rtol, atol=self.atol, method="dopri5",
                                            adjoint_options=None if self.norm is None else {"norm": self.norm})
        elif self.lib == "torchode":
            ys = self.solver(y0, self.t)[0]
        else:
            raise ValueError(self.lib)
        nfe_forward = f.nfe
        loss_of(ys).backward()
        grad = torch.cat([y0.grad.reshape(-1)] + [p.grad.reshape(-1) for p in f.parameters()])
        return {"nfe_forward": nfe_forward, "nfe_backward": f.nfe - nfe_forward, "grad": grad}


# (row name, library, norm): norm None = the library's default
CASES = [
    ("neuralode adjoint (default, seminorm)", "neuralode", None),
    ("neuralode adjoint seminorm=False", "neuralode", "full"),
    ("torchdiffeq adjoint (default, full norm)", "torchdiffeq", None),
    ("torchdiffeq adjoint norm=seminorm", "torchdiffeq", "seminorm"),
    ("torchode BacksolveAdjoint", "torchode", None),
    ("neuralode checkpoint", "neuralode-checkpoint", None),
    ("neuralode direct", "neuralode-direct", None),
]
ADJ, ADJ_FULL = CASES[0][0], CASES[1][0]
TDQ, TDQ_SEMI, TODE = CASES[2][0], CASES[3][0], CASES[4][0]


def timing(args):
    f, y0, t = make_problem(batch=128 if args.quick else 512)
    rtol, atol = 1e-5, 1e-6
    cases = {name: Gradient(lib, f, y0, t, rtol, atol, norm) for name, lib, norm in CASES}
    results = interleaved(cases, args.repeats or (1 if args.quick else 7))
    reference = results["neuralode direct"][1]["grad"]
    rows = []
    for name, (times, out) in results.items():
        rel = float((out["grad"] - reference).norm() / reference.norm())
        rows.append({"case": name, "wall_ms": 1e3 * median(times), "nfe_forward": out["nfe_forward"],
                     "nfe_backward": out["nfe_backward"], "grad_rel_diff_vs_direct": rel,
                     "times_ms": [1e3 * x for x in times]})
    by = {r["case"]: r for r in rows}
    best_other = min(by[TDQ]["wall_ms"], by[TODE]["wall_ms"])
    others = [min(x, y) for x, y in zip(by[TDQ]["times_ms"], by[TODE]["times_ms"])]
    for r in rows:
        r["vs_best_other"] = r["wall_ms"] / best_other
        # the same ratio taken within each interleaved round, then the median (robust to load drifts)
        r["vs_best_other_per_repeat"] = median([x / o for x, o in zip(r["times_ms"], others)])
    return rows


def sweep(args):
    """Forward and backward NFE of the adjoint across tolerances (atol = rtol / 10)."""
    f, y0, t = make_problem(batch=128 if args.quick else 512)
    rtols = (1e-3, 1e-6) if args.quick else (1e-3, 1e-4, 1e-5, 1e-6, 1e-7, 1e-8)
    rows = []
    for rtol in rtols:
        for name, lib, norm in CASES[:4]:
            out = Gradient(lib, f, y0, t, rtol, rtol / 10, norm)()
            rows.append({"rtol": rtol, "case": name, "nfe_forward": out["nfe_forward"],
                         "nfe_backward": out["nfe_backward"],
                         "ratio": out["nfe_backward"] / out["nfe_forward"]})
    return rows


def plot(sweep_rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    styles = ["o-", "s-", "^--", "x--"]  # overlapping curves (equal NFE) stay visible
    for i, name in enumerate(dict.fromkeys(r["case"] for r in sweep_rows)):
        rs = [r for r in sweep_rows if r["case"] == name]
        ax.plot([r["nfe_forward"] for r in rs], [r["nfe_backward"] for r in rs], styles[i % len(styles)],
                label=name, markersize=9 - 2 * i, mfc="none" if i < 2 else None)
    lo = min(r["nfe_forward"] for r in sweep_rows)
    hi = max(r["nfe_forward"] for r in sweep_rows)
    xs = [lo / 1.2, hi * 1.2]
    ax.plot(xs, xs, "k:", lw=1, label="backward = forward")
    ax.plot(xs, [2 * x for x in xs], "k--", lw=1, label="backward = 2 x forward")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("NFE forward")
    ax.set_ylabel("NFE backward")
    rtols = sorted({r["rtol"] for r in sweep_rows}, reverse=True)
    ax.set_title(f"MLP 64-256-256-64, dopri5, t=[0,1]\n(rtol {rtols[0]:.0e} ... {rtols[-1]:.0e}, atol = rtol/10)",
                 fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


COLUMNS = [("case", "case", None), ("ms / gradient", "wall_ms", "{:.0f}"),
           ("vs faster of tdq/torchode", "vs_best_other", "{:.2f}x"),
           ("same, per-round median", "vs_best_other_per_repeat", "{:.2f}x"), ("NFE fwd", "nfe_forward", "{}"),
           ("NFE bwd", "nfe_backward", "{}"), ("|g - g_direct| / |g_direct|", "grad_rel_diff_vs_direct", "{:.1e}")]
SWEEP_COLUMNS = [("rtol", "rtol", "{:.0e}"), ("case", "case", None), ("NFE fwd", "nfe_forward", "{}"),
                 ("NFE bwd", "nfe_backward", "{}"), ("bwd / fwd", "ratio", "{:.2f}")]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = timing(args)
    print(f"\n### Time per gradient (forward + backward), {torch.get_num_threads()} thread(s)\n")
    print(markdown_table(rows, COLUMNS), flush=True)
    by = {r["case"]: r for r in rows}
    targets = []
    for name in (ADJ, ADJ_FULL):
        v = by[name]["vs_best_other"]
        targets.append(f"{name}: time per gradient <= 0.8x the faster of torchdiffeq/torchode default adjoints: "
                       f"{v:.2f}x -> {'MET' if v <= 0.8 else 'MISSED'}" + ("" if name == ADJ else " (for information)"))
    a, s = by[ADJ_FULL]["nfe_backward"], by[ADJ]["nfe_backward"]
    saving = 1 - s / a
    targets.append(f"seminorm saves >= 30% backward NFE: {a} -> {s} ({100 * saving:.0f}% fewer) -> "
                   f"{'MET' if saving >= 0.3 else 'MISSED'}")
    sweep_rows = sweep(args)
    print("\n### Backward NFE against forward NFE across tolerances\n")
    print(markdown_table(sweep_rows, SWEEP_COLUMNS))
    semi = {r["rtol"]: r["nfe_backward"] for r in sweep_rows if r["case"] == ADJ}
    full = {r["rtol"]: r["nfe_backward"] for r in sweep_rows if r["case"] == ADJ_FULL}
    savings = {rt: 1 - semi[rt] / full[rt] for rt in full}
    targets.append("seminorm saving across tolerances: " +
                   ", ".join(f"rtol {rt:.0e}: {100 * v:.0f}%" for rt, v in savings.items()))
    print("\n### Targets\n")
    for line in targets:
        print("- " + line)
    name = "gradients_quick" if args.quick else "gradients"
    RESULTS.mkdir(parents=True, exist_ok=True)
    plot(sweep_rows, RESULTS / f"{name}_nfe.png")
    for r in rows:
        r.pop("grad", None)
    path = write_json(f"{name}.json", {"problem": __doc__.split("Problem")[1].split("Rows")[0].strip(),
                                       "rows": rows, "sweep": sweep_rows, "targets": targets})
    print(f"\nwrote {path} and {RESULTS / (name + '_nfe.png')}")


if __name__ == "__main__":
    main()
