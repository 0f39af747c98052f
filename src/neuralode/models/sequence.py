"""1-D convolutional classifiers for sequences, e.g. ECG heartbeats (MIT-BIH: (N, 1, 187), 5 classes).

- stem: three 1-D convolutions with ReLU,
  ``Conv1d(C_in, c, 5, padding=2), ReLU, Conv1d(c, c, 4, 2, 1), ReLU, Conv1d(c, c, 4, 2, 1), ReLU``:
  ``(N, C_in, L) -> (N, c, L_out)``, each strided convolution mapping a length ``L`` to
  ``floor((L - 2) / 2) + 1`` (187 -> 93 -> 46);
- body: six pre-activation residual blocks ``z + conv(relu(conv(relu(z))))`` (ResNet), or one ODE
  block with the time-dependent field ``conv_t(relu(conv_t(relu(z))))`` where ``conv_t`` is
  :class:`~neuralode.nn.ConcatConv1d` (ODE-Net: adaptive dopri5 and adjoint gradients; RK-Net:
  fixed-step rk4 and direct gradients);
- head: ``Flatten, Linear(c * L_out, num_classes)``.

The default ``channels=32`` keeps the models small (ResNet 53,061 parameters, ODE-Net and RK-Net
22,213) so that an epoch on a subset of MIT-BIH takes minutes on a CPU; every size is an argument.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from neuralode.models.base import MLP, ODENet, ResNet, RKNet
from neuralode.nn import ConcatConv1d, TimeSequential
from neuralode.nn._checks import one_of, positive_int

__all__ = ["KINDS", "conv_stem_1d", "stem_length", "residual_fn_1d", "ode_func_1d", "sequence_classifier"]

KINDS = ("mlp", "resnet", "rknet", "odenet")


def stem_length(length: int) -> int:
    """Length of the stem's output for an input of ``length`` samples (187 -> 46)."""
    for _ in range(2):
        length = (length - 2) // 2 + 1
    return length


def conv_stem_1d(in_channels: int, channels: int) -> nn.Sequential:
    """Three 1-D convolutions with ReLU; the last two halve the length."""
    return nn.Sequential(
        nn.Conv1d(in_channels, channels, 5, 1, 2),
        nn.ReLU(),
        nn.Conv1d(channels, channels, 4, 2, 1),
        nn.ReLU(),
        nn.Conv1d(channels, channels, 4, 2, 1),
        nn.ReLU(),
    )


def residual_fn_1d(channels: int, kernel_size: int = 3) -> nn.Sequential:
    """Pre-activation residual branch: ``conv(relu(conv(relu(z))))``, length preserved."""
    pad = kernel_size // 2
    return nn.Sequential(
        nn.ReLU(),
        nn.Conv1d(channels, channels, kernel_size, 1, pad),
        nn.ReLU(),
        nn.Conv1d(channels, channels, kernel_size, 1, pad),
    )


def ode_func_1d(channels: int, kernel_size: int = 3) -> TimeSequential:
    """Time-dependent vector field ``ConcatConv1d(relu(ConcatConv1d(relu(z))))``."""
    pad = kernel_size // 2
    return TimeSequential(
        nn.ReLU(),
        ConcatConv1d(channels, channels, kernel_size, 1, pad),
        nn.ReLU(),
        ConcatConv1d(channels, channels, kernel_size, 1, pad),
    )


def sequence_classifier(
    kind: str,
    *,
    in_channels: int = 1,
    length: int = 187,
    num_classes: int = 5,
    channels: int = 32,
    num_blocks: int = 6,
    kernel_size: int = 3,
    hidden_features: int = 128,
    **solver_kwargs: Any,
) -> nn.Module:
    """Build a 1-D convolutional classifier (defaults: ECG heartbeats, MIT-BIH).

    Parameters
    ----------
    kind : {"mlp", "resnet", "rknet", "odenet"}
        Model family.
    in_channels : int, default 1
        Input channels (leads).
    length : int, default 187
        Input length; fixes the size of the linear head.
    num_classes : int, default 5
        Number of classes (N, S, V, F, Q for MIT-BIH).
    channels : int, default 32
        Feature channels of the stem and body.
    num_blocks : int, default 6
        Residual blocks of the ResNet.
    kernel_size : int, default 3
        Odd kernel size of the residual branches / vector field.
    hidden_features : int, default 128
        Width of the MLP's hidden layer.
    **solver_kwargs
        For ``"odenet"``/``"rknet"``: arguments of :class:`~neuralode.models.ODENet` /
        :class:`~neuralode.models.RKNet`.

    Returns
    -------
    nn.Module
        Maps ``(N, in_channels, length)`` to logits ``(N, num_classes)``.
    """
    kind = one_of("kind", kind, KINDS)
    in_channels = positive_int("in_channels", in_channels)
    length = positive_int("length", length)
    num_classes = positive_int("num_classes", num_classes)
    channels = positive_int("channels", channels)
    kernel_size = positive_int("kernel_size", kernel_size)
    if kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be odd so that the length is preserved, got {kernel_size}.")
    if kind in ("mlp", "resnet") and solver_kwargs:
        raise TypeError(
            f"{sorted(solver_kwargs)} are solver arguments, which kind={kind!r} does not take; "
            "use kind='odenet' or 'rknet'."
        )
    if kind == "mlp":
        return MLP(in_channels * length, (positive_int("hidden_features", hidden_features),), num_classes)
    out_length = stem_length(length)
    if out_length < 1:
        raise ValueError(f"length must be at least 4 for the two strided convolutions, got {length}.")
    stem = conv_stem_1d(in_channels, channels)
    head = nn.Sequential(nn.Flatten(), nn.Linear(channels * out_length, num_classes))
    if kind == "resnet":
        num_blocks = positive_int("num_blocks", num_blocks)
        return ResNet(stem, [residual_fn_1d(channels, kernel_size) for _ in range(num_blocks)], head)
    func = ode_func_1d(channels, kernel_size)
    if kind == "rknet":
        return RKNet(stem, func, head, **solver_kwargs)
    return ODENet(stem, func, head, **solver_kwargs)
