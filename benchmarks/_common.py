"""Shared pieces of the benchmark scripts: problems, library adapters, timing, reference solutions.

Every comparison runs the libraries in one process, interleaved (repeat r runs every library once
before repeat r + 1 starts), so that load from other processes on a shared machine hits all of them
alike; we report medians and ratios.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

RESULTS = Path(__file__).resolve().parent / "results"


# --------------------------------------------------------------------------------------------------
# Vector fields
# --------------------------------------------------------------------------------------------------

class Counted(torch.nn.Module):
    """Wraps a vector field and counts its evaluations (the same wrapper for every library)."""

    def __init__(self, f):
        super().__init__()
        self.f = f
        self.nfe = 0

    def forward(self, t, y):
        self.nfe += 1
        return self.f(t, y)


class Spiral(torch.nn.Module):
    """dy/dt = (y**3) @ A, A = [[-0.1, 2], [-2, -0.1]] (torchdiffeq's ode_demo)."""

    def __init__(self, dtype=torch.float64):
        super().__init__()
        self.register_buffer("A", torch.tensor([[-0.1, 2.0], [-2.0, -0.1]], dtype=dtype))

    def forward(self, t, y):
        return (y ** 3) @ self.A


class VanDerPol(torch.nn.Module):
    """y1' = y2, y2' = mu (1 - y1^2) y2 - y1 on the last axis."""

    def __init__(self, mu=10.0):
        super().__init__()
        self.mu = mu

    def forward(self, t, y):
        y1, y2 = y[..., 0:1], y[..., 1:2]
        return torch.cat([y2, self.mu * (1 - y1 * y1) * y2 - y1], dim=-1)


class MLP(torch.nn.Module):
    """Autonomous MLP vector field ``dim -> hidden (-> hidden) -> dim`` with tanh.

    ``dim`` is the feature size; inputs of any shape whose numel is a multiple of ``dim`` are
    reshaped to ``(-1, dim)`` and back, so torchode can see a batch as one joint state of shape
    ``(1, batch * dim)`` (the same error norm as torchdiffeq's and neuralode's joint solve).
    """

    def __init__(self, dim, hidden, layers=2, seed=0, dtype=torch.float32):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        sizes = [dim] + [hidden] * layers + [dim]
        mods = []
        for i, (a, b) in enumerate(zip(sizes, sizes[1:])):
            lin = torch.nn.Linear(a, b)
            with torch.no_grad():
                bound = 1 / a ** 0.5
                lin.weight.copy_(torch.empty(b, a).uniform_(-bound, bound, generator=g))
                lin.bias.copy_(torch.empty(b).uniform_(-bound, bound, generator=g))
            mods.append(lin)
            if i < len(sizes) - 2:
                mods.append(torch.nn.Tanh())
        self.net = torch.nn.Sequential(*mods).to(dtype)
        self.dim = dim

    def forward(self, t, y):
        shape = y.shape
        return self.net(y.reshape(-1, self.dim)).reshape(shape)


# --------------------------------------------------------------------------------------------------
# Library adapters: each returns (ys of shape (T, *y0.shape), stats dict with nfe and n_steps)
# --------------------------------------------------------------------------------------------------

def run_neuralode(f, y0, t, rtol, atol, method="dopri5", options=None, gradient="direct"):
    import neuralode
    f.nfe = 0
    sol = neuralode.solve(f, y0, t, method=method, rtol=rtol, atol=atol, options=options, gradient=gradient)
    st = sol.stats
    return sol.ys, {"nfe": f.nfe, "n_steps": st["n_steps"], "n_accepted": st["n_accepted"],
                    "n_rejected": st["n_rejected"]}, sol


def run_torchdiffeq(f, y0, t, rtol, atol, method="dopri5", options=None, adjoint=False, adjoint_options=None):
    import torchdiffeq
    f.nfe = 0
    if adjoint:
        ys = torchdiffeq.odeint_adjoint(f, y0, t, rtol=rtol, atol=atol, method=method, options=options,
                                        adjoint_options=adjoint_options)
    else:
        ys = torchdiffeq.odeint(f, y0, t, rtol=rtol, atol=atol, method=method, options=options)
    # dopri5: one evaluation at t0, one for the initial step, then 6 per attempted step (FSAL).
    return ys, {"nfe": f.nfe, "n_steps": (f.nfe - 2) / 6}, None


class TorchodeSolver:
    """torchode Dopri5 + IntegralController (torchdiffeq's controller), AutoDiffAdjoint or BacksolveAdjoint.

    The state is passed as one batch element, ``(1, numel)``, so torchode controls one joint error
    norm like the other two libraries (with a batch dimension it would step every sample separately).
    Built once per vector field (its modules hold the term), reused across repeats.
    """

    def __init__(self, f, rtol, atol, backsolve=False):
        import torchode as to
        self.f = f
        self.term = to.ODETerm(f)
        step = to.Dopri5(term=self.term)
        ctrl = to.IntegralController(atol=atol, rtol=rtol, term=self.term)
        if backsolve:
            self.adjoint = to.BacksolveAdjoint(self.term, step, ctrl)
        else:
            self.adjoint = to.AutoDiffAdjoint(step, ctrl)
        self.to = to

    def __call__(self, y0, t):
        self.f.nfe = 0
        shape = y0.shape
        y = y0.reshape(1, -1)
        problem = self.to.InitialValueProblem(y0=y, t_eval=t.to(y0.dtype).reshape(1, -1))
        sol = self.adjoint.solve(problem)
        ys = sol.ys[0].reshape(t.shape[0], *shape)
        st = sol.stats
        return ys, {"nfe": self.f.nfe, "n_steps": int(st["n_steps"].sum()),
                    "n_accepted": int(st["n_accepted"].sum())}, sol


# --------------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------------

def time_call(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def time_f(f, t, y, min_time=0.5, min_calls=20):
    """Seconds per call of ``f(t, y)`` without grad: the median of batches of calls (after warm-up)."""
    with torch.no_grad():
        for _ in range(5):
            f(t, y)
        n, elapsed = 0, 0.0
        batch = max(1, min_calls)
        while True:
            t0 = time.perf_counter()
            for _ in range(batch):
                f(t, y)
            dt = time.perf_counter() - t0
            n += batch
            elapsed += dt
            if elapsed > min_time / 2 or batch > 1e5:
                break
            batch *= 2
        per = []
        calls = max(5, batch // 4)
        for _ in range(5):
            t0 = time.perf_counter()
            for _ in range(calls):
                f(t, y)
            per.append((time.perf_counter() - t0) / calls)
    return statistics.median(per)


def interleaved(cases: dict, repeats: int):
    """Run ``cases[name]()`` in turn for ``repeats`` rounds; returns {name: (times, last_output)}."""
    times = {k: [] for k in cases}
    outs = {}
    for name, fn in cases.items():  # warm-up (first-call costs, allocator)
        outs[name] = fn()
    for _ in range(repeats):
        for name, fn in cases.items():
            dt, outs[name] = time_call(fn)
            times[name].append(dt)
    return {k: (times[k], outs[k]) for k in cases}


def median(xs):
    return statistics.median(xs)


# --------------------------------------------------------------------------------------------------
# Reference solutions
# --------------------------------------------------------------------------------------------------

def scipy_reference(f, y0, t, rtol=1e-12, atol=1e-12):
    """solve_ivp DOP853 in float64 on the torch vector field ``f`` (evaluated in float64)."""
    from scipy.integrate import solve_ivp
    shape = y0.shape
    y0_np = y0.detach().double().reshape(-1).numpy()

    def rhs(tt, y):
        with torch.no_grad():
            yt = torch.from_numpy(y).reshape(shape)
            return f(torch.tensor(tt, dtype=torch.float64), yt).reshape(-1).numpy()

    ts = t.double().numpy()
    sol = solve_ivp(rhs, (ts[0], ts[-1]), y0_np, method="DOP853", t_eval=ts, rtol=rtol, atol=atol)
    assert sol.success, sol.message
    return torch.from_numpy(sol.y.T.copy()).reshape(len(ts), *shape)


def max_error(ys, ref):
    return float((ys.detach().double() - ref).abs().max())


# --------------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------------

def machine():
    cpu = "unknown"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import importlib

    def version(name):
        # (a benchmark environment may lack a peer: the JSON says so rather than the run failing at its end)
        try:
            return getattr(importlib.import_module(name), "__version__", "?")
        except ImportError:
            return "not installed"

    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "torch": torch.__version__,
            "torchdiffeq": version("torchdiffeq"), "torchode": version("torchode"), "scipy": version("scipy"),
            "jax": version("jax"), "diffrax": version("diffrax"), "platform": platform.platform()}


def git_commit():
    import subprocess
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).resolve().parent)
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "src"], capture_output=True, text=True,
                               cwd=Path(__file__).resolve().parent).stdout.strip()
        return out.stdout.strip() + ("+dirty-src" if dirty else "")
    except OSError:
        return "?"


def write_json(name, payload):
    RESULTS.mkdir(parents=True, exist_ok=True)
    payload = {"machine": machine(), "commit": git_commit(), "argv": sys.argv, **payload}
    path = RESULTS / name
    path.write_text(json.dumps(payload, indent=2, default=_default))
    return path


def _default(x):
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    if isinstance(x, torch.Tensor):
        return x.tolist()
    raise TypeError(type(x))


def markdown_table(rows, columns):
    head = "| " + " | ".join(c[0] for c in columns) + " |"
    sep = "|" + "|".join("---" for _ in columns) + "|"
    lines = [head, sep]
    for r in rows:
        cells = []
        for title, key, fmt in columns:
            v = r.get(key)
            cells.append("" if v is None else (fmt.format(v) if fmt else str(v)))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


@dataclass
class Problem:
    name: str
    f: torch.nn.Module          # in the benchmark dtype, wrapped in Counted
    f64: torch.nn.Module        # float64 copy for the reference
    y0: torch.Tensor
    t: torch.Tensor
    rtol: float
    atol: float
    description: str
