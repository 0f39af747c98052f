"""Reproducible experiments: configs, the one training loop, run directories, reports.

``neuralode list`` / ``neuralode run NAME`` / ``neuralode report RUN_DIR`` drive this
package from the command line; in Python::

    from neuralode.experiments import get_experiment, train
    exp = get_experiment("spiral")
    summary = train(exp, exp.Config(), "runs/spiral-demo")
"""

from __future__ import annotations

import difflib
import importlib

from .base import Experiment, Position, Reference, epoch_permutation
from .config import CheckpointError, ConfigError, DataError, RunConfig, apply_overrides
from .runner import RunContext, train

__all__ = [
    "CheckpointError",
    "ConfigError",
    "DataError",
    "Experiment",
    "Position",
    "Reference",
    "RunConfig",
    "RunContext",
    "apply_overrides",
    "epoch_permutation",
    "experiment_names",
    "get_experiment",
    "register",
    "train",
]

# name -> "module:Class"; imported on first use so that `neuralode list` stays quick.
_REGISTRY: dict[str, str | type[Experiment]] = {
    "spiral": "neuralode.experiments.spiral:Spiral",
    "cubic": "neuralode.experiments.cubic:Cubic",
    "poisson": "neuralode.experiments.poisson:Poisson",
    "tolerance": "neuralode.experiments.tolerance:Tolerance",
    "memory": "neuralode.experiments.memory:Memory",
    "pendulum": "neuralode.experiments.pendulum:Pendulum",
    "ecg": "neuralode.experiments.ecg:ECG",
    "mnist": "neuralode.experiments.mnist:MNIST",
    "cnf": "neuralode.experiments.cnf:CNFExperiment",
    "latent_spiral": "neuralode.experiments.latent_spiral:LatentSpiral",
    "physionet": "neuralode.experiments.physionet:PhysioNet",
    "robustness": "neuralode.experiments.robustness:Robustness",
}


def register(cls: type[Experiment]) -> type[Experiment]:
    """Add an experiment class under ``cls.name`` (usable as a class decorator)."""
    _REGISTRY[cls.name] = cls
    return cls


def experiment_names() -> list[str]:
    return sorted(_REGISTRY)


def get_experiment(name: str) -> type[Experiment]:
    """The experiment class called ``name``; ConfigError naming the known ones if none."""
    try:
        entry = _REGISTRY[name]
    except KeyError:
        known = experiment_names()
        close = difflib.get_close_matches(name, known, n=1, cutoff=0.4)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ConfigError(
            f"unknown experiment {name!r}.{hint} Known experiments: {', '.join(known)} "
            f"(see `neuralode list`)"
        ) from None
    if isinstance(entry, str):
        module, _, attr = entry.partition(":")
        entry = getattr(importlib.import_module(module), attr)
        _REGISTRY[name] = entry
    return entry
