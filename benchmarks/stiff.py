"""Stiff solvers: work-precision against scipy's Radau, BDF and LSODA, a batch of Robertson problems,
and a 10^5-unknown heat equation.

    python benchmarks/stiff.py                # full spans, rtol 1e-4..1e-8 -> results/stiff.json
    python benchmarks/stiff.py --quick        # smoke test: short spans, rtol 1e-4 and 1e-6 -> results/stiff_quick.json
    python benchmarks/stiff.py --plot         # also the work-precision plot docs/images/stiff_work_precision.png
    python benchmarks/stiff.py --quick --methods dopri5,scipy:Radau,scipy:BDF   # any subset; dopri5 records failures

Problems (benchmarks/stiff_problems.py, float64): Robertson [0, 1e5], Van der Pol mu = 1000 (MATLAB's vdp1000)
on [0, 3000], the test set's VDPOL (mu = 1e6) on [0, 2], HIRES [0, 321.8122], Oregonator [0, 360], heat
equation n = 1000 on [0, 0.5]; --quick uses each problem's short span. atol = rtol * the problem's per-component
scale (stiff_problems.py says where each comes from).

Methods: ours (``neuralode.solve``; every name in --methods that is not ``scipy:`` or ``diffrax:``; a name not
registered in ``neuralode.methods.REGISTRY`` is skipped with a note), scipy's ``solve_ivp`` (numpy field and
analytic Jacobian: dense, sparse for the heat equation, banded finite differences for LSODA there), and
diffrax's Kvaerno5 (jax field, jit-compiled before timing) when ``import diffrax`` works.

Error: at the end point, against the published reference values where there are full-precision ones (HIRES,
OREGO, VDPOL: IVP test set), the closed form (heat), else scipy Radau at rtol 1e-12 (Robertson, vdp1000, the
short spans). Reported as ``err/tol`` = max_i |y_i - ref_i| / (atol_i + rtol |ref_i|), i.e. the test set's mixed
relative error (whose -log10 is its "mescd") divided by rtol: 1 means the global error equals the tolerance.

Timing: wall time of one whole solve, median over --repeats interleaved rounds (round r runs every method once
before round r + 1; a case slower than --repeat-cutoff seconds runs once), torch.set_num_threads(1) (--threads).
Counts: NFE, steps, and n_jacobians / n_lu / n_newton_iters when our solver's stats have them (scipy: njev, nlu).

Targets (printed as PASS/FAIL lines with their numbers):
(a) every problem at rtol 1e-6: err/tol <= 10 in under 5 s (the best of our methods; all are listed);
(b) 1,024 Robertson problems, rate constants log-uniform within 10x of the classic ones, one batched solve
    (options={"jacobian": "batched"}) in <= 1/10 of scipy Radau solving them one by one; scipy is timed on a
    subset (--subset, default 64) and extrapolated linearly to the batch;
(c) a single (unbatched) problem solve within 3x of scipy Radau's wall time (each problem at rtol 1e-6);
(d) the heat equation with n = 10^5 (options={"jacobian": "krylov"}), error against the closed form, peak memory
    (extra resident memory VmHWM - VmRSS baseline in a fresh process, as benchmarks/memory.py measures it),
    with scipy Radau (sparse LU) beside it. Each method of ours runs twice: unpreconditioned GMRES, and
    ("name+pc") with options["preconditioner"] = the exact banded solve of (I - c L) v for the Dirichlet
    Laplacian L = tridiag(1, -2, 1) / dx^2 (scipy.linalg.solve_banded, O(n)); a method whose Krylov system
    does not take the preconditioner (radau5: its coupled 3-stage system) runs once, unpreconditioned.
    --quick: n = 10^4 on [0, 0.05], one case of ours (auto+pc). A child still running after --child-timeout
    seconds (600; --quick 15) is killed and reported as a failure.

--quick (short spans, rtol 1e-4 and 1e-6, one repeat, max_num_steps 5000, batch 128 with a subset of 16) is a smoke
test of the script, not a measurement; its JSON goes to results/stiff_quick.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, Counted, markdown_table, write_json  # noqa: E402
from stiff_problems import (heat, mixed_error, problem_set, robertson, robertson_batch,  # noqa: E402
                            sample_rate_constants, scipy_reference)

OURS_DEFAULT = ("kvaerno3", "kvaerno4", "kvaerno5", "radau5", "rodas5", "rodas5p", "auto")
SCIPY = ("scipy:Radau", "scipy:BDF", "scipy:LSODA")
DIFFRAX = ("diffrax:Kvaerno5",)
DEFAULT_METHODS = OURS_DEFAULT + SCIPY + DIFFRAX
TARGET_RTOL = 1e-6
PLOT_PATH = Path(__file__).resolve().parents[1] / "docs" / "images" / "stiff_work_precision.png"


# --------------------------------------------------------------------------------------------------
# Methods
# --------------------------------------------------------------------------------------------------

COMPILE_SUFFIX = "+compile"


def our_spec(name):
    """The MethodSpec of one of our methods, or None if it is not registered ("NAME+compile": NAME's)."""
    from neuralode.methods import REGISTRY
    name = name.removesuffix(COMPILE_SUFFIX)
    if name in REGISTRY:
        return REGISTRY[name]
    if name == "auto":  # "auto" may be resolved by check_method rather than listed
        try:
            from neuralode.options import check_method
            return check_method(name)
        except (ValueError, TypeError):
            return None
    return None


def our_options(spec, wanted: dict):
    """The subset of ``wanted`` that the method accepts, and the names it does not."""
    accepted = getattr(spec, "options", None)
    if accepted is None:
        return dict(wanted), []
    keep = {k: v for k, v in wanted.items() if k in accepted}
    return keep, [k for k in wanted if k not in accepted]


def resolve_methods(names, notes):
    """Split --methods into ours / scipy / diffrax, dropping (with a note) what is not available."""
    ours, scipy_m, diffrax_m = [], [], []
    for name in names:
        if name.startswith("scipy:"):
            if name.split(":", 1)[1] not in ("Radau", "BDF", "LSODA"):
                raise SystemExit(f"unknown scipy method {name!r} (scipy:Radau, scipy:BDF, scipy:LSODA)")
            scipy_m.append(name)
        elif name.startswith("diffrax:"):
            try:
                import diffrax
                import jax  # noqa: F401
            except Exception as e:  # noqa: BLE001 (any import failure means: skip)
                notes.append(f"{name}: skipped, `import diffrax` failed ({type(e).__name__}: {e})")
                continue
            if not hasattr(diffrax, name.split(":", 1)[1]):
                raise SystemExit(f"diffrax has no solver {name.split(':', 1)[1]!r}")
            diffrax_m.append(name)
        elif our_spec(name) is None:
            notes.append(f"{name}: skipped, not registered in neuralode.methods.REGISTRY")
        else:
            ours.append(name)
    return ours, scipy_m, diffrax_m


def _stats_of(stats):
    """The solver's counters (nfe, n_steps, ..., n_jacobians, n_lu, n_newton_iters when present) as ints."""
    out = {}
    for key, value in stats.items():
        try:
            out[key] = int(value)
        except (TypeError, ValueError):
            continue
    return out


class Ours:
    """A neuralode.solve case: calling it returns (y_end as numpy, stats, status), y_end None on failure."""

    def __init__(self, problem, method, rtol, t_end, max_steps, extra_options=None, notes=None):
        spec = our_spec(method)
        wanted = {"max_num_steps": max_steps, **(extra_options or {})}
        self.options, dropped = our_options(spec, wanted)
        if dropped and notes is not None:
            note = f"{method}: does not take option(s) {', '.join(dropped)}; run without"
            if note not in notes:
                notes.append(note)
        self.method = method.removesuffix(COMPILE_SUFFIX)
        self.compile = method.endswith(COMPILE_SUFFIX)
        # (a counter the field increments would change on every call and make torch.compile retrace: compiled
        # cases report the solver's own NFE only)
        self.f = problem.func if self.compile else Counted(problem.func)
        self.problem, self.rtol = problem, rtol
        self.atol = problem.atol_tensor(rtol)
        self.t = torch.tensor([problem.t_span[0], t_end], dtype=torch.float64)
        self.compile_s = None
        if self.compile:
            # torch.compile traces on the first solve with this field (cached per method and field class,
            # and tolerances are graph inputs): that first solve is timed apart, as diffrax's jit is.
            t0 = time.perf_counter()
            self()
            self.compile_s = time.perf_counter() - t0

    def __call__(self):
        import neuralode
        if not self.compile:
            self.f.nfe = 0
        sol = neuralode.solve(self.f, self.problem.y0, self.t, method=self.method, rtol=self.rtol, atol=self.atol,
                              options=dict(self.options) or None, throw=False, compile=self.compile)
        stats = _stats_of(sol.stats)
        if self.compile_s is not None:
            stats["first_solve_s"] = round(self.compile_s, 3)   # includes tracing and compiling
        if not self.compile:
            stats["calls"] = self.f.nfe  # field calls seen by the wrapper (a batched Jacobian call counts once)
        if not sol.success or sol.ys.shape[0] < 2:
            return None, stats, f"{sol.status}: {sol.message}"
        return sol.ys[-1].detach().numpy(), stats, sol.status


class Scipy:
    def __init__(self, problem, solver, rtol, t_end):
        self.problem, self.solver, self.rtol, self.t_end = problem, solver, rtol, t_end
        self.y0 = problem.y0.reshape(-1).numpy().copy()
        self.atol = np.broadcast_to(problem.atol(rtol), problem.y0.shape).reshape(-1).copy()
        self.kw = {}
        if solver in ("Radau", "BDF"):
            self.kw["jac"] = problem.jac_numpy
        elif problem.band is not None:
            self.kw["lband"], self.kw["uband"] = problem.band
        elif not problem.sparse_jacobian:
            self.kw["jac"] = problem.jac_numpy

    def __call__(self):
        from scipy.integrate import solve_ivp
        sol = solve_ivp(self.problem.f_numpy, (self.problem.t_span[0], self.t_end), self.y0, method=self.solver,
                        rtol=self.rtol, atol=self.atol, **self.kw)
        stats = {"nfe": int(sol.nfev), "n_steps": int(sol.t.size - 1), "n_jacobians": int(sol.njev),
                 "n_lu": int(sol.nlu)}
        if not sol.success:
            return None, stats, sol.message
        return sol.y[:, -1].reshape(self.problem.y0.shape), stats, "success"


class Diffrax:
    """A diffrax solver (Kvaerno5 by default) + PIDController(rtol, atol) on the jax version of the numpy field,
    jit-compiled here (untimed)."""

    def __init__(self, problem, rtol, t_end, max_steps, solver="Kvaerno5"):
        import jax
        jax.config.update("jax_enable_x64", True)
        import diffrax
        import jax.numpy as jnp
        self.problem = problem
        term = diffrax.ODETerm(lambda t, y, args: problem.f_numpy(t, y, xp=jnp))
        atol = jnp.asarray(np.broadcast_to(problem.atol(rtol), problem.y0.shape).reshape(-1))
        ctrl = diffrax.PIDController(rtol=rtol, atol=atol)
        t0 = float(problem.t_span[0])
        self.successful = diffrax.RESULTS.successful

        @jax.jit
        def run(y0):
            return diffrax.diffeqsolve(term, getattr(diffrax, solver)(), t0, float(t_end), None, y0,
                                       stepsize_controller=ctrl, max_steps=max_steps, throw=False)

        self.run = run
        self.y0 = jnp.asarray(problem.y0.reshape(-1).numpy())
        self()  # compile (untimed)

    def __call__(self):
        sol = self.run(self.y0)
        y = np.asarray(sol.ys[-1])
        st = sol.stats
        stats = {"n_steps": int(st["num_steps"]), "n_accepted": int(st["num_accepted_steps"]),
                 "n_rejected": int(st["num_rejected_steps"])}
        if sol.result != self.successful:
            return None, stats, str(sol.result)
        return y.reshape(self.problem.y0.shape), stats, "success"


def make_case(name, problem, rtol, t_end, max_steps, notes, extra_options=None):
    if name.startswith("scipy:"):
        return Scipy(problem, name.split(":", 1)[1], rtol, t_end)
    if name.startswith("diffrax:"):
        return Diffrax(problem, rtol, t_end, max_steps, name.split(":", 1)[1])
    return Ours(problem, name, rtol, t_end, max_steps, extra_options, notes)


# --------------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------------

def run_interleaved(cases: dict, repeats: int, cutoff: float):
    """{name: (times, (y, stats, status))}; an exception becomes a failure (None, {}, message)."""
    times = {k: [] for k in cases}
    outs = {}
    for r in range(repeats):
        for name, fn in cases.items():
            if r > 0 and (outs[name][0] is None or times[name][0] > cutoff):
                continue
            t0 = time.perf_counter()
            try:
                out = fn()
            except Exception as e:  # noqa: BLE001 (a failing method is a row, not a crash)
                out = (None, {}, f"{type(e).__name__}: {e}")
            times[name].append(time.perf_counter() - t0)
            outs[name] = out
    return {k: (times[k], outs[k]) for k in cases}


def warm_up(ours, max_steps):
    """One small solve per method, so first-call costs (imports, allocator, caches) are not timed."""
    p = heat(10)
    for m in ours:
        if m.endswith(COMPILE_SUFFIX):
            continue   # compiled per field class: its first solve on each problem is its warm-up (Ours)
        try:
            Ours(p, m, 1e-3, p.t_short[1], min(max_steps, 2000))()
        except Exception:  # noqa: BLE001
            pass


def reference_at(problem, t_end):
    """(reference end state, source): closed form, published full-precision values, or scipy Radau rtol 1e-12."""
    if problem.exact is not None:
        return np.asarray(problem.exact(t_end)).reshape(problem.y0.shape), "closed form"
    for t, values in problem.reference.items():
        if t == t_end:
            return np.asarray(values), problem.reference_source
    return np.asarray(scipy_reference(problem, [t_end], rtol=1e-12)[-1]), "scipy Radau rtol 1e-12"


def row_from(problem_key, problem, span, t_end, rtol, name, times, out, ref):
    y, stats, status = out
    row = {"problem": problem_key, "name": problem.name, "span": span, "t_end": t_end, "rtol": rtol,
           "method": name, "library": name.split(":")[0] if ":" in name else "neuralode",
           "ok": y is not None, "status": status, "wall_s": statistics.median(times) if times else None,
           "times_s": times, **stats}
    if y is not None:
        atol = np.broadcast_to(problem.atol(rtol), problem.y0.shape)
        finite = bool(np.all(np.isfinite(y)))
        row["mixed_error"] = mixed_error(y, ref, rtol, atol) if finite else float("inf")
        row["err_over_tol"] = row["mixed_error"] / rtol
        row["max_abs_error"] = float(np.max(np.abs(y - ref))) if finite else float("inf")
    return row


# --------------------------------------------------------------------------------------------------
# Parts
# --------------------------------------------------------------------------------------------------

def work_precision(args, problems, methods, notes):
    ours, scipy_m, diffrax_m = methods
    names = ours + scipy_m + diffrax_m
    rows = []
    for key, p in problems.items():
        span = "short" if args.quick else "full"
        t_end = p.t_short[1] if args.quick else p.t_span[1]
        t0 = time.perf_counter()
        ref, ref_source = reference_at(p, t_end)
        print(f"\n### {key}: {p.name} on [{p.t_span[0]:g}, {t_end:g}], n = {p.n}; reference: {ref_source} "
              f"({time.perf_counter() - t0:.1f} s)\n", flush=True)
        prow = []
        for rtol in args.rtols:
            cases = {}
            for name in names:
                try:
                    cases[name] = make_case(name, p, rtol, t_end, args.max_steps, notes)
                except Exception as e:  # noqa: BLE001 (e.g. a diffrax compile failure)
                    cases[name] = _failing(f"{type(e).__name__}: {e}")
            results = run_interleaved(cases, args.repeats, args.repeat_cutoff)
            for name, (times, out) in results.items():
                row = row_from(key, p, span, t_end, rtol, name, times, out, ref)
                row["reference"] = ref_source
                prow.append(row)
        print(markdown_table(_short(prow), WP_COLUMNS), flush=True)
        rows += prow
    return rows


def _failing(message):
    def fn():
        return None, {}, message
    return fn


def batched_robertson(args, methods, notes):
    """Target (b): one batched solve of ``args.batch`` Robertson problems against scipy Radau one by one."""
    ours = methods[0]
    batch, subset = args.batch, min(args.subset, args.batch)
    k = sample_rate_constants(batch, factor=10.0, seed=0)
    t_end = 40.0 if args.quick else 1e5
    rtol = TARGET_RTOL
    pb = robertson_batch(k, t_end=t_end)
    singles = [robertson(k[i].tolist(), t_end=t_end) for i in range(subset)]
    print(f"\n### (b) batch of {batch} Robertson problems on [0, {t_end:g}], rtol {rtol:g}, rate constants "
          f"log-uniform within 10x of (0.04, 3e7, 1e4); scipy Radau one by one on the first {subset}, "
          f"extrapolated x{batch / subset:g}\n", flush=True)
    refs = [np.asarray(scipy_reference(s, [t_end], rtol=1e-10)[-1]) for s in singles]
    atol = np.broadcast_to(pb.atol(rtol), (3,))
    scipy_cases = [Scipy(s, "Radau", rtol, t_end) for s in singles]

    def scipy_subset():
        ys, nfe = [], 0
        for c in scipy_cases:
            y, st, status = c()
            if y is None:
                return None, {"nfe": nfe}, status
            ys.append(y)
            nfe += st["nfe"]
        return np.stack(ys), {"nfe": nfe}, "success"

    cases = {"scipy:Radau (subset, one by one)": scipy_subset}
    for m in ours:
        cases[m] = Ours(pb, m, rtol, t_end, args.max_steps, {"jacobian": "batched"}, notes)
    results = run_interleaved(cases, args.repeats, args.repeat_cutoff)
    rows = []
    for name, (times, (y, stats, status)) in results.items():
        is_scipy = name.startswith("scipy")
        row = {"method": name, "batch": subset if is_scipy else batch, "ok": y is not None, "status": status,
               "wall_s": statistics.median(times), "times_s": times, **stats}
        if is_scipy:
            row["wall_extrapolated_s"] = row["wall_s"] * batch / subset
        else:
            row["jacobian"] = cases[name].options.get("jacobian", "not taken")
        if y is not None:
            errs = [mixed_error(y[i], refs[i], rtol, atol) for i in range(subset)]
            row["err_over_tol"] = max(errs) / rtol  # worst sample of the subset
        rows.append(row)
    print(markdown_table(_short(rows), B_COLUMNS), flush=True)
    return {"batch": batch, "subset": subset, "t_end": t_end, "rtol": rtol, "rows": rows}


PC_SUFFIX = "+pc"


def heat_preconditioner(n):
    """``preconditioner(v, c) = (I - c L)^{-1} v`` for the heat equation's L = tridiag(1, -2, 1) / dx^2
    (Dirichlet, dx = 1 / (n + 1)), by ``scipy.linalg.solve_banded`` on a numpy copy of v (last axis n);
    returns a tensor of v's dtype and device. Exact for this linear field, O(n) per call."""
    from scipy.linalg import solve_banded
    inv_dx2 = float((n + 1) ** 2)

    def preconditioner(v, c):
        ab = np.empty((3, n))
        ab[0] = ab[2] = -c * inv_dx2
        ab[1] = 1.0 + 2.0 * c * inv_dx2
        rhs = v.detach().cpu().to(torch.float64).numpy().reshape(-1, n).T
        x = solve_banded((1, 1), ab, rhs, check_finite=False)
        return torch.from_numpy(np.ascontiguousarray(x.T)).reshape(v.shape).to(dtype=v.dtype, device=v.device)

    return preconditioner


def preconditioner_applies(method):
    """Whether ``method``'s Krylov system uses options["preconditioner"]: the library passes it to single-stage
    systems only (Rosenbrock stages, diagonally implicit stages); a fully implicit method (radau5) drops it."""
    spec = our_spec(method)
    if spec is None or "preconditioner" not in (getattr(spec, "options", None) or ()):
        return False
    stepper = spec.make_stepper({"jacobian": "krylov"})
    inner = getattr(stepper, "stiff", stepper)  # "auto": its implicit half
    return bool(getattr(inner, "_diagonal", True))


def heat_child(method, n, t_end, rtol, max_steps, threads):
    """Runs in a fresh process: one heat solve, prints a JSON line with wall time, error and peak memory.
    ``method`` ending in "+pc": ours with the banded preconditioner (:func:`heat_preconditioner`)."""
    torch.set_num_threads(threads)
    precondition = method.endswith(PC_SUFFIX)
    base = method[:-len(PC_SUFFIX)] if precondition else method
    p = heat(n, t_end=0.5)
    ref = p.exact(t_end)

    def status_kib(key):
        for line in open("/proc/self/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1])
        raise KeyError(key)

    if base.startswith("scipy:"):
        case = Scipy(p, base.split(":", 1)[1], rtol, t_end)
    else:
        opts = {"jacobian": "krylov"}
        if precondition:
            opts["preconditioner"] = heat_preconditioner(n)
        case = Ours(p, base, rtol, t_end, max_steps, opts)
        Ours(p, base, 1e-3, 1e-6, 50, opts)()  # warm-up: a few tiny steps, not timed
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    baseline = status_kib("VmRSS")
    t0 = time.perf_counter()
    try:
        y, stats, status = case()
    except Exception as e:  # noqa: BLE001
        y, stats, status = None, {}, f"{type(e).__name__}: {e}"
    wall = time.perf_counter() - t0
    peak = status_kib("VmHWM")
    row = {"method": method, "base_method": base, "preconditioner": "banded (I - c L)^-1" if precondition else None,
           "n": n, "t_end": t_end, "rtol": rtol, "ok": y is not None, "status": status,
           "wall_s": wall, "baseline_mib": baseline / 1024, "peak_extra_mib": (peak - baseline) / 1024,
           "state_mib": n * 8 / 2 ** 20, **stats}
    if y is not None:
        row["err_over_tol"] = mixed_error(y, ref, rtol, p.atol(rtol)) / rtol
        row["max_abs_error"] = float(np.max(np.abs(y - ref)))
    print(json.dumps(row), flush=True)


def heat_large(args, methods, notes):
    """Target (d): each method in a fresh process (peak memory per process)."""
    ours, scipy_m, _ = methods
    n, t_end, rtol = args.large_n, (0.05 if args.quick else 0.5), TARGET_RTOL
    run = []
    for m in ours:
        spec = our_spec(m)
        if "jacobian" not in (getattr(spec, "options", None) or {"jacobian"}):
            notes.append(f"(d) {m}: does not take option 'jacobian' (krylov): not run on the n = {n} heat equation")
            continue
        run.append(m)
        if preconditioner_applies(m):
            run.append(m + PC_SUFFIX)
        elif not args.quick:
            notes.append(f"(d) {m}: its Krylov system does not use options['preconditioner'] (the library passes it "
                         "to single-stage systems only): run unpreconditioned only")
    if args.quick and len(run) > 1:  # a smoke test: one case of ours ("auto+pc" if it is there)
        keep = next((c for c in ("auto" + PC_SUFFIX, "auto") if c in run),
                    next((c for c in run if c.endswith(PC_SUFFIX)), run[0]))
        notes.append(f"(d) --quick runs one case of ours ({keep}); the full run takes every method, with and "
                     "without the preconditioner")
        run = [keep]
    run += [m for m in scipy_m if m == "scipy:Radau"]
    print(f"\n### (d) heat equation n = {n} on [0, {t_end:g}], rtol {rtol:g}, ours with "
          "options={'jacobian': 'krylov'} (+pc: with the banded preconditioner), scipy Radau with its sparse Jacobian; one fresh process each\n", flush=True)
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
    rows = []
    for m in run:
        cmd = [sys.executable, __file__, "--threads", str(args.threads), "--heat-child", m, str(n), repr(t_end),
               repr(rtol), str(args.max_steps)]
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.child_timeout)
        except subprocess.TimeoutExpired:
            rows.append({"method": m, "n": n, "ok": False, "preconditioner": m.endswith(PC_SUFFIX) or None,
                         "status": f"timeout: killed after {args.child_timeout:g} s "
                         "(--child-timeout)", "wall_s": args.child_timeout})
            continue
        got = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
        if got:
            rows.append(got[-1])
        else:
            rows.append({"method": m, "n": n, "ok": False, "status": f"child exited {out.returncode}: "
                         + (out.stderr.strip().splitlines() or ["?"])[-1][:200]})
    if rows:
        print(markdown_table(_short(rows), D_COLUMNS), flush=True)
    return {"n": n, "t_end": t_end, "rtol": rtol, "rows": rows}


# --------------------------------------------------------------------------------------------------
# Targets
# --------------------------------------------------------------------------------------------------

def _short(rows):
    """Adds ``status_short`` (the status up to its first colon, for tables; the JSON keeps the message)."""
    for r in rows:
        r["status_short"] = str(r.get("status", "")).split(":")[0][:40]
    return rows


def _fmt_row(r):
    if not r.get("ok"):
        return f"{r['method']} failed ({str(r.get('status', '?')).split(':')[0][:40]})"
    return f"{r['method']} {r['wall_s']:.2f} s err/tol {r['err_over_tol']:.2g}"


def check_targets(args, wp_rows, b, d, ours):
    lines = []
    ours_set = set(ours)
    at = [r for r in wp_rows if r["rtol"] == TARGET_RTOL]
    if not at:
        lines.append(f"(a)/(c) not checked: rtol {TARGET_RTOL:g} not among --rtols")
    span = "short spans (--quick)" if args.quick else "full spans"
    for key in dict.fromkeys(r["problem"] for r in at):
        rs = [r for r in at if r["problem"] == key]
        mine = [r for r in rs if r["method"] in ours_set]
        if not mine:
            lines.append(f"(a) {key}: no method of ours ran -> FAIL")
            continue
        good = [r for r in mine if r["ok"] and r["err_over_tol"] <= 10 and r["wall_s"] < 5.0]
        best = min(good, key=lambda r: r["wall_s"]) if good else None
        verdict = "PASS" if best else "FAIL"
        head = f"best {_fmt_row(best)}" if best else "none within 10x tol in < 5 s"
        lines.append(f"(a) {key} ({span}) at rtol {TARGET_RTOL:g}: err/tol <= 10 in < 5 s: {head}; all: "
                     + "; ".join(_fmt_row(r) for r in mine) + f" -> {verdict}")
        radau = next((r for r in rs if r["method"] == "scipy:Radau" and r["ok"]), None)
        ok_mine = [r for r in mine if r["ok"]]
        if radau is None:
            lines.append(f"(c) {key}: scipy Radau did not run or failed -> not checked")
        elif not ok_mine:
            lines.append(f"(c) {key}: every method of ours failed -> FAIL")
        else:
            accurate = [r for r in ok_mine if r["err_over_tol"] <= 10]
            which = "fastest of ours within 10x tol" if accurate else "fastest of ours (none within 10x tol)"
            fast = min(accurate or ok_mine, key=lambda r: r["wall_s"])
            ratio = fast["wall_s"] / radau["wall_s"]
            lines.append(f"(c) {key} single solve within 3x of scipy Radau ({radau['wall_s']:.3f} s, err/tol "
                         f"{radau['err_over_tol']:.2g}): {which} {fast['method']} {fast['wall_s']:.3f} s = "
                         f"{ratio:.2f}x -> {'PASS' if ratio <= 3 else 'FAIL'}")
    if b is not None:
        sc = next((r for r in b["rows"] if r["method"].startswith("scipy")), None)
        mine = [r for r in b["rows"] if r["method"] in ours_set]
        if sc is None or not sc["ok"]:
            lines.append("(b) scipy Radau subset failed -> not checked")
        elif not mine:
            lines.append("(b) no method of ours ran -> FAIL")
        else:
            budget = sc["wall_extrapolated_s"] / 10
            for r in mine:
                ok = r["ok"] and r["err_over_tol"] <= 10 and r["wall_s"] <= budget
                what = (f"{r['wall_s']:.2f} s, err/tol {r['err_over_tol']:.2g} (worst of the subset)" if r["ok"]
                        else f"failed ({r['status_short']})")
                lines.append(f"(b) batch {b['batch']} in one solve ({r['method']}, jacobian={r['jacobian']}): {what}; "
                             f"scipy Radau one by one {sc['wall_s']:.2f} s for {b['subset']} -> "
                             f"{sc['wall_extrapolated_s']:.1f} s extrapolated to {b['batch']}, budget 1/10 = "
                             f"{budget:.2f} s -> {'PASS' if ok else 'FAIL'}")
    if d is not None:
        mine = [r for r in d["rows"] if r["method"].removesuffix(PC_SUFFIX) in ours_set]
        sc = next((r for r in d["rows"] if r["method"] == "scipy:Radau"), None)
        if sc is not None and sc.get("ok"):
            lines.append(f"(d) scipy Radau (sparse LU) on heat n = {d['n']}: {sc['wall_s']:.2f} s, err/tol "
                         f"{sc['err_over_tol']:.2g}, max |error| {sc['max_abs_error']:.2e}, peak +"
                         f"{sc['peak_extra_mib']:.1f} MiB (state {sc['state_mib']:.2f} MiB) [baseline]")
        if not mine:
            lines.append(f"(d) heat n = {d['n']} with jacobian=krylov: no method of ours ran -> FAIL")
        for r in mine:
            if r.get("ok"):
                ok = r["err_over_tol"] <= 10
                lines.append(f"(d) heat n = {d['n']}, {r['method']} jacobian=krylov: {r['wall_s']:.2f} s, err/tol "
                             f"{r['err_over_tol']:.2g} against the closed form (max |error| {r['max_abs_error']:.2e}), "
                             f"peak +{r['peak_extra_mib']:.1f} MiB = {r['peak_extra_mib'] / r['state_mib']:.0f}x the "
                             f"state ({r['state_mib']:.2f} MiB) -> "
                             f"{'PASS' if ok else 'FAIL'}")
            else:
                lines.append(f"(d) heat n = {d['n']}, {r['method']}: failed ({r.get('status', '?')[:80]}) -> FAIL")
    return lines


WP_COLUMNS = [("rtol", "rtol", "{:.0e}"), ("method", "method", None), ("status", "status_short", None),
              ("wall s", "wall_s", "{:.3f}"), ("err/tol", "err_over_tol", "{:.3g}"), ("NFE", "nfe", "{}"),
              ("steps", "n_steps", "{}"), ("rejected", "n_rejected", "{}"), ("jac", "n_jacobians", "{}"),
              ("LU", "n_lu", "{}"), ("newton", "n_newton_iters", "{}")]
B_COLUMNS = [("method", "method", None), ("solved", "batch", "{}"), ("status", "status_short", None),
             ("wall s", "wall_s", "{:.3f}"), ("extrapolated s", "wall_extrapolated_s", "{:.2f}"),
             ("err/tol (worst)", "err_over_tol", "{:.3g}"), ("NFE", "nfe", "{}"), ("steps", "n_steps", "{}"),
             ("jac", "n_jacobians", "{}"), ("LU", "n_lu", "{}")]
D_COLUMNS = [("method", "method", None), ("status", "status_short", None), ("wall s", "wall_s", "{:.2f}"),
             ("err/tol", "err_over_tol", "{:.3g}"), ("max abs err", "max_abs_error", "{:.2e}"),
             ("peak extra MiB", "peak_extra_mib", "{:.1f}"), ("NFE", "nfe", "{}"), ("steps", "n_steps", "{}"),
             ("jac", "n_jacobians", "{}"), ("LU", "n_lu", "{}")]


# What each work-precision plot puts on its y axis: the file suffix, the row key, the axis label.
PLOT_MEASURES = (("", "wall_s", "wall time (s)"), ("_nfe", "nfe", "evaluations of f (NFE)"),
                 ("_jacobians", "n_jacobians", "Jacobians formed"))


def plot_all(rows, path, title):
    """The work-precision plots: error against wall time (``path``), evaluations (``*_nfe.png``) and Jacobians
    (``*_jacobians.png``); diffrax reports neither count, so it appears in the first only."""
    return [plot(rows, path.with_name(path.stem + suffix + path.suffix), title, key, label)
            for suffix, key, label in PLOT_MEASURES]


def plot(rows, path, title, measure="wall_s", ylabel="wall time (s)"):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    keys = list(dict.fromkeys(r["problem"] for r in rows))
    cols = min(3, len(keys))
    nrows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.4 * nrows), squeeze=False)
    methods = list(dict.fromkeys(r["method"] for r in rows))
    color = {m: f"C{i % 10}" for i, m in enumerate(methods)}  # one colour per method in every panel
    shown = {}
    for ax, key in zip(axes.flat, keys):
        for m in methods:
            pts = sorted((r["mixed_error"], r[measure]) for r in rows
                         if r["problem"] == key and r["method"] == m and r["ok"] and r["mixed_error"] > 0
                         and r.get(measure))
            if pts:
                style = "s--" if m.startswith("scipy") else ("^:" if m.startswith("diffrax") else "o-")
                (shown[m],) = ax.plot(*zip(*pts), style, color=color[m], label=m, markersize=4)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("end-point mixed relative error", fontsize=8)
        ax.set_ylabel(ylabel, fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    labels = [m for m in methods if m in shown]
    handles = [shown[m] for m in labels]
    fig.legend(handles, labels, loc="lower center", ncol=max(1, min(len(labels), 6)), fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0.07, 1, 0.97))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short spans, rtol 1e-4 and 1e-6, one repeat, "
                        "smaller batch (a smoke test)")
    parser.add_argument("--problems", default=None,
                        help="comma-separated from robertson,vdp1000,vdpol,hires,oregonator,heat (default all)")
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                        help="ours by name, scipy:Radau|BDF|LSODA, diffrax:Kvaerno5 (default: %(default)s)")
    parser.add_argument("--rtols", default=None, help="comma-separated (default 1e-4..1e-8; --quick 1e-4,1e-6)")
    parser.add_argument("--repeats", type=int, default=None, help="interleaved rounds (default 3; --quick 1)")
    parser.add_argument("--repeat-cutoff", type=float, default=10.0,
                        help="a case slower than this (s) in its first round is not repeated (default 10)")
    parser.add_argument("--max-steps", type=int, default=None,
                        help="max_num_steps for our solvers and diffrax (default 20000; --quick 5000)")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    parser.add_argument("--heat-n", type=int, default=1000, help="unknowns of the work-precision heat problem")
    parser.add_argument("--batch", type=int, default=None, help="(b) batch size (default 1024; --quick 128)")
    parser.add_argument("--subset", type=int, default=None, help="(b) scipy one-by-one subset (default 64; --quick 16)")
    parser.add_argument("--large-heat-n", dest="large_n", type=int, default=None,
                        help="(d) unknowns (default 100000; --quick 10000)")
    parser.add_argument("--child-timeout", type=float, default=None,
                        help="(d) seconds before a child process is killed (default 600; --quick 15)")
    parser.add_argument("--skip", default="", help="comma-separated parts to skip: wp,batch,heat")
    parser.add_argument("--out", default=None,
                        help="JSON path (default results/stiff.json; --quick results/stiff_quick.json)")
    parser.add_argument("--plot", action="store_true", help="write the work-precision plots (docs/images/"
                        "stiff_work_precision.png against wall time, *_nfe.png and *_jacobians.png against counts; "
                        "with --quick, results/stiff_quick_work_precision*.png)")
    parser.add_argument("--replot", default=None, metavar="JSON",
                        help="only redraw the plots from a results JSON of an earlier run, then exit")
    parser.add_argument("--heat-child", nargs=5, metavar=("METHOD", "N", "T_END", "RTOL", "MAX_STEPS"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.replot:
        saved = json.loads(Path(args.replot).read_text())
        title = (f"stiff work-precision ({'short spans, smoke test' if saved['quick'] else 'full spans'}), "
                 f"{saved['threads']} thread(s)")
        target = RESULTS / f"{Path(args.replot).stem}_work_precision.png" if saved["quick"] else PLOT_PATH
        for written in plot_all(saved["work_precision"], target, title):
            print(f"wrote {written}")
        return
    if args.heat_child:
        m, n, t_end, rtol, max_steps = args.heat_child
        heat_child(m, int(n), float(t_end), float(rtol), int(max_steps), args.threads)
        return
    started = time.perf_counter()
    args.rtols = ([float(x) for x in args.rtols.split(",")] if args.rtols
                  else ([1e-4, 1e-6] if args.quick else [1e-4, 1e-5, 1e-6, 1e-7, 1e-8]))
    args.repeats = args.repeats or (1 if args.quick else 3)
    args.max_steps = args.max_steps or (5000 if args.quick else 20000)
    args.batch = args.batch or (128 if args.quick else 1024)
    args.subset = args.subset or (16 if args.quick else 64)
    args.large_n = args.large_n or (10_000 if args.quick else 100_000)
    args.child_timeout = args.child_timeout or (15.0 if args.quick else 600.0)
    skip = {s for s in args.skip.split(",") if s}

    notes = []
    methods = resolve_methods([m for m in args.methods.split(",") if m], notes)
    ours = methods[0]
    for line in notes:
        print("note: " + line)
    if not ours:
        print("note: no method of ours to run: scipy (and diffrax) only; the targets report FAIL")
    warm_up(ours, args.max_steps)

    problems = problem_set(args.heat_n)
    if args.problems:
        wanted = args.problems.split(",")
        unknown = [w for w in wanted if w not in problems]
        if unknown:
            raise SystemExit(f"unknown problem(s) {unknown}; choose from {list(problems)}")
        problems = {k: problems[k] for k in wanted}

    print(f"\n{'quick: short spans' if args.quick else 'full spans'}, rtol {args.rtols}, {args.repeats} repeat(s), "
          f"{torch.get_num_threads()} torch thread(s), max_num_steps {args.max_steps}", flush=True)
    wp = work_precision(args, problems, methods, notes) if "wp" not in skip else []
    b = batched_robertson(args, methods, notes) if "batch" not in skip else None
    d = heat_large(args, methods, notes) if "heat" not in skip else None

    targets = check_targets(args, wp, b, d, ours)
    print("\n### Targets\n")
    for line in targets:
        print(line)
    if notes:
        print("\n### Notes\n")
        for line in dict.fromkeys(notes):
            print("- " + line)
    elapsed = time.perf_counter() - started
    print(f"\ntotal {elapsed:.0f} s")

    name = "stiff_quick" if args.quick else "stiff"
    out = Path(args.out).resolve() if args.out else RESULTS / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {"quick": args.quick, "rtols": args.rtols, "repeats": args.repeats, "threads": args.threads,
               "max_steps": args.max_steps, "methods_requested": args.methods.split(","),
               "methods_run": {"ours": methods[0], "scipy": methods[1], "diffrax": methods[2]},
               "problems": {k: {"name": p.name, "t_span": p.t_span, "t_short": p.t_short, "source": p.source,
                                "atol_scale": np.asarray(p.atol_scale).tolist()} for k, p in problems.items()},
               "error_measure": "err/tol = max_i |y_i - ref_i| / (atol_i + rtol |ref_i|) at the end point",
               "work_precision": wp, "batched_robertson": b, "heat_large": d, "targets": targets,
               "notes": list(dict.fromkeys(notes)), "elapsed_s": elapsed}
    path = write_json(str(out), payload)
    print(f"wrote {path}")
    if args.plot and wp:
        target = RESULTS / f"{name}_work_precision.png" if args.quick else PLOT_PATH
        title = (f"stiff work-precision ({'short spans, smoke test' if args.quick else 'full spans'}), "
                 f"{torch.get_num_threads()} thread(s)")
        for written in plot_all(wp, target, title):
            print(f"wrote {written}")


if __name__ == "__main__":
    main()
