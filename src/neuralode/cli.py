"""The ``neuralode`` command: list, run and report experiments.

::

    neuralode list
    neuralode run NAME [--set key=value ...] [--out DIR] [--resume] [--device cpu|cuda] [--seed N]
    neuralode report RUN_DIR [RUN_DIR ...] [--out FILE]
    torchrun --nproc_per_node=N -m neuralode run NAME ...   (data-parallel training)

Mistakes on the command line (an unknown experiment or config key, a value of the wrong
type, nothing to resume, no CUDA) end with exit status 2 and one line saying what to do.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

__all__ = ["main"]


class _Fail(Exception):
    """A command-line error: printed as one line, exit status 2."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="neuralode", description="Run the neural ODE experiments and report on them."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    sub.add_parser("list", help="name the experiments, one line each")

    run = sub.add_parser("run", help="train an experiment into a run directory")
    run.add_argument("name", metavar="NAME", help="experiment name (see `neuralode list`)")
    run.add_argument("--set", dest="overrides", metavar="KEY=VALUE", nargs="+", action="extend",
                     default=[], help="override config fields, e.g. --set steps=200 lr=0.01")
    run.add_argument("--out", type=Path, help="run directory (default: runs/NAME-TIMESTAMP)")
    run.add_argument("--resume", action="store_true",
                     help="continue the run in --out (default: the newest runs/NAME-*) from its checkpoint")
    run.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="default: cpu")
    run.add_argument("--seed", type=int, help="same as --set seed=N")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")

    report = sub.add_parser("report", help="write one self-contained HTML page for runs")
    report.add_argument("run_dirs", metavar="RUN_DIR", nargs="+", type=Path)
    report.add_argument("--out", type=Path,
                        help="HTML file (default: RUN_DIR/report.html for one run, else report.html)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "list":
            return _list()
        if args.command == "run":
            return _run(args)
        return _report(args)
    except _Fail as exc:
        print(f"neuralode: error: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:
        from neuralode.experiments import ConfigError

        if isinstance(exc, ConfigError):
            print(f"neuralode: error: {exc}", file=sys.stderr)
            return 2
        raise


def _list() -> int:
    from neuralode.experiments import experiment_names, get_experiment

    names = experiment_names()
    width = max(map(len, names))
    for name in names:
        print(f"{name:<{width}}  {get_experiment(name).description}")
    return 0


def _latest_run(name: str) -> Path:
    candidates = sorted(Path("runs").glob(f"{name}-*"), key=lambda p: p.stat().st_mtime)
    if not candidates:
        raise _Fail(f"--resume: no runs/{name}-* directory here; pass the run with --out RUN_DIR")
    return candidates[-1]


def _run(args: argparse.Namespace) -> int:
    import torch

    from neuralode.experiments import apply_overrides, get_experiment, train
    from neuralode.experiments.config import config_from_dict
    from neuralode.experiments.runner import CHECKPOINT

    experiment = get_experiment(args.name)
    missing = [m for m in ("matplotlib", "tqdm") if importlib.util.find_spec(m) is None]
    if missing:
        raise _Fail(f"`neuralode run` needs {' and '.join(missing)}: pip install 'neuralode[cli]'")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise _Fail("--device cuda: CUDA is not available to torch here; use --device cpu "
                    "(or install a CUDA build of torch)")

    if args.resume:
        run_dir = args.out if args.out is not None else _latest_run(args.name)
        if args.overrides or args.seed is not None:
            raise _Fail("--resume continues a run with its saved config.json; drop --set/--seed "
                        "(start a new run to change the config)")
        config_file = run_dir / "config.json"
        if not (run_dir / CHECKPOINT).exists():
            raise _Fail(f"--resume: no checkpoint at {run_dir / CHECKPOINT}; "
                        f"run without --resume to start a new run")
        saved = json.loads(config_file.read_text())
        if saved.get("experiment") != args.name:
            raise _Fail(f"--resume: {run_dir} is a run of {saved.get('experiment')!r}, "
                        f"not {args.name!r}")
        config = config_from_dict(experiment.Config, saved["config"])
    else:
        config = experiment.Config()
        overrides = list(args.overrides)
        if args.seed is not None:
            overrides.append(f"seed={args.seed}")
        config = experiment.resolve(apply_overrides(config, overrides))
        run_dir = args.out if args.out is not None else _new_run_dir(args.name)
        if (run_dir / "config.json").exists():
            raise _Fail(f"{run_dir} already holds a run; pass --resume to continue it "
                        f"or choose another --out")

    # Under torchrun every process runs this command; rank 0 alone prints and writes files.
    from neuralode.experiments import distributed

    context = distributed.from_environment(run_dir, args.device)  # None in one process
    try:
        if context is not None:
            run_dir = context.run_dir
        if context is None or context.is_main:
            verb = "resuming" if args.resume else "running"
            print(f"{verb} {args.name} in {run_dir}", file=sys.stderr)
        summary = train(experiment, config, run_dir, device=args.device if context is None else context.device,
                        resume=args.resume, progress=not args.no_progress, context=context)
    finally:
        if context is not None:
            distributed.shutdown()
    if context is not None and not context.is_main:
        return 0 if summary["status"] == "completed" else 130
    if summary["status"] != "completed":
        print(f"stopped at step {summary['steps_done']}/{summary['steps']}; continue with\n"
              f"  neuralode run {args.name} --resume --out {run_dir}", file=sys.stderr)
        return 130
    for key, value in summary["metrics"].items():
        ref = summary["references"].get(key)
        shown = f"{value:.6g}" if isinstance(value, float) else str(value)
        extra = f"   (seed: {ref['value']:g})" if ref else ""
        print(f"{key:<28} {shown}{extra}")
    print(f"wall time {summary['wall_time_s']:.1f} s; results in {run_dir}", file=sys.stderr)
    return 0


def _new_run_dir(name: str) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = Path("runs") / f"{name}-{stamp}"
    n = 1
    while path.exists():
        n += 1
        path = Path("runs") / f"{name}-{stamp}-{n}"
    return path


def _report(args: argparse.Namespace) -> int:
    from neuralode.experiments.report import ReportError, write_report

    out = args.out
    if out is None:
        out = args.run_dirs[0] / "report.html" if len(args.run_dirs) == 1 else Path("report.html")
    try:
        write_report(args.run_dirs, out)
    except ReportError as exc:
        raise _Fail(str(exc)) from None
    print(f"wrote {out}", file=sys.stderr)
    return 0
