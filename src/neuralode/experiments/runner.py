"""The one training loop, the run directory and checkpoints.

Run directory layout::

    RUN_DIR/
      config.json          experiment name + the resolved config (+ how it was run)
      metrics.jsonl        one JSON object per line: {"step", "epoch", "split", ...}
      plots/*.png          loss curve and the experiment's figures
      checkpoints/last.pt  model, optimiser, step/epoch position, RNG states, experiment state
      summary.json         final metrics, seed-document references, wall time, status

The loop is written so that it can later run under ``torchrun`` with
DistributedDataParallel: every file is written through :class:`RunContext`, which only
writes on rank 0, and logged scalars pass through ``RunContext.reduce`` (the identity
for one process, an all-reduce mean for several).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import gzip
import io
import json
import math
import os
import pickle
import random
import signal
import tarfile
import time
import warnings
import zipfile
import zlib
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch

from .base import Experiment, Position
from .config import (CheckpointError, ConfigError, DataError, FieldError, RunConfig, config_from_dict,
                     config_to_dict)

__all__ = [
    "CHECKPOINT",
    "figure",
    "Hook",
    "RunContext",
    "holds_run",
    "json_safe",
    "load_checkpoint",
    "read_metrics",
    "read_run_config",
    "save_checkpoint",
    "train",
]

CHECKPOINT = Path("checkpoints") / "last.pt"
_FORMAT = 1
#: Config keys that say where the data are, not what was trained: ``--resume`` may change them (the data
#: set moved), and the check that a checkpoint belongs to its config.json leaves them out.
DATA_LOCATION_KEYS = ("data_dir", "data_path")


def _identity(config: Any) -> Any:
    """A config dict (as JSON) without its data location keys: what must match for a resume."""
    config = _jsonable(config)
    return {k: v for k, v in config.items() if k not in DATA_LOCATION_KEYS} if isinstance(config, dict) else config


class Hook:
    """Called by the loop after each step's logging, evaluation and checkpoint."""

    def after_step(self, run: RunContext, position: Position, record: dict) -> None:
        pass


@dataclasses.dataclass
class RunContext:
    """The run directory and the process's place in a distributed run (one process here;
    see :mod:`neuralode.experiments.distributed` for several)."""

    run_dir: Path
    device: torch.device
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def reduce(self, scalars: dict[str, float]) -> dict[str, float]:
        """Mean of logged scalars over ranks (one process: unchanged)."""
        return scalars

    def barrier(self) -> None:
        """Wait for every rank (one process: nothing to wait for)."""

    def any_rank(self, flag: bool) -> bool:
        """True if ``flag`` is true on any rank (one process: ``flag``). Decisions that end the loop
        go through this, so no rank leaves while the others wait in a collective."""
        return flag

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """The module the loss is computed with: ``model`` itself in one process,
        ``DistributedDataParallel(model)`` in a distributed run
        (:class:`neuralode.experiments.distributed.DistributedContext`)."""
        return model

    def path(self, *parts: str) -> Path:
        return self.run_dir.joinpath(*parts)

    def save_figure(self, fig: Any, name: str) -> Path:
        """Write a matplotlib figure to ``plots/NAME.png`` (rank 0 only).

        Make figures with :func:`figure` (a bare ``matplotlib.figure.Figure`` drawn by the
        Agg canvas): no pyplot, so no global state and no GUI backend is touched."""
        out = self.path("plots", f"{name}.png")
        if self.is_main:
            # Atomic like every other file of the run: a full disk leaves the previous PNG (or
            # none), never a truncated one.
            # 150 dpi: a 6-inch figure fills the report's column and stays sharp when opened larger.
            _atomic_write(out, lambda f: fig.savefig(f, format="png", dpi=150, bbox_inches="tight"))
        return out

    def write_json(self, name: str, data: dict) -> None:
        if self.is_main:
            _atomic_write_bytes(self.path(name), (_dumps(data, indent=2) + "\n").encode())

    def history(self) -> list[dict]:
        """All records written to ``metrics.jsonl`` so far (also those before a resume).

        Non-finite values, stored as ``null``, come back as NaN, as they were logged: the
        experiments' plots and summaries do arithmetic on them."""
        return [{k: math.nan if v is None else v for k, v in r.items()} for r in read_metrics(self.run_dir)]


def figure(**kwargs: Any):
    """A new matplotlib Figure rendered with Agg (PNG), independent of pyplot."""
    from matplotlib.figure import Figure

    return Figure(**kwargs)


# -- files ----------------------------------------------------------------------------


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def _atomic_write(path: Path, write) -> None:
    """Write through a temporary file in the same directory, fsync, then ``os.replace``:
    a crash at any point leaves either the old file or the new one, never a torn one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:  # a read-only file system refuses this too (EROFS): the write's own error is the one to tell
            pass
        if isinstance(exc, OSError) and exc.filename in (None, str(tmp)) and exc.errno is not None:
            # Name the file being written, not the hidden temporary one (same errno, same subclass); a
            # failing write() or fsync() (a full disk) names no file at all.
            raise OSError(exc.errno, exc.strerror, str(path)) from None
        raise
    _fsync_dir(path.parent)


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    _atomic_write(path, lambda f: f.write(data))


def save_checkpoint(path: Path, payload: dict) -> None:
    """Atomically write a checkpoint (see ``_atomic_write``).

    The checkpoint is serialised in memory first and written with one plain ``write``: torch's
    zip writer turns a failing write (a full disk) into a RuntimeError without an errno
    ("unexpected pos 704 vs 598"), while a plain write raises ``OSError(ENOSPC)``, which the
    command reports as what it is."""
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    _atomic_write(Path(path), lambda f: f.write(buffer.getbuffer()))


def load_checkpoint(path: Path, device: torch.device | str = "cpu") -> dict:
    """Load a checkpoint written by :func:`save_checkpoint`.

    ``weights_only=True``: checkpoints hold only tensors and plain values (RNG states
    included), so loading one never runs pickled code, and a file that needs more than that is
    refused, never loaded "unsafely".

    Raises
    ------
    CheckpointError
        If the file is empty, truncated, not a torch checkpoint or holds other objects; the
        message names the file and what to do (torch's own advice to retry with
        ``weights_only=False`` is deliberately not passed on: that would run arbitrary code).
    """
    path = Path(path)
    try:
        with warnings.catch_warnings():  # torch's pickle-protocol chatter is no help to a user
            warnings.simplefilter("ignore")
            return torch.load(path, map_location=device, weights_only=True)
    except (FileNotFoundError, PermissionError, IsADirectoryError):
        raise
    except Exception as exc:  # noqa: BLE001 - torch's reader fails with a zoo of types (struct.error,
        # RuntimeError from miniz, EOFError, UnpicklingError, ...) on a damaged file.
        why = _why_unloadable(path, exc)
    raise CheckpointError(
        f"checkpoint {path} cannot be loaded: {why}. Delete it and resume again to restart the run "
        f"from step 0 with its saved config, or restore an intact copy"
    ) from None


def _why_unloadable(path: Path, exc: Exception) -> str:
    """Why ``torch.load`` failed on ``path``, in a user's words. Our checkpoints are zip archives:
    one that is empty or starts like a zip but lacks its end was cut short; a zip whose pickle names
    a class or function (an ``Unsupported global``) holds objects we never load; anything else
    (random bytes, a plain pickle, a text file) is not a torch checkpoint at all."""
    with open(path, "rb") as f:
        head = f.read(4)
    if not head:
        return "it is empty or truncated"
    if head == b"PK\x03\x04" and not zipfile.is_zipfile(path):
        return "it is empty or truncated"
    if isinstance(exc, pickle.UnpicklingError) and "global" in str(exc).lower():
        return "it holds objects other than tensors and plain values, which are never loaded"
    if head != b"PK\x03\x04":
        return "it is not a torch checkpoint (damaged, or a file of another kind)"
    if isinstance(exc, EOFError) or "central directory" in str(exc):
        return "it is empty or truncated"
    return "it is not a readable torch checkpoint"


def read_run_config(run_dir: Path) -> dict:
    """``RUN_DIR/config.json`` as a dict; CheckpointError naming the file if it is missing or damaged."""
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        if (Path(run_dir) / CHECKPOINT).exists():
            raise CheckpointError(f"{run_dir} has a checkpoint but no config.json, which resume needs; "
                                  f"restore {path}, or start a new run in another --out")
        raise CheckpointError(f"nothing to resume in {run_dir}: no {path}; run without --resume "
                              f"to start a new run there")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(
            f"{path} is not valid JSON ({exc.__class__.__name__} at {getattr(exc, 'pos', '?')}: truncated "
            f"or edited?); restore it, or start a new run in another --out (the checkpoint cannot be "
            f"resumed without the config it was trained with)") from None
    if not isinstance(data, dict) or not isinstance(data.get("config"), dict) or "experiment" not in data:
        raise CheckpointError(f"{path} is not a neuralode run config (no 'experiment' and 'config'); "
                              f"restore it or start a new run in another --out")
    return data


def json_safe(value: Any) -> Any:
    """``value`` with every non-finite float replaced by ``None`` (JSON has no NaN or
    infinity: ``json.dumps`` would write the bare token ``NaN``, which strict readers reject)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, np.generic):
        return json_safe(value.item())
    return value


def _dumps(value: Any, **kwargs: Any) -> str:
    return json.dumps(json_safe(value), allow_nan=False, **kwargs)


def read_metrics(run_dir: Path) -> list[dict]:
    """The records of ``RUN_DIR/metrics.jsonl`` (``[]`` if there is none yet).

    Non-finite values were written as ``null`` and come back as ``None``."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    with open(path, "rb") as f:
        return _parse_metrics(path, f.read())


def _parse_metrics(path: Path, data: bytes, checkpoint_step: int | None = None) -> list[dict]:
    """The records of ``data`` (the bytes of ``path``); CheckpointError naming the first damaged line.

    ``checkpoint_step`` is given where ``data`` is the part the checkpoint counts (checked on
    ``--resume``): a record lost there cannot be logged again, so the advice differs."""
    records = []
    for number, line in enumerate(data.split(b"\n"), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line.decode("utf-8"))
        except (ValueError, UnicodeDecodeError):
            record = None
        if not isinstance(record, dict):
            if checkpoint_step is None:
                fix = ("repair or delete that line (a run stopped since its last checkpoint continues with "
                       "--resume, which cuts the file back to it)")
            else:
                fix = (f"it holds a record the checkpoint at step {checkpoint_step} counts, so the run cannot be "
                       f"resumed exactly; restore the file from a copy, or start a new run in another --out")
            raise CheckpointError(f"{path} line {number} is not a JSON record (a torn or edited line); {fix}")
        records.append(record)
    return records


class _MetricsWriter:
    def __init__(self, path: Path, enabled: bool):
        self.path = path
        self.enabled = enabled
        self._file = open(path, "a", encoding="utf-8") if enabled else None

    def write(self, record: dict) -> None:
        if self._file is not None:
            with self._named():
                self._file.write(_dumps(record) + "\n")
                self._file.flush()

    def offset(self) -> int:
        return self._file.tell() if self._file is not None else 0

    def close(self) -> None:
        if self._file is not None:
            with self._named():  # a write that failed left its line buffered: closing tries it again
                self._file.close()

    @contextlib.contextmanager
    def _named(self):
        """Name this file in an OSError that names none (write() and flush() on a full disk)."""
        try:
            yield
        except OSError as exc:
            if exc.filename is not None or exc.errno is None:
                raise
            raise OSError(exc.errno, exc.strerror, str(self.path)) from None


# -- RNG states -----------------------------------------------------------------------


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _rng_state(device: torch.device) -> dict:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "python": random.getstate(),
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"].cpu())
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    random.setstate(_tuples(state["python"]))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def _tuples(x: Any) -> Any:
    # random.setstate insists on tuples; a checkpoint round trip may give lists.
    return tuple(_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x


# -- the loop -------------------------------------------------------------------------


def _scalar(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().item()
    if isinstance(value, np.generic):
        return value.item()
    return value


def _position(step: int, per_epoch: int) -> Position:
    return Position(step=step, epoch=step // per_epoch, index=step % per_epoch)


class _RunLock:
    """An exclusive ``flock`` on ``RUN_DIR/.lock``, held while a process trains in the directory.

    The kernel drops the lock when its process ends however it ends (SIGKILL included), so a lock is
    never stale; the file is removed on release. ``holder`` is the pid of the process that holds it
    when this one could not take it (``None``: taken). The directory is created if need be, and
    removed again by ``release(remove_dir=True)`` if it was created here and is empty."""

    NAME = ".lock"

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self.created = not self.run_dir.exists()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / self.NAME
        self.holder: str | None = None
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    os.close(fd)
                    raise
                self.holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                self.fd = None
                return
            try:  # the holder may have removed the file between our open and flock: lock the new one
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        self.fd = fd
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())

    def release(self, remove_dir: bool = False) -> None:
        if self.fd is None:
            return
        self.path.unlink(missing_ok=True)
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
        self.fd = None
        if remove_dir and self.created:
            try:
                self.run_dir.rmdir()
            except OSError:  # something else was put there meanwhile: leave it
                pass


class _StopRequest:
    """Turns SIGINT (Ctrl-C) and SIGTERM (``kill``, a scheduler's or container's stop) into a request
    honoured between steps, so the loop stops at a step boundary with a fresh checkpoint instead of
    half-way through an update. ``signum`` is the signal that asked; the previous handlers are
    restored on leaving."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.requested = False
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self):
        for signum in self.SIGNALS:
            try:
                self._previous[signum] = signal.signal(signum, self._handle)
            except ValueError:  # not the main thread: leave the signals alone
                break
        return self

    def _handle(self, signum, frame):
        if self.requested:  # a second signal stops at once
            raise KeyboardInterrupt
        self.requested, self.signum = True, signum

    def __exit__(self, *exc):
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous = {}
        return False


def train(
    experiment: type[Experiment],
    config: RunConfig,
    run_dir: str | os.PathLike,
    *,
    device: str | torch.device = "cpu",
    resume: bool = False,
    progress: bool = True,
    hooks: Iterable[Hook] = (),
    context: RunContext | None = None,
) -> dict:
    """Train ``experiment`` with ``config`` in ``run_dir``; return the summary.

    With ``resume=True`` the run continues from ``run_dir/checkpoints/last.pt``: the
    model, optimiser, experiment state, RNG states and data position are restored and
    ``metrics.jsonl`` is cut back to what had been written at that checkpoint, so the
    finished run is the same as one that was never stopped.

    A directory that holds a ``config.json`` but no checkpoint and no summary (a run killed
    before its first checkpoint, or one that stopped on missing data) holds nothing worth
    keeping: ``resume=True`` starts it afresh with its saved config, and ``resume=False``
    reuses it for ``config``. Either way its old metrics, plots and summary are removed
    first, so every record of ``metrics.jsonl`` is written exactly once.

    Raises
    ------
    ConfigError
        The directory already holds a run (and ``resume`` is False), or ``config`` differs
        from the saved one.
    CheckpointError
        The checkpoint, ``config.json`` or ``metrics.jsonl`` cannot be resumed from.
    DataError
        The experiment's ``setup()`` could not read its data.
    OSError
        A file-system fault while writing (full disk, no permission); what was saved before
        stays intact (every file but ``metrics.jsonl`` is replaced atomically, and resume cuts
        ``metrics.jsonl`` back to the checkpoint).
    """
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:  # record which GPU, not just "cuda"
        device = torch.device("cuda", torch.cuda.current_device())
    run_dir = Path(run_dir)
    run = context or RunContext(run_dir=run_dir, device=device)
    try:
        config = experiment.resolve(config)
    except ConfigError:
        raise
    except (ValueError, TypeError, ArithmeticError) as exc:  # a check inside resolve (e.g. a data path)
        raise ConfigError(f"{experiment.name}: {exc}") from None
    ckpt_path = run.path(str(CHECKPOINT))
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"run directory {run_dir} is a file, not a directory; choose another --out")

    # One process at a time in a run directory: a second `neuralode run` into the same --out would
    # interleave its records and checkpoints with the first's. Rank 0 holds the lock for all ranks.
    lock = _RunLock(run.run_dir) if run.is_main else None
    if run.any_rank(lock is not None and lock.holder is not None):
        holder = lock.holder if lock is not None else "?"
        raise ConfigError(f"{run_dir} is in use by another neuralode process (pid {holder}); wait for it to "
                          f"finish (or stop it), or choose another --out")
    wrote = False
    try:
        checkpoint = None
        started = run.path("config.json").exists()
        recorded = _jsonable(config_to_dict(config))  # what config.json holds for this run
        if resume:
            if not ckpt_path.exists() and not started:
                raise ConfigError(
                    f"cannot resume: no checkpoint at {ckpt_path} and no config.json in {run_dir}; "
                    f"start a new run without --resume"
                )
            saved_raw = read_run_config(run_dir)["config"]
            # Compared after resolving both: a run written before its defaults were resolved
            # differently (e.g. a relative data_dir, now recorded as an absolute path) still resumes.
            # The data location is the one given now (resolving the recorded one would look for data that moved).
            now = _jsonable(config_to_dict(config))
            moved = {k: now[k] for k in DATA_LOCATION_KEYS if k in saved_raw and k in now and now[k] != saved_raw[k]}
            saved = _resolved_dict(experiment, type(config), {**saved_raw, **moved}, run.path("config.json"))
            if _identity(saved) != _identity(config_to_dict(config)):
                raise ConfigError(
                    f"cannot resume {run_dir} with a different config than its config.json; "
                    f"resume with the saved config (only {' and '.join(DATA_LOCATION_KEYS)} may change: "
                    f"the data moved) or start a new run"
                )
            if ckpt_path.exists():
                # On the CPU: the RNG states must be CPU tensors (numpy's become arrays), and
                # load_state_dict copies the rest onto the model's and optimiser's device.
                checkpoint = load_checkpoint(ckpt_path, "cpu")
                _check_checkpoint(checkpoint, ckpt_path, experiment.name, run.path("metrics.jsonl"))
                _check_trained_config(checkpoint, ckpt_path, run.path("config.json"), saved_raw, saved,
                                      experiment, type(config))
                recorded = _jsonable(saved_raw)
                if moved:
                    # The data moved (--resume --set data_dir=...): config.json says where they are now, so that
                    # the next resume finds them too; the rest of what it holds is unchanged. (Without a
                    # checkpoint the run starts afresh below and writes config.json anew anyway.)
                    recorded = {**recorded, **moved}
                    run.write_json("config.json", {**read_run_config(run_dir), "config": recorded})
            elif _completed(run.path("summary.json")):
                raise CheckpointError(
                    f"cannot resume {run_dir}: it is a finished run whose checkpoint {ckpt_path} is gone; "
                    f"its results stay where they are; start a new run (another --out) to train again"
                )
        elif holds_run(run_dir):
            raise ConfigError(
                f"{run_dir} already holds a run; pass --resume to continue it or choose another --out"
            )

        # Every rank has checked the directory before rank 0 writes config.json into it.
        run.barrier()
        wrote = True
        if checkpoint is None and run.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            # A fresh start (also in a directory a stopped run left without a checkpoint):
            # nothing older than this run may stay in it.
            for stale in ("metrics.jsonl", "summary.json"):
                run.path(stale).unlink(missing_ok=True)
            for png in run.path("plots").glob("*.png") if run.path("plots").is_dir() else ():
                png.unlink()
            run.write_json(
                "config.json",
                {"experiment": experiment.name, "config": config_to_dict(config),
                 "device": str(device), "torch": torch.__version__},
            )
        run.barrier()

        # threads=0 leaves torch's own default (one thread per core) in force; the count used is
        # recorded in summary.json either way.
        previous_threads = torch.get_num_threads()
        if config.threads > 0:
            torch.set_num_threads(config.threads)
        try:
            return _train(experiment, config, run, device, checkpoint, ckpt_path, progress, hooks, recorded)
        finally:
            torch.set_num_threads(previous_threads)
    finally:
        if lock is not None:
            lock.release(remove_dir=not wrote)


def _jsonable(value: Any) -> Any:
    return json.loads(_dumps(value))


def _resolved_dict(experiment: type[Experiment], cls: type, data: Any, path: Path) -> dict:
    """The resolved config of ``data`` (a config.json's ``config``) as a dict; CheckpointError
    naming ``path`` when a field is missing, unknown, of the wrong type or out of range. Faults
    ``resolve`` finds in the world (missing data) pass as they are."""
    try:
        loaded = config_from_dict(cls, data, strict=True)
    except (TypeError, ValueError) as exc:  # its messages name the field
        why = str(exc)
    else:
        try:
            return config_to_dict(experiment.resolve(loaded))
        except FieldError as exc:
            why = f"field {exc.field}: {exc.problem}, got {exc.value!r}"
        except ConfigError:
            raise
        except (TypeError, ValueError, ArithmeticError) as exc:
            why = f"{type(exc).__name__}: {exc}"
    raise CheckpointError(f"{path} is not a valid {experiment.name} config ({why}); restore it (the checkpoint "
                          f"was trained with the values it held) or start a new run in another --out")


def _check_trained_config(checkpoint: dict, ckpt_path: Path, config_path: Path, saved_raw: dict, saved: dict,
                          experiment: type[Experiment], cls: type) -> None:
    """Refuse to resume a checkpoint with a config.json other than the one it was trained with
    (checkpoints record it; older ones do not, and their model shapes are checked on loading)."""
    trained = checkpoint.get("config")
    # Where the data are is no part of what was trained (a data set moved since is still the data set).
    if trained is None or _identity(trained) == _identity(saved_raw):
        return
    try:  # recorded differently but the same run (e.g. a data_dir written relative)?
        if _identity(config_to_dict(experiment.resolve(config_from_dict(cls, trained)))) == _identity(saved):
            return
    except (TypeError, ValueError, ArithmeticError):
        pass
    trained, now = (_identity(trained) if isinstance(trained, dict) else {}), _identity(saved_raw)
    diffs = [f"{k}: {_short(now.get(k, '(missing)'))} in config.json, {_short(trained.get(k, '(missing)'))} "
             f"when trained" for k in sorted(set(trained) | set(now)) if trained.get(k) != now.get(k)]
    raise CheckpointError(
        f"checkpoint {ckpt_path} does not match {config_path} ({'; '.join(diffs[:3])}"
        f"{'; ...' if len(diffs) > 3 else ''}): it was trained with another config. Restore those values in "
        f"config.json to continue it, or start a new run in another --out to train with the new ones")


def _short(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


def holds_run(run_dir: str | os.PathLike) -> bool:
    """Whether ``run_dir`` holds a run worth keeping: a checkpoint or a completed summary. A directory with only ``config.json`` (killed before its first checkpoint,
    stopped on missing data) does not: a new run may use it."""
    run_dir = Path(run_dir)
    return (run_dir / CHECKPOINT).exists() or _completed(run_dir / "summary.json")


def _completed(summary_path: Path) -> bool:
    try:
        return json.loads(summary_path.read_text(encoding="utf-8")).get("status") == "completed"
    except (OSError, ValueError, AttributeError):
        return False


_CHECKPOINT_KEYS = ("step", "model", "optimizer", "experiment", "rng", "metrics_offset", "elapsed_s")


def _check_checkpoint(checkpoint: Any, path: Path, name: str, metrics_path: Path) -> None:
    """What resume relies on, checked before anything is written: the checkpoint is one of
    ours, of this experiment, and ``metrics.jsonl`` still holds every record it counts."""
    if not isinstance(checkpoint, dict) or any(k not in checkpoint for k in _CHECKPOINT_KEYS):
        raise CheckpointError(
            f"checkpoint {path} is not a neuralode training checkpoint (missing "
            f"{[k for k in _CHECKPOINT_KEYS if not isinstance(checkpoint, dict) or k not in checkpoint]}); "
            f"delete it to restart the run from step 0, or restore an intact copy")
    if checkpoint.get("format", _FORMAT) != _FORMAT:
        raise CheckpointError(f"checkpoint {path} has format {checkpoint.get('format')!r}, this "
                              f"version reads format {_FORMAT}; resume it with the version that wrote it")
    if checkpoint.get("experiment_name", name) != name:
        raise CheckpointError(f"checkpoint {path} belongs to experiment "
                              f"{checkpoint.get('experiment_name')!r}, not {name!r}")
    size = metrics_path.stat().st_size if metrics_path.exists() else 0
    if size < checkpoint["metrics_offset"]:
        raise CheckpointError(
            f"{metrics_path} holds {size} bytes but the checkpoint at step {checkpoint['step']} was "
            f"written after {checkpoint['metrics_offset']}: records were lost (file deleted or cut), "
            f"and resuming would leave a gap. Restore the file, or start a new run in another --out")
    # A damaged record the checkpoint counts would only be found by finish(), after all the training.
    with open(metrics_path, "rb") if size else io.BytesIO() as f:
        _parse_metrics(metrics_path, f.read(checkpoint["metrics_offset"]), checkpoint["step"])


def _train(experiment, config, run, device, checkpoint, ckpt_path, progress, hooks, recorded) -> dict:
    t0 = time.perf_counter()  # wall time counts setup and the final plots too
    seed_everything(config.seed)
    exp = experiment(config, device)
    try:
        exp.setup()
    except ConfigError:
        raise
    except (OSError, ValueError, EOFError, tarfile.TarError, zlib.error, gzip.BadGzipFile, UnicodeDecodeError) as exc:
        # The loaders' messages name the file and the fault; say whose data it was.
        raise DataError(f"{experiment.name}: cannot load its data: {exc}") from None
    try:
        model = exp.build_model()
        optimizer = exp.build_optimizer(model)
    except ConfigError:
        raise
    except (ValueError, TypeError) as exc:
        # A value the config's declared checks let through but the model refuses: still the config's.
        raise ConfigError(f"{experiment.name}: this config cannot build its model ({exc}); change that "
                          f"value (the directory holds no checkpoint yet, so the same --out can be reused)") from None
    total, per_epoch = exp.num_steps, max(1, exp.steps_per_epoch)

    metrics_path = run.path("metrics.jsonl")
    start, elapsed = 0, 0.0
    if checkpoint is not None:
        try:
            model.load_state_dict(checkpoint["model"])
            optimizer.load_state_dict(checkpoint["optimizer"])
            exp.load_state_dict(checkpoint["experiment"])
        except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as exc:
            first = " ".join(str(exc).split()) or type(exc).__name__  # torch's text is several lines
            first = first if len(first) <= 200 else first[:197] + "..."
            raise CheckpointError(
                f"checkpoint {ckpt_path} does not match {run.path('config.json')} ({first}): it was "
                f"trained with another config (another variant or size?). Restore the config.json it was "
                f"trained with, or start a new run in another --out") from None
        _set_rng_state(checkpoint["rng"], device)
        start, elapsed = checkpoint["step"], checkpoint["elapsed_s"]
        if run.is_main and metrics_path.exists():
            # Records written after the checkpoint will be written again.
            os.truncate(metrics_path, checkpoint["metrics_offset"])
    writer = _MetricsWriter(metrics_path, run.is_main)
    # The loss sees the (possibly DDP-wrapped) module; evaluation and checkpoints the
    # unwrapped one, so checkpoints are the same whatever the number of processes.
    net = run.wrap(model)

    def checkpoint_now(step: int) -> None:
        if not run.is_main:
            return
        position = _position(step, per_epoch)
        save_checkpoint(ckpt_path, {
            "format": _FORMAT,
            "experiment_name": experiment.name,
            "config": recorded,  # config.json's config: resume refuses another one
            "step": step,
            "epoch": position.epoch,
            "index": position.index,
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "experiment": exp.state_dict(),
            "rng": _rng_state(device),
            "metrics_offset": writer.offset(),
            "elapsed_s": elapsed + (time.perf_counter() - t0),
        })

    def evaluate(position: Position) -> dict:
        model.eval()
        scalars = {k: _scalar(v) for k, v in exp.evaluate(model, position, run).items()}
        model.train()
        if scalars:
            writer.write({"step": position.step, "epoch": position.epoch, "split": "eval",
                          **run.reduce(scalars)})
        return scalars

    bar = None
    if progress and run.is_main:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, initial=start, desc=experiment.name, unit="step",
                   dynamic_ncols=True, mininterval=0.5)

    status = "completed"
    if start == 0 and config.eval_every:
        evaluate(_position(0, per_epoch))
    try:
        with _StopRequest() as stop:
            model.train()
            for step in range(start, total):
                position = _position(step, per_epoch)
                batch = exp.batch(position)
                loss, extra = exp.train_step(net, batch, position, optimizer)
                done = _position(step + 1, per_epoch)
                record: dict = {}
                if done.step % config.log_every == 0 or done.step == total:
                    scalars = run.reduce({"loss": _scalar(loss), **{k: _scalar(v) for k, v in extra.items()}})
                    record = {"step": done.step, "epoch": done.epoch, "split": "train", **scalars}
                    writer.write(record)
                if config.eval_every and done.step % config.eval_every == 0 and done.step != total:
                    record = {**record, **evaluate(done)}
                if done.step % config.checkpoint_every == 0 and done.step != total:
                    checkpoint_now(done.step)
                if bar is not None:
                    bar.update(1)
                    if "loss" in record:
                        bar.set_postfix(loss=f"{record['loss']:.4g}", refresh=False)
                for hook in hooks:
                    hook.after_step(run, done, record)
                if run.any_rank(stop.requested) and done.step != total:
                    checkpoint_now(done.step)
                    status = "interrupted"
                    break
            else:
                final = _position(total, per_epoch)
                # A checkpoint at the last step was written after the final evaluation: a
                # resume from it (plots or summary were cut short) must not log it twice.
                if checkpoint is None or start < total:
                    evaluate(final)
                    checkpoint_now(total)
                # A stop asked for during the last step, the final evaluation or checkpoint: honoured before
                # the final report (which --resume redoes from the checkpoint at the last step), not lost.
                if run.any_rank(stop.requested):
                    done, status = final, "interrupted"
    finally:
        if bar is not None:
            bar.close()
        writer.close()

    if status == "interrupted":
        wall = elapsed + (time.perf_counter() - t0)
        summary = {"experiment": experiment.name, "status": status, "steps_done": done.step,
                   "steps": total, "wall_time_s": wall}
        if stop.signum is not None:
            summary["signal"] = signal.Signals(stop.signum).name
        run.write_json("summary.json", summary)
        return summary

    try:
        metrics = {k: _scalar(v) for k, v in exp.finish(model, run).items()}
        if experiment.loss_plot:
            _plot_loss(run)
    except (ValueError, TypeError, ArithmeticError, IndexError, KeyError) as exc:
        if isinstance(exc, ConfigError):
            raise
        # The trained model is in the final checkpoint: say so, and that --resume redoes only this part.
        raise ConfigError(
            f"{experiment.name}: training finished (checkpoint {ckpt_path} at step {total} holds the trained "
            f"model) but the final report failed: {type(exc).__name__}: {exc}. Once the cause is fixed, "
            f"resuming the run (--resume) redoes only the final report; or start a new run in another --out"
        ) from None
    wall = elapsed + (time.perf_counter() - t0)
    summary = {
        "experiment": experiment.name,
        "status": status,
        "steps": total,
        "epochs": math.ceil(total / per_epoch),
        "seed": config.seed,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "wall_time_s": wall,
        "metrics": metrics,
        "references": {k: dataclasses.asdict(r) for k, r in experiment.references.items()},
    }
    run.write_json("summary.json", summary)
    return summary


def _plot_loss(run: RunContext) -> None:
    records = [r for r in run.history() if r.get("split") == "train" and "loss" in r]
    if len(records) < 2 or not run.is_main:  # one point is no curve
        return
    steps = [r["step"] for r in records]
    loss = [r["loss"] for r in records]
    fig = figure(figsize=(6, 3.5))
    ax = fig.subplots()
    ax.plot(steps, loss, lw=1.2)
    if all(math.isfinite(v) and v > 0 for v in loss):
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.grid(alpha=0.3)
    run.save_figure(fig, "loss")
