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

import dataclasses
import json
import math
import os
import random
import signal
import time
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch

from .base import Experiment, Position
from .config import ConfigError, RunConfig, config_to_dict

__all__ = [
    "CHECKPOINT",
    "figure",
    "Hook",
    "RunContext",
    "load_checkpoint",
    "read_metrics",
    "save_checkpoint",
    "train",
]

CHECKPOINT = Path("checkpoints") / "last.pt"
_FORMAT = 1


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
            out.parent.mkdir(parents=True, exist_ok=True)
            fig.savefig(out, dpi=110, bbox_inches="tight")
        return out

    def write_json(self, name: str, data: dict) -> None:
        if self.is_main:
            _atomic_write_bytes(self.path(name), (json.dumps(data, indent=2) + "\n").encode())

    def history(self) -> list[dict]:
        """All records written to ``metrics.jsonl`` so far (also those before a resume)."""
        return read_metrics(self.run_dir)


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
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    _atomic_write(path, lambda f: f.write(data))


def save_checkpoint(path: Path, payload: dict) -> None:
    """Atomically write a checkpoint (see ``_atomic_write``)."""
    _atomic_write(Path(path), lambda f: torch.save(payload, f))


def load_checkpoint(path: Path, device: torch.device | str = "cpu") -> dict:
    # weights_only: checkpoints hold only tensors and plain values (RNG states included),
    # so loading one never runs pickled code.
    return torch.load(path, map_location=device, weights_only=True)


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


class _MetricsWriter:
    def __init__(self, path: Path, enabled: bool):
        self.path = path
        self.enabled = enabled
        self._file = open(path, "a") if enabled else None

    def write(self, record: dict) -> None:
        if self._file is not None:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()

    def offset(self) -> int:
        return self._file.tell() if self._file is not None else 0

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


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


class _StopRequest:
    """Turns SIGINT (Ctrl-C) into a request honoured between steps, so the loop stops at a
    step boundary with a fresh checkpoint instead of half-way through an update."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        try:
            self._previous = signal.signal(signal.SIGINT, self._handle)
        except ValueError:  # not the main thread: leave SIGINT alone
            self._previous = None
        return self

    def _handle(self, signum, frame):
        if self.requested:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
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
    """
    device = torch.device(device)
    run_dir = Path(run_dir)
    run = context or RunContext(run_dir=run_dir, device=device)
    config = experiment.resolve(config)
    ckpt_path = run.path(str(CHECKPOINT))

    checkpoint = None
    if resume:
        if not ckpt_path.exists():
            raise ConfigError(
                f"cannot resume: no checkpoint at {ckpt_path}; start a new run without --resume"
            )
        checkpoint = load_checkpoint(ckpt_path, device)
        saved = json.loads(run.path("config.json").read_text())["config"]
        if saved != json.loads(json.dumps(config_to_dict(config))):
            raise ConfigError(
                f"cannot resume {run_dir} with a different config than its config.json; "
                f"resume with the saved config or start a new run"
            )
    elif run.path("config.json").exists():
        raise ConfigError(
            f"{run_dir} already holds a run; pass --resume to continue it or choose another --out"
        )

    # Every rank has checked the directory before rank 0 writes config.json into it.
    run.barrier()
    run_dir.mkdir(parents=True, exist_ok=True)
    if run.is_main and not resume:
        run.write_json(
            "config.json",
            {"experiment": experiment.name, "config": config_to_dict(config),
             "device": str(device), "torch": torch.__version__},
        )

    previous_threads = torch.get_num_threads()
    if config.threads > 0:
        torch.set_num_threads(config.threads)
    try:
        return _train(experiment, config, run, device, checkpoint, ckpt_path, progress, hooks)
    finally:
        torch.set_num_threads(previous_threads)


def _train(experiment, config, run, device, checkpoint, ckpt_path, progress, hooks) -> dict:
    t0 = time.perf_counter()  # wall time counts setup and the final plots too
    seed_everything(config.seed)
    exp = experiment(config, device)
    exp.setup()
    model = exp.build_model()
    optimizer = exp.build_optimizer(model)
    total, per_epoch = exp.num_steps, max(1, exp.steps_per_epoch)

    metrics_path = run.path("metrics.jsonl")
    start, elapsed = 0, 0.0
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        exp.load_state_dict(checkpoint["experiment"])
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
                loss, extra = exp.loss(net, batch, position)
                optimizer.zero_grad(set_to_none=True)
                if loss.requires_grad:
                    loss.backward()
                    optimizer.step()
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
                if start < total or not run.path("summary.json").exists():
                    evaluate(final)
                    checkpoint_now(total)
    finally:
        if bar is not None:
            bar.close()
        writer.close()

    if status == "interrupted":
        wall = elapsed + (time.perf_counter() - t0)
        summary = {"experiment": experiment.name, "status": status, "steps_done": done.step,
                   "steps": total, "wall_time_s": wall}
        run.write_json("summary.json", summary)
        return summary

    metrics = {k: _scalar(v) for k, v in exp.finish(model, run).items()}
    _plot_loss(run)
    wall = elapsed + (time.perf_counter() - t0)
    summary = {
        "experiment": experiment.name,
        "status": status,
        "steps": total,
        "epochs": math.ceil(total / per_epoch),
        "seed": config.seed,
        "device": str(device),
        "wall_time_s": wall,
        "metrics": metrics,
        "references": {k: dataclasses.asdict(r) for k, r in experiment.references.items()},
    }
    run.write_json("summary.json", summary)
    return summary


def _plot_loss(run: RunContext) -> None:
    records = [r for r in run.history() if r.get("split") == "train" and "loss" in r]
    if not records or not run.is_main:
        return
    steps = [r["step"] for r in records]
    loss = [r["loss"] for r in records]
    fig = figure(figsize=(6, 3.5))
    ax = fig.subplots()
    ax.plot(steps, loss, lw=1.2)
    if all(v is not None and math.isfinite(v) and v > 0 for v in loss):
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.grid(alpha=0.3)
    run.save_figure(fig, "loss")
