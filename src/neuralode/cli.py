"""The ``neuralode`` command: list, run and report experiments, download data.

::

    neuralode list
    neuralode run NAME [--set key=value ...] [--out DIR] [--resume] [--device auto|cpu|cuda] [--seed N]
    neuralode run NAME --resume [--out DIR] [--set data_dir=DIR data_path=FILE]   (the data moved)
    neuralode report RUN_DIR [RUN_DIR ...] [--out FILE]
    neuralode download SET [--to DIR]
    torchrun --nproc_per_node=N -m neuralode run NAME ...   (data-parallel training)

Every fault a user can meet ends with exit status 2 and one line naming the file or
argument and what to do, never a traceback: mistakes on the command line (an unknown
experiment or config key, a value of the wrong type, no CUDA), missing or malformed data,
a damaged checkpoint or ``config.json`` (or one the checkpoint was not trained with), a run
directory another run is using, and file-system faults (a read-only or full disk, ``--out``
naming a file). Ctrl-C (SIGTERM) ends with exit status 130 (143) and says how to go on.
docs/experiments.md has the table of every fault and what the command does about it.
"""

from __future__ import annotations

import argparse
import errno
import importlib.util
import os
import signal
import sys
import time
from pathlib import Path

__all__ = ["main"]


class _Fail(Exception):
    """A command-line error: printed as one line, exit status 2."""


def _version_line() -> str:
    from importlib.metadata import version

    from . import __version__
    return f"neuralode {__version__} (torch {version('torch')}, python {sys.version.split()[0]})"


class _EmptyPath(str):
    """An empty path argument, kept so that the command can refuse it in one line (``Path("")`` is ``.``)."""


def _path(text: str) -> Path | _EmptyPath:
    return Path(text) if text.strip() else _EmptyPath(text)


def _check_paths(args: argparse.Namespace) -> None:
    values = [("--out", getattr(args, "out", None)), ("--to", getattr(args, "to", None))]
    values += [("RUN_DIR", d) for d in getattr(args, "run_dirs", None) or ()]
    for name, value in values:
        if isinstance(value, _EmptyPath):
            default = {"--out": " (or leave --out out: runs/NAME-TIMESTAMP for a run, RUN_DIR/report.html "
                                "for a report)", "--to": " (or leave --to out: the user cache)"}.get(name, "")
            raise _Fail(f"{name} is an empty path; name a directory or file{default}")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="neuralode", description="Run the neural ODE experiments and report on them."
    )
    parser.add_argument("--version", action="version",
                        version=_version_line())
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    sub.add_parser("list", help="name the experiments, one line each")

    run = sub.add_parser("run", help="train an experiment into a run directory")
    run.add_argument("name", metavar="NAME", help="experiment name (see `neuralode list`)")
    run.add_argument("--set", dest="overrides", metavar="KEY=VALUE", nargs="+", action="extend",
                     default=[], help="override config fields, e.g. --set steps=200 lr=0.01")
    run.add_argument("--out", type=_path, help="run directory (default: runs/NAME-TIMESTAMP)")
    run.add_argument("--resume", action="store_true",
                     help="continue the run in --out (default: the newest runs/NAME-*) from its checkpoint")
    run.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                     help="auto (default): CUDA when torch sees a GPU, else the CPU")
    run.add_argument("--seed", type=int, help="same as --set seed=N")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")

    report = sub.add_parser("report", help="write one self-contained HTML page for runs")
    report.add_argument("run_dirs", metavar="RUN_DIR", nargs="+", type=_path)
    report.add_argument("--out", type=_path,
                        help="HTML file (default: RUN_DIR/report.html for one run, else report.html)")

    from neuralode.data.locate import DATASETS

    download = sub.add_parser("download", help="fetch a data set into the user cache, with checksums")
    download.add_argument("dataset", metavar="SET", choices=sorted(DATASETS),
                          help=f"one of {', '.join(sorted(DATASETS))}")
    download.add_argument("--to", type=_path, help="directory (default: the user cache, see docs/data.md)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        _check_paths(args)
        if args.command == "list":
            return _list()
        if args.command == "run":
            return _run(args)
        if args.command == "download":
            return _download(args)
        return _report(args)
    except _Fail as exc:
        return _say(str(exc))
    except KeyboardInterrupt:
        return _interrupted(args)
    except ValueError as exc:
        from neuralode._errors import NonFiniteInputError
        from neuralode.experiments import ConfigError

        if isinstance(exc, ConfigError):
            return _say(str(exc))
        if not (isinstance(exc, NonFiniteInputError) and args.command == "run"):
            raise
        # (a diverged encoder handed the solve a NaN initial state: the same failure as a blown-up solve)
        return _solve_failed(exc, args)
    except OSError as exc:
        return _say(_file_fault(exc, args))
    except MemoryError as exc:
        if args.command != "run":
            raise
        return _out_of_memory(exc, args)
    except RuntimeError as exc:
        from neuralode import SolverError

        if args.command == "run" and _is_allocation_failure(exc):
            return _out_of_memory(exc, args)
        if not isinstance(exc, SolverError) or args.command != "run":
            raise
        return _solve_failed(exc, args)


# torch's allocators fail with a RuntimeError (torch.cuda.OutOfMemoryError on a GPU), not MemoryError.
_ALLOCATION_FAILURES = ("can't allocate memory", "DefaultCPUAllocator", "out of memory", "Cannot allocate memory")


def _is_allocation_failure(exc: RuntimeError) -> bool:
    return any(text in str(exc) for text in _ALLOCATION_FAILURES)


def _out_of_memory(exc: BaseException, args: argparse.Namespace) -> int:
    """A size in the config asked for more memory than there is: one line, exit 2, not torch's traceback."""
    import re

    asked = re.search(r"allocate ([0-9.]+ ?[KMGTP]i?B|\d+ bytes)", str(exc), re.IGNORECASE)
    what = f" (an allocation of {asked.group(1)} failed)" if asked else ""
    run_dir = getattr(args, "run_dir", None)
    from neuralode.experiments.runner import CHECKPOINT

    kept = (f"the last checkpoint in {run_dir} is intact" if run_dir is not None
            and (Path(run_dir) / CHECKPOINT).exists() else "no checkpoint was written")
    return _say(f"{args.name}: memory ran out{what}; {kept}. Choose smaller sizes (data set size, batch_size, "
                f"hidden widths: --set KEY=VALUE) or free memory, then run again")


def _solve_failed(exc: Exception, args: argparse.Namespace) -> int:
    """A solve inside training failed or got a non-finite start: one line, exit 2. The model's ODE blew up
    (or got stiff): a property of this config, not a bug to trace."""
    run_dir = getattr(args, "run_dir", None)
    from neuralode.experiments.runner import CHECKPOINT

    kept = (f"The last checkpoint in {run_dir} is intact; " if run_dir is not None
            and (Path(run_dir) / CHECKPOINT).exists() else f"No checkpoint was written in {run_dir}; ")
    said = str(exc).rstrip()
    said += "" if said.endswith(".") else "."
    # The solver's own advice names options={'max_num_steps': N}; from the command line that is max_steps.
    cap = " or a larger --set max_steps" if "max_num_steps" in said else ""
    return _say(f"training stopped, a solve failed: {said} {kept}"
                f"start a new run with a smaller lr (or other tolerances / method{cap})")


def _interrupted(args: argparse.Namespace) -> int:
    """Ctrl-C outside the training loop's own handling (start-up, the final report, a second Ctrl-C):
    one line, exit status 130, and how to go on."""
    run_dir = getattr(args, "run_dir", None)
    if args.command != "run" or run_dir is None:
        print(f"neuralode: interrupted; run `neuralode {args.command} ...` again to finish", file=sys.stderr)
        return 130
    from neuralode.experiments.runner import CHECKPOINT

    if (Path(run_dir) / CHECKPOINT).exists():
        print(f"neuralode: interrupted; the last checkpoint is intact, continue with "
              f"`neuralode run {args.name} --resume --out {run_dir}`", file=sys.stderr)
    else:
        print(f"neuralode: interrupted before the first checkpoint; run the same command again "
              f"(with --out {run_dir}: the directory is reused)", file=sys.stderr)
    return 130


def _say(message: str) -> int:
    # One line: messages quoting a loader's multi-line text are folded.
    print(f"neuralode: error: {' '.join(message.split())}", file=sys.stderr)
    return 2


def _file_fault(exc: OSError, args: argparse.Namespace) -> str:
    """One line for a file-system fault: the file, the system's reason, and what to do."""
    where = exc.filename if exc.filename is not None else "a file"
    reason = exc.strerror or str(exc) or type(exc).__name__
    run_dir = getattr(args, "run_dir", None)
    from neuralode.experiments.runner import CHECKPOINT

    # Only a checkpoint makes --resume continue: before the first one, the same command starts again.
    resume = (f"neuralode run {args.name} --resume --out {run_dir}" if args.command == "run" and run_dir is not None
              and (Path(run_dir) / CHECKPOINT).exists() else None)
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        fix = "free space on that disk" + (
            f", then continue with `{resume}` (the last checkpoint and everything saved are intact)"
            if resume else " and run the command again" + (
                " (no checkpoint was written yet; the same --out is reused)"
                if args.command == "run" and run_dir is not None else ""))
    elif exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        fix = ("make it writable or choose another --out" if args.command in ("run", "report")
               else "make it readable/writable or choose another directory")
    elif exc.errno in (errno.ENOTDIR, errno.EEXIST, errno.EISDIR):
        fix = "a file stands where a directory is needed (or the reverse); choose another path"
    elif exc.errno == errno.ENOENT:
        fix = "check the path"
    else:
        fix = "check the path and the disk, then run again" + (
            f" (`{resume}` continues from the last checkpoint)" if resume else "")
    return f"{where}: {reason}; {fix}"


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


def _device(requested: str) -> str:
    import torch

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise _Fail("--device cuda: CUDA is not available to torch here; use --device cpu "
                    "(or install a CUDA build of torch)")
    return requested


def _run(args: argparse.Namespace) -> int:
    from neuralode.experiments import ConfigError, apply_overrides, get_experiment, train
    from neuralode.experiments.config import config_from_dict
    from neuralode.experiments.runner import holds_run, read_run_config

    experiment = get_experiment(args.name)
    missing = [m for m in ("matplotlib", "tqdm") if importlib.util.find_spec(m) is None]
    if missing:
        raise _Fail(f"`neuralode run` needs {' and '.join(missing)}: pip install 'neuralode[cli]'")
    device = _device(args.device)

    if args.resume:
        run_dir = args.out if args.out is not None else _latest_run(args.name)
        args.run_dir = run_dir
        from neuralode.experiments.runner import DATA_LOCATION_KEYS

        keys = [item.partition("=")[0].strip() for item in args.overrides]
        other = [key for key in keys if key not in DATA_LOCATION_KEYS]
        if other or args.seed is not None:
            raise _Fail(f"--resume continues a run with its saved config.json; drop "
                        f"{'--seed' if args.seed is not None else '--set ' + other[0]} (with --resume, --set "
                        f"takes only {' and '.join(DATA_LOCATION_KEYS)}, for data that moved; start a new run to "
                        f"change the config)")
        if run_dir.exists() and not run_dir.is_dir():
            raise _Fail(f"--out {run_dir} is a file, not a run directory")
        if not (run_dir / "config.json").exists() and not (run_dir / "checkpoints").exists():
            raise _Fail(f"--resume: nothing to resume in {run_dir} (no config.json, no checkpoint); "
                        f"run without --resume to start a new run")
        saved = read_run_config(run_dir)
        if saved.get("experiment") != args.name:
            raise _Fail(f"--resume: {run_dir} is a run of {saved.get('experiment')!r}, "
                        f"not {args.name!r}")
        try:
            config = config_from_dict(experiment.Config, saved["config"], strict=True)
        except (TypeError, ValueError, AttributeError) as exc:
            raise _Fail(f"{run_dir / 'config.json'} is not a valid {args.name} config ({exc}); restore it (the "
                        f"checkpoint was trained with the values it held) or start a new run in another --out"
                        ) from None
        # Where the data are now (the run directory's config.json records where they were); a key this
        # experiment does not have is refused by name.
        config = apply_overrides(config, list(args.overrides))
    else:
        config = experiment.Config()
        overrides = list(args.overrides)
        if args.seed is not None:
            overrides.append(f"seed={args.seed}")
        try:
            config = experiment.resolve(apply_overrides(config, overrides))
        except ConfigError as exc:
            if args.seed is not None and str(exc).startswith(f"--set seed={args.seed}:"):
                raise _Fail(f"--seed {args.seed}:{str(exc).split(':', 1)[1]}") from None
            raise
        except (ValueError, TypeError, ArithmeticError) as exc:
            # A check no field declares, failing inside an experiment's resolve: still the config's fault.
            raise _Fail(f"{args.name}: {exc}") from None
        run_dir = args.out if args.out is not None else _new_run_dir(args.name)
        args.run_dir = run_dir
        if run_dir.exists() and not run_dir.is_dir():
            raise _Fail(f"--out {run_dir} is a file; pass a directory for the run (it is created)")
        if holds_run(run_dir):
            raise _Fail(f"{run_dir} already holds a run; pass --resume to continue it "
                        f"or choose another --out")

    # Under torchrun every process runs this command; rank 0 alone prints and writes files.
    from neuralode.experiments import distributed

    context = distributed.from_environment(run_dir, device)  # None in one process
    summary = None
    try:
        if context is not None:
            run_dir = context.run_dir
        if context is None or context.is_main:
            verb = "resuming" if args.resume else "running"
            print(f"{verb} {args.name} in {run_dir} on {device if context is None else context.device}",
                  file=sys.stderr)
        summary = train(experiment, config, run_dir, device=device if context is None else context.device,
                        resume=args.resume, progress=not args.no_progress, context=context)
    finally:
        if context is not None:
            distributed.shutdown(completed=summary is not None)
    if context is not None:
        code = _report_summary(args, run_dir, summary) if context.is_main else (
            0 if summary["status"] == "completed" else 130)
        # A torchrun worker leaves without the interpreter's teardown: gloo's threads can outlive the destroyed
        # group and abort the process in a C++ destructor at exit ("terminate called without an active
        # exception", SIGABRT), turning a completed run into a failed one. That happened after the barrier
        # above was added too (a DDP test under load, 2026-11-28). Every file is written and closed by now.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return _report_summary(args, run_dir, summary)


def _report_summary(args: argparse.Namespace, run_dir: Path, summary: dict) -> int:
    """Print the end of a run (rank 0 / one process) and return the exit status."""
    if summary["status"] != "completed":
        by = f" by {summary['signal']}" if summary.get("signal") else ""
        print(f"stopped{by} at step {summary['steps_done']}/{summary['steps']}; continue with\n"
              f"  neuralode run {args.name} --resume --out {run_dir}", file=sys.stderr)
        # 128 + the signal, as a shell reports a process the signal ended: 130 for Ctrl-C, 143 for SIGTERM.
        return 128 + getattr(signal.Signals, summary.get("signal") or "SIGINT", signal.SIGINT)
    for key, value in summary["metrics"].items():
        ref = summary["references"].get(key)
        shown = f"{value:.6g}" if isinstance(value, float) else str(value)
        extra = f"   (seed: {ref['value']:g})" if ref else ""
        print(f"{key:<28} {shown}{extra}")
    print(f"wall time {summary['wall_time_s']:.1f} s on {summary['device']}; results in {run_dir}",
          file=sys.stderr)
    return 0


def _download(args: argparse.Namespace) -> int:
    from neuralode.data.locate import download

    try:
        where = download(args.dataset, args.to)
    except (ValueError, ConnectionError) as exc:
        raise _Fail(str(exc)) from None
    print(f"{args.dataset}: files verified in {where}", file=sys.stderr)
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
    args.run_dir = None
    try:
        write_report(args.run_dirs, out)
    except ReportError as exc:
        raise _Fail(str(exc)) from None
    print(f"wrote {out}", file=sys.stderr)
    return 0
