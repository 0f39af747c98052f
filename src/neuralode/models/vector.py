"""Classifiers for feature vectors ``(N, D)``, with optional augmentation (Dupont et al., 2019).

The features are (optionally) augmented with ``augment_dim`` zeros and evolved in that space, as in
the toy experiments of Dupont et al.: ``D' = D + augment_dim``,

- ResNet: ``num_blocks`` residual blocks ``z + MLP(z)`` with ``MLP: D' -> hidden -> hidden -> D'``;
- ODE-Net / RK-Net: one ODE block with ``f(t, z) = ConcatLinear(hidden, D')(relu(ConcatLinear(
  hidden, hidden)(relu(ConcatLinear(D', hidden)(z)))))``;
- head: ``Linear(D', num_classes)``.

References
----------
.. [1] E. Dupont, A. Doucet, Y. W. Teh, "Augmented Neural ODEs", NeurIPS 2019.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from neuralode.models.base import MLP, ODENet, ResNet, RKNet
from neuralode.nn import Augment, ConcatLinear, TimeSequential
from neuralode.nn._checks import one_of, positive_int

__all__ = ["KINDS", "residual_fn_vector", "ode_func_vector", "vector_classifier"]

KINDS = ("mlp", "resnet", "rknet", "odenet")


def residual_fn_vector(features: int, hidden: int) -> nn.Sequential:
    """Residual branch ``Linear(features, hidden), ReLU, Linear(hidden, hidden), ReLU, Linear(hidden, features)``."""
    return nn.Sequential(
        nn.Linear(features, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, features)
    )


def ode_func_vector(features: int, hidden: int) -> TimeSequential:
    """Time-dependent vector field of three :class:`~neuralode.nn.ConcatLinear` layers with ReLU."""
    return TimeSequential(
        ConcatLinear(features, hidden),
        nn.ReLU(),
        ConcatLinear(hidden, hidden),
        nn.ReLU(),
        ConcatLinear(hidden, features),
    )


def vector_classifier(
    kind: str,
    *,
    in_features: int,
    num_classes: int,
    hidden: int = 32,
    augment_dim: int = 0,
    num_blocks: int = 4,
    **solver_kwargs: Any,
) -> nn.Module:
    """Build a classifier for ``(N, in_features)`` inputs.

    Parameters
    ----------
    kind : {"mlp", "resnet", "rknet", "odenet"}
        Model family (the MLP has one hidden layer of width ``hidden`` and ignores
        ``augment_dim``).
    in_features : int
        Input features ``D``.
    num_classes : int
        Number of classes.
    hidden : int, default 32
        Hidden width of the residual branches / vector field.
    augment_dim : int, default 0
        Zero features appended before the body (augmented neural ODE when > 0).
    num_blocks : int, default 4
        Residual blocks of the ResNet.
    **solver_kwargs
        Arguments of :class:`~neuralode.models.ODENet` / :class:`~neuralode.models.RKNet`.

    Returns
    -------
    nn.Module
        Maps ``(N, in_features)`` to logits ``(N, num_classes)``.
    """
    kind = one_of("kind", kind, KINDS)
    in_features = positive_int("in_features", in_features)
    num_classes = positive_int("num_classes", num_classes)
    hidden = positive_int("hidden", hidden)
    augment_dim = positive_int("augment_dim", augment_dim, allow_zero=True)
    if kind in ("mlp", "resnet") and solver_kwargs:
        raise TypeError(
            f"{sorted(solver_kwargs)} are solver arguments, which kind={kind!r} does not take; "
            "use kind='odenet' or 'rknet'."
        )
    if kind == "mlp":
        return MLP(in_features, (hidden,), num_classes)
    features = in_features + augment_dim
    stem = Augment(augment_dim) if augment_dim else nn.Identity()
    head = nn.Linear(features, num_classes)
    if kind == "resnet":
        num_blocks = positive_int("num_blocks", num_blocks)
        return ResNet(stem, [residual_fn_vector(features, hidden) for _ in range(num_blocks)], head)
    if kind == "rknet":
        return RKNet(stem, ode_func_vector(features, hidden), head, **solver_kwargs)
    return ODENet(stem, ode_func_vector(features, hidden), head, **solver_kwargs)
