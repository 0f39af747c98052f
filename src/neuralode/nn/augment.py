"""Augmentation with extra zero dimensions (Dupont et al., 2019).

The flow of an ODE is a homeomorphism, so a neural ODE on ``R^d`` cannot represent maps that
change the topology of the data (e.g. separate two nested annuli). Augmented neural ODEs solve
in ``R^(d + p)``: the input is padded with ``p`` zeros (features for vectors, channels for images
and sequences) before the solve.

References
----------
.. [1] E. Dupont, A. Doucet, Y. W. Teh, "Augmented Neural ODEs", NeurIPS 2019.
   https://arxiv.org/abs/1904.01681
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from neuralode.nn._checks import axis, positive_int

__all__ = ["Augment", "augment"]


def augment(x: Tensor, augment_dim: int, dim: int = 1) -> Tensor:
    """Append ``augment_dim`` zeros to ``x`` along dimension ``dim``.

    Parameters
    ----------
    x : Tensor
        Input of shape ``(N, C, *)`` (or any shape with at least ``dim + 1`` dimensions).
    augment_dim : int
        Number of zero features/channels to append (``0`` returns ``x`` unchanged).
    dim : int, default 1
        The feature (vectors) or channel (images, sequences) dimension.

    Returns
    -------
    Tensor
        Shape of ``x`` with ``x.shape[dim] + augment_dim`` along ``dim``; same dtype and device.
    """
    augment_dim = positive_int("augment_dim", augment_dim, allow_zero=True)
    if not -x.dim() <= dim < x.dim():
        raise ValueError(
            f"dim={dim} is out of range for an input with {x.dim()} dimensions (shape "
            f"{tuple(x.shape)}); use dim=1 for (N, features) or (N, channels, ...)."
        )
    if augment_dim == 0:
        return x
    shape = list(x.shape)
    shape[dim] = augment_dim
    return torch.cat([x, x.new_zeros(shape)], dim=dim)


class Augment(nn.Module):
    """Layer that appends ``augment_dim`` zero features/channels (Dupont et al., 2019).

    It has no parameters; it is a module so that it composes with ``nn.Sequential`` like
    ``nn.ReLU``.

    Parameters
    ----------
    augment_dim : int
        Number of zeros to append (``p`` in the paper).
    dim : int, default 1
        Dimension to extend: the feature dimension of ``(N, D)`` or the channel dimension of
        ``(N, C, L)`` / ``(N, C, H, W)``.

    Shape
    -----
    - input: ``(N, D)`` or ``(N, C, *)``.
    - output: ``(N, D + augment_dim)`` or ``(N, C + augment_dim, *)``; the new entries are zero.
    """

    def __init__(self, augment_dim: int, dim: int = 1) -> None:
        super().__init__()
        self.augment_dim = positive_int("augment_dim", augment_dim, allow_zero=True)
        self.dim = axis("dim", dim)

    def forward(self, x: Tensor) -> Tensor:
        return augment(x, self.augment_dim, self.dim)

    def extra_repr(self) -> str:
        return f"augment_dim={self.augment_dim}, dim={self.dim}"
