"""Build a classifier by name: ``build_model("mnist_odenet")``.

Names are ``"<domain>_<kind>"`` with domain ``mnist`` (:func:`image_classifier`), ``ecg``
(:func:`sequence_classifier`) or ``vector`` (:func:`vector_classifier`, which needs
``in_features`` and ``num_classes``), and kind ``mlp``, ``resnet``, ``rknet`` or ``odenet``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from neuralode.models.image import image_classifier
from neuralode.models.sequence import sequence_classifier
from neuralode.models.vector import vector_classifier

__all__ = ["MODEL_NAMES", "PAPER_PARAMETER_COUNTS", "build_model"]

_BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "mnist": image_classifier,
    "ecg": sequence_classifier,
    "vector": vector_classifier,
}
_KINDS = ("mlp", "resnet", "rknet", "odenet")

#: All names accepted by :func:`build_model`.
MODEL_NAMES: tuple[str, ...] = tuple(f"{domain}_{kind}" for domain in _BUILDERS for kind in _KINDS)

#: Parameter counts reported in Table 1 of Chen et al. (2018) for MNIST.
PAPER_PARAMETER_COUNTS: dict[str, int] = {
    "mnist_mlp": 240_000,
    "mnist_resnet": 600_000,
    "mnist_rknet": 220_000,
    "mnist_odenet": 220_000,
}


def build_model(name: str, **kwargs: Any) -> nn.Module:
    """Build the classifier called ``name``.

    Parameters
    ----------
    name : str
        One of :data:`MODEL_NAMES`, e.g. ``"mnist_resnet"`` or ``"ecg_odenet"``.
    **kwargs
        Passed to the builder of the domain (sizes, and solver settings for ODE/RK nets).

    Returns
    -------
    nn.Module
        A freshly initialised model.

    Examples
    --------
    >>> model = build_model("ecg_rknet", channels=16, step_size=0.5)
    """
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, one of {list(MODEL_NAMES)}, got {type(name).__name__}.")
    if name not in MODEL_NAMES:
        raise ValueError(f"name must be one of {list(MODEL_NAMES)}, got {name!r}.")
    domain, kind = name.split("_", 1)
    return _BUILDERS[domain](kind, **kwargs)
