"""Data-parallel training of the one loop under ``torchrun``.

::

    torchrun --nproc_per_node=2 -m neuralode run ecg --out runs/ecg-ddp --set ...

``neuralode run`` sees the variables ``torchrun`` sets (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``) and hands :func:`train` a
:class:`DistributedContext` instead of the single-process :class:`RunContext`. Nothing
else in the loop changes:

- the process group uses ``gloo`` on the CPU and ``nccl`` on CUDA (one GPU per process,
  ``cuda:LOCAL_RANK``);
- the loop wraps the model in ``DistributedDataParallel`` (:meth:`DistributedContext.wrap`)
  for the loss only; evaluation, ``state_dict`` and checkpoints use the unwrapped module,
  so a checkpoint holds the same keys as a single-process one;
- every rank derives the epoch's order from ``(seed, epoch)``
  (:func:`~neuralode.experiments.epoch_permutation`) and takes its slice of each global
  batch with :func:`shard`; a checkpoint stores the *global* position (step, epoch,
  index), so a run resumes with any number of processes, including one;
- experiments scale each rank's loss so that DDP's gradient average equals the gradient
  of the global batch mean (see :func:`global_mean`), and logged scalars are averaged over
  ranks by :meth:`DistributedContext.reduce`;
- only rank 0 writes files (``RunContext`` already guarantees this).

Why not ``torch.utils.data.DistributedSampler``: the loop has no ``DataLoader``; batches
come from ``Experiment.batch(position)``, a pure function of the position, which is what
makes mid-epoch resume exact. Slicing the same permutation per rank keeps that property
and makes the union of the ranks' slices exactly the single-process batch.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from .runner import RunContext

__all__ = [
    "DistributedContext",
    "all_reduce_sum",
    "from_environment",
    "global_mean",
    "launched_by_torchrun",
    "parameter_max_difference",
    "rank_and_world",
    "shard",
    "shutdown",
]


def launched_by_torchrun() -> bool:
    """True when the process was started by ``torchrun`` (``RANK`` and ``WORLD_SIZE`` set)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def rank_and_world() -> tuple[int, int]:
    """``(rank, world_size)`` of the default process group; ``(0, 1)`` without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def shard(indices: np.ndarray) -> np.ndarray:
    """This rank's contiguous slice of a global batch (all of it in one process).

    ``numpy.array_split`` semantics: when the world size does not divide the batch the
    first ranks get one more example; the union over ranks is exactly ``indices``."""
    rank, world = rank_and_world()
    if world == 1:
        return indices
    return np.array_split(indices, world)[rank]


def global_mean(local_sum: torch.Tensor, global_count: int) -> torch.Tensor:
    """This rank's share of the mean over the global batch, scaled for DDP.

    DDP *averages* gradients over ``W`` ranks. Returning ``W * local_sum / global_count``
    makes that average the gradient of ``sum over all ranks / global_count``, the
    single-process batch mean, whatever the shard sizes; the mean over ranks of the returned
    values (what ``RunContext.reduce`` logs) is that batch mean too."""
    _, world = rank_and_world()
    return local_sum * (world / global_count)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum of ``tensor`` over ranks (a copy; the tensor itself in one process)."""
    _, world = rank_and_world()
    if world == 1:
        return tensor
    out = tensor.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def parameter_max_difference(model: torch.nn.Module) -> float:
    """Largest absolute difference between any parameter and rank 0's copy (0.0 alone).

    A check that data parallelism kept the replicas identical."""
    _, world = rank_and_world()
    if world == 1:
        return 0.0
    worst = torch.zeros((), dtype=torch.float64, device=next(model.parameters()).device)
    for p in model.parameters():
        ref = p.detach().clone()
        dist.broadcast(ref, src=0)
        worst = torch.maximum(worst, (p.detach() - ref).abs().max().to(worst.dtype))
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    return float(worst.item())


@dataclasses.dataclass
class DistributedContext(RunContext):
    """The run as seen by one of ``world_size`` processes of a torchrun job."""

    def reduce(self, scalars: dict[str, float]) -> dict[str, float]:
        """Mean over ranks of the numeric scalars (float64, so the mean of identical values
        is that value); other values pass through from this rank."""
        keys = [k for k, v in scalars.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
                and v is not None]
        if not keys:
            return scalars
        values = torch.tensor([float(scalars[k]) for k in keys], dtype=torch.float64, device=self._comm_device)
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
        values = (values / self.world_size).tolist()
        return {**scalars, **dict(zip(keys, values))}

    def barrier(self) -> None:
        dist.barrier()

    def any_rank(self, flag: bool) -> bool:
        """One scalar all-reduce (MAX) per call: a Ctrl-C that reaches the ranks at different steps
        still stops them all at the same step."""
        value = torch.tensor([1.0 if flag else 0.0], device=self._comm_device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item() > 0)

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """``DistributedDataParallel(model)``; its constructor broadcasts rank 0's
        parameters, so replicas start equal even if their initialisation differed."""
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)

    @property
    def _comm_device(self) -> torch.device:
        # nccl only moves CUDA tensors; gloo only CPU ones.
        return self.device if self.device.type == "cuda" else torch.device("cpu")


def from_environment(run_dir: str | os.PathLike, device: str | torch.device = "cpu") -> DistributedContext | None:
    """Join the torchrun job this process belongs to; ``None`` when not under torchrun.

    Initialises the default process group (``nccl`` for ``device="cuda"``, else ``gloo``),
    pins CUDA processes to ``cuda:LOCAL_RANK``, and makes every rank use rank 0's
    ``run_dir`` (a default run directory carries a timestamp that could differ by rank).
    """
    if not launched_by_torchrun():
        return None
    device = torch.device(device)
    if device.type == "cuda":
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    shared: list[Any] = [str(run_dir)]
    dist.broadcast_object_list(shared, src=0)
    return DistributedContext(run_dir=Path(shared[0]), device=device, rank=dist.get_rank(),
                              world_size=dist.get_world_size())


def shutdown(completed: bool = False) -> None:
    """Destroy the default process group if there is one.

    ``completed``: every rank ended the run normally, so they first meet at a barrier, and no rank tears its
    gloo group down while rank 0 is still writing the run's files. After a failure there is no barrier: the
    other ranks may never reach it. (The barrier alone did not stop the abort at exit, "terminate called
    without an active exception", SIGABRT; the CLI's workers also leave with ``os._exit``, see cli.py.)
    """
    if dist.is_available() and dist.is_initialized():
        if completed:
            dist.barrier()
        dist.destroy_process_group()
