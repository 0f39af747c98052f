"""Image classifiers of Chen et al. (2018), Section 7.1 and Table 1 (MNIST).

The layout follows ``torchdiffeq``'s ``examples/odenet_mnist.py`` (``downsampling_method='conv'``):

- stem: ``Conv2d(C_in, 64, 3, padding=1)``, then twice ``GroupNorm, ReLU, Conv2d(64, 64, 4, 2, 1)``:
  ``(N, C_in, 28, 28) -> (N, 64, 7, 7)``;
- body: six pre-activation residual blocks ``z + conv(relu(norm(conv(relu(norm(z))))))`` (ResNet),
  or one ODE block with the vector field ``norm, relu, ConcatConv2d, norm, relu, ConcatConv2d,
  norm`` (ODE-Net, RK-Net);
- head: ``GroupNorm, ReLU, AdaptiveAvgPool2d(1), Flatten, Linear(64, num_classes)``.

``GroupNorm(min(32, C), C)`` everywhere. One deliberate difference from the example: the first
convolution is padded (``padding=1``), so the features are 7x7 as the paper describes instead of
the example's 6x6; the parameter count does not change.

Parameter counts (28x28 grey images, 10 classes): MLP 238,510; ResNet 576,778; RK-Net and
ODE-Net 208,266 (the paper reports 0.24M, 0.60M, 0.22M, 0.22M).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from neuralode.models.base import MLP, ODENet, ResNet, RKNet
from neuralode.nn import ConcatConv2d, TimeSequential
from neuralode.nn._checks import one_of, positive_int

__all__ = ["KINDS", "group_norm", "conv_stem_2d", "conv_head_2d", "residual_fn_2d", "ode_func_2d", "image_classifier"]

KINDS = ("mlp", "resnet", "rknet", "odenet")


def group_norm(channels: int) -> nn.GroupNorm:
    """``GroupNorm(min(32, channels), channels)`` as in the ``torchdiffeq`` examples."""
    return nn.GroupNorm(min(32, channels), channels)


def conv_stem_2d(in_channels: int, channels: int) -> nn.Sequential:
    """Downsample ``(N, in_channels, H, W)`` to ``(N, channels, H/4, W/4)`` (28 -> 7)."""
    return nn.Sequential(
        nn.Conv2d(in_channels, channels, 3, 1, padding=1),
        group_norm(channels),
        nn.ReLU(),
        nn.Conv2d(channels, channels, 4, 2, 1),
        group_norm(channels),
        nn.ReLU(),
        nn.Conv2d(channels, channels, 4, 2, 1),
    )


def conv_head_2d(channels: int, num_classes: int) -> nn.Sequential:
    """``GroupNorm, ReLU, global average pool, Linear(channels, num_classes)``."""
    return nn.Sequential(
        group_norm(channels),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(channels, num_classes),
    )


def residual_fn_2d(channels: int) -> nn.Sequential:
    """Residual branch of ``torchdiffeq``'s ``ResBlock``: two bias-free 3x3 convolutions."""
    return nn.Sequential(
        group_norm(channels),
        nn.ReLU(),
        nn.Conv2d(channels, channels, 3, 1, 1, bias=False),
        group_norm(channels),
        nn.ReLU(),
        nn.Conv2d(channels, channels, 3, 1, 1, bias=False),
    )


def ode_func_2d(channels: int) -> TimeSequential:
    """Vector field ``f(t, z)`` of the MNIST ODE-Net (``ODEfunc`` of the ``torchdiffeq`` example)."""
    return TimeSequential(
        group_norm(channels),
        nn.ReLU(),
        ConcatConv2d(channels, channels, 3, 1, 1),
        group_norm(channels),
        nn.ReLU(),
        ConcatConv2d(channels, channels, 3, 1, 1),
        group_norm(channels),
    )


def image_classifier(
    kind: str,
    *,
    in_channels: int = 1,
    image_size: int = 28,
    num_classes: int = 10,
    channels: int = 64,
    num_blocks: int = 6,
    hidden_features: int = 300,
    **solver_kwargs: Any,
) -> nn.Module:
    """Build an MNIST-style classifier of Chen et al. (2018).

    Parameters
    ----------
    kind : {"mlp", "resnet", "rknet", "odenet"}
        The model family.
    in_channels : int, default 1
        Image channels.
    image_size : int, default 28
        Height and width (only the MLP needs it; the conv models accept any size divisible by 4).
    num_classes : int, default 10
        Number of classes.
    channels : int, default 64
        Feature channels after the stem.
    num_blocks : int, default 6
        Residual blocks of the ResNet.
    hidden_features : int, default 300
        Width of the 1-hidden-layer MLP.
    **solver_kwargs
        For ``"odenet"``: arguments of :class:`~neuralode.models.ODENet` (``rtol``, ``atol``,
        ``method``, ``gradient``, ``t``, ...); for ``"rknet"``: of :class:`~neuralode.models.RKNet`
        (``method``, ``step_size``, ``t``, ...).

    Returns
    -------
    nn.Module
        Maps ``(N, in_channels, image_size, image_size)`` to logits ``(N, num_classes)``.
    """
    kind = one_of("kind", kind, KINDS)
    in_channels = positive_int("in_channels", in_channels)
    num_classes = positive_int("num_classes", num_classes)
    channels = positive_int("channels", channels)
    if kind in ("mlp", "resnet") and solver_kwargs:
        raise TypeError(
            f"{sorted(solver_kwargs)} are solver arguments, which kind={kind!r} does not take; "
            "use kind='odenet' or 'rknet'."
        )
    if kind == "mlp":
        image_size = positive_int("image_size", image_size)
        return MLP(in_channels * image_size**2, (positive_int("hidden_features", hidden_features),), num_classes)
    stem, head = conv_stem_2d(in_channels, channels), conv_head_2d(channels, num_classes)
    if kind == "resnet":
        num_blocks = positive_int("num_blocks", num_blocks)
        return ResNet(stem, [residual_fn_2d(channels) for _ in range(num_blocks)], head)
    if kind == "rknet":
        return RKNet(stem, ode_func_2d(channels), head, **solver_kwargs)
    return ODENet(stem, ode_func_2d(channels), head, **solver_kwargs)
