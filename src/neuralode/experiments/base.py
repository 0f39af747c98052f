"""What an experiment supplies to the training loop.

An experiment is a subclass of :class:`Experiment`: a config dataclass, the data, the
model, the optimiser, the loss of one batch, an evaluation and a final report. The one
training loop in :mod:`neuralode.experiments.runner` does everything else (seeding,
stepping, logging, checkpoints, resume, progress). Experiments only use the public
solver API (``neuralode.solve`` / ``neuralode.odeint``) and never its internals.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch

from .config import RunConfig

if TYPE_CHECKING:  # pragma: no cover
    from .runner import RunContext

__all__ = ["Experiment", "Position", "Reference", "epoch_permutation"]


@dataclasses.dataclass(frozen=True)
class Position:
    """Where the loop is: ``step`` optimiser steps are done; the next batch is number
    ``index`` of epoch ``epoch``. This is the data-loader position a checkpoint stores."""

    step: int
    epoch: int
    index: int


@dataclasses.dataclass(frozen=True)
class Reference:
    """A figure reported by the seed documents, shown beside ours in reports."""

    value: float
    label: str
    source: str = "seed document"


def epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    """The order of ``n`` examples in ``epoch``: a pure function of (seed, epoch).

    Deriving the order from the position instead of advancing a stateful generator is
    what makes resuming in the middle of an epoch exact (and, later, lets each rank of a
    distributed run take its own slice of the same permutation).
    """
    return np.random.default_rng([seed, epoch]).permutation(n)


class Experiment:
    """Base class of experiments; subclasses set the class attributes and override the
    methods marked *required*.

    The loop calls, in order: ``setup()``, ``build_model()``, ``build_optimizer(model)``;
    then for each step ``batch(position)`` and ``train_step(model, batch, position, optimizer)``
    (by default ``loss(model, batch, position)``, backward, ``optimizer.step()``);
    ``evaluate(model, position, run)`` every ``config.eval_every`` steps and at the end;
    finally ``finish(model, run)``. Everything an experiment keeps between steps that is
    not in the model or optimiser (plot snapshots, divergence flags) must round-trip
    through ``state_dict``/``load_state_dict`` so that ``--resume`` is exact; keep it to
    tensors and plain Python values (checkpoints load with ``weights_only=True``).
    """

    name: ClassVar[str]
    description: ClassVar[str]
    Config: ClassVar[type[RunConfig]] = RunConfig
    #: Seed-document figures keyed by the summary metric they correspond to.
    references: ClassVar[dict[str, Reference]] = {}
    #: Whether the loop draws ``plots/loss.png``: False where a "loss" per step is no training
    #: curve (``memory`` measures a different case at every step).
    loss_plot: ClassVar[bool] = True

    def __init__(self, config: RunConfig, device: torch.device | str = "cpu"):
        self.config = config
        self.device = torch.device(device)

    @classmethod
    def resolve(cls, config: RunConfig) -> RunConfig:
        """Fill in defaults that depend on other fields (e.g. on a variant); the result
        is what ``config.json`` records. Raise ``ConfigError`` for inconsistent values."""
        return config

    # -- required -----------------------------------------------------------------
    @property
    def num_steps(self) -> int:
        """Total optimiser steps of the run (*required*)."""
        raise NotImplementedError

    def build_model(self) -> torch.nn.Module:
        """The trainable module, on ``self.device`` (*required*)."""
        raise NotImplementedError

    def build_optimizer(self, model: torch.nn.Module) -> torch.optim.Optimizer:
        """The optimiser over ``model``'s parameters (*required*)."""
        raise NotImplementedError

    def loss(self, model: torch.nn.Module, batch: Any, position: Position) -> tuple[torch.Tensor, dict]:
        """Scalar loss of one batch and extra scalars to log (*required*). A loss that
        does not require grad (nothing left to train) makes the loop skip the update."""
        raise NotImplementedError

    def train_step(self, model: torch.nn.Module, batch: Any, position: Position,
                   optimizer: torch.optim.Optimizer) -> tuple[torch.Tensor, dict]:
        """One optimiser step on ``batch``: the loss and the extra scalars to log.

        The default is what every experiment needs: ``loss(model, batch, position)``, one
        backward pass, ``optimizer.step()`` (no update when the loss does not require grad).
        Override it only where one backward pass over the whole loss holds too much at once:
        ``robustness`` runs forward and backward of its independent members one after the
        other, so one member's graph is alive at a time, and gets the same update."""
        lr = self.lr_at(position.step)
        if lr is not None:
            for group in optimizer.param_groups:
                group["lr"] = lr
        loss, extra = self.loss(model, batch, position)
        optimizer.zero_grad(set_to_none=True)
        if loss.requires_grad:
            loss.backward()
            optimizer.step()
        return loss, (extra if lr is None else {**extra, "lr": lr})

    def lr_at(self, step: int) -> float | None:
        """The learning rate of ``step`` for an experiment that schedules it per step, or ``None`` (the
        optimiser's own). :meth:`train_step` sets it before the step and logs it as ``lr``; set from the step
        alone (the optimiser's saved param_groups carry the last value and this overwrites it), a resumed run
        takes the same steps as one never stopped."""
        return None

    # -- optional -----------------------------------------------------------------
    @property
    def steps_per_epoch(self) -> int:
        return self.num_steps

    def setup(self) -> None:
        """Build the data; runs after seeding, before the model is built."""

    def batch(self, position: Position) -> Any:
        return None

    def evaluate(self, model: torch.nn.Module, position: Position, run: RunContext) -> dict:
        return {}

    def finish(self, model: torch.nn.Module, run: RunContext) -> dict:
        """Final metrics for ``summary.json``; write the final plots with ``run.save_figure``."""
        return {}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass
