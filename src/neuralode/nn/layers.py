"""Time-dependent layers for neural ODE vector fields.

A vector field ``f(t, z)`` of a neural ODE may depend on time. The simplest way, used by
Chen et al. (2018) and the examples of ``torchdiffeq``, is to append the scalar time as an extra
input feature (linear layers) or as an extra constant input channel (convolutions). The layers
here do exactly that; every one of them is called as ``layer(t, x)``.

References
----------
.. [1] R. T. Q. Chen, Y. Rubanova, J. Bettencourt, D. Duvenaud, "Neural Ordinary Differential
   Equations", NeurIPS 2018. https://arxiv.org/abs/1806.07366
.. [2] ``torchdiffeq`` examples, ``examples/odenet_mnist.py`` (``ConcatConv2d``).
"""

from __future__ import annotations

import abc
import numbers

import torch
from torch import Tensor, nn

from neuralode.nn._checks import axis, positive_int

__all__ = [
    "TimeDependentModule",
    "ConcatLinear",
    "ConcatConv1d",
    "ConcatConv2d",
    "TimeSequential",
    "Autonomous",
    "SecondOrder",
]


def _time_like(t: Tensor | float, x: Tensor) -> Tensor:
    """Return the time ``t`` with the dtype and device of ``x``: a 0-dim tensor, or, for one time per sample
    (``t`` of shape ``(batch,)``, per-sample stepping), shape ``(batch, 1, ..., 1)`` to broadcast over ``x``."""
    if isinstance(t, Tensor):
        if t.ndim == 1 and x.ndim >= 1 and t.shape[0] == x.shape[0] and t.numel() != 1:
            return t.to(dtype=x.dtype, device=x.device).reshape(x.shape[0], *([1] * (x.ndim - 1)))
        if t.numel() != 1:
            raise ValueError(
                f"t must be a scalar time (a 0-dim tensor or a float) or one time per sample (shape "
                f"({x.shape[0] if x.ndim else 'batch'},)), got a tensor of shape {tuple(t.shape)}."
            )
        return t.reshape(()).to(dtype=x.dtype, device=x.device)
    if isinstance(t, bool) or not isinstance(t, numbers.Real):
        raise TypeError(f"t must be a float or a 0-dim tensor, got {type(t).__name__}.")
    return torch.tensor(float(t), dtype=x.dtype, device=x.device)


class TimeDependentModule(nn.Module, abc.ABC):
    """Base class of modules called as ``module(t, x)``.

    :class:`TimeSequential` passes the time to its children that derive from this class and calls
    every other child as ``child(x)``. Derive from it to make your own time-dependent layer
    composable with the ones here.
    """

    @abc.abstractmethod
    def forward(self, t: Tensor | float, x: Tensor) -> Tensor:  # pragma: no cover - abstract
        """Evaluate the layer at time ``t`` on the input ``x``."""


class ConcatLinear(TimeDependentModule):
    """Linear layer that sees the time as one more input feature.

    ``y = W [t, x] + b`` with ``W`` of shape ``(out_features, in_features + 1)``.

    Parameters
    ----------
    in_features : int
        Size of the last dimension of ``x``.
    out_features : int
        Size of the last dimension of the output.
    bias : bool, default True
        Whether the layer has an additive bias.

    Shape
    -----
    - ``t``: scalar (0-dim tensor or float).
    - ``x``: ``(*, in_features)``.
    - output: ``(*, out_features)``.

    References
    ----------
    Chen et al. (2018), see the module docstring; ``torchdiffeq`` examples.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__()
        self.in_features = positive_int("in_features", in_features)
        self.out_features = positive_int("out_features", out_features)
        self.linear = nn.Linear(self.in_features + 1, self.out_features, bias=bias)

    def forward(self, t: Tensor | float, x: Tensor) -> Tensor:
        if x.dim() < 1 or x.shape[-1] != self.in_features:
            raise ValueError(
                f"x must have shape (*, {self.in_features}) for ConcatLinear(in_features="
                f"{self.in_features}), got {tuple(x.shape)}."
            )
        tt = _time_like(t, x).expand(*x.shape[:-1], 1)
        return self.linear(torch.cat([tt, x], dim=-1))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features} (+1 time feature)"


class _ConcatConv(TimeDependentModule):
    """Shared implementation of the time-concatenating convolutions."""

    _conv_cls: type[nn.Module]
    _spatial_dims: int

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, ...] = 3,
        stride: int | tuple[int, ...] = 1,
        padding: int | tuple[int, ...] | str = 0,
        dilation: int | tuple[int, ...] = 1,
        bias: bool = True,
    ) -> None:
        super().__init__()
        self.in_channels = positive_int("in_channels", in_channels)
        self.out_channels = positive_int("out_channels", out_channels)
        self.conv = self._conv_cls(
            self.in_channels + 1,
            self.out_channels,
            kernel_size=kernel_size,
            stride=stride,
            padding=padding,
            dilation=dilation,
            bias=bias,
        )

    def forward(self, t: Tensor | float, x: Tensor) -> Tensor:
        ndim = self._spatial_dims + 2
        if x.dim() != ndim or x.shape[1] != self.in_channels:
            layout = "(N, C, L)" if self._spatial_dims == 1 else "(N, C, H, W)"
            raise ValueError(
                f"x must have shape {layout} with C={self.in_channels} for "
                f"{type(self).__name__}(in_channels={self.in_channels}), got {tuple(x.shape)}."
            )
        tt = _time_like(t, x).expand(x.shape[0], 1, *x.shape[2:])
        return self.conv(torch.cat([tt, x], dim=1))


class ConcatConv1d(_ConcatConv):
    """1-D convolution whose input gets one extra channel filled with the time ``t``.

    Parameters
    ----------
    in_channels, out_channels : int
        Channels of ``x`` and of the output; the wrapped ``nn.Conv1d`` has ``in_channels + 1``
        input channels.
    kernel_size, stride, padding, dilation, bias
        As for :class:`torch.nn.Conv1d`.

    Shape
    -----
    - ``t``: scalar (0-dim tensor or float).
    - ``x``: ``(N, in_channels, L)``.
    - output: ``(N, out_channels, L_out)`` with ``L_out`` as for ``nn.Conv1d``.

    References
    ----------
    Chen et al. (2018); the ``ConcatConv2d`` of the ``torchdiffeq`` examples, in one dimension.
    """

    _conv_cls = nn.Conv1d
    _spatial_dims = 1


class ConcatConv2d(_ConcatConv):
    """2-D convolution whose input gets one extra channel filled with the time ``t``.

    Parameters
    ----------
    in_channels, out_channels : int
        Channels of ``x`` and of the output; the wrapped ``nn.Conv2d`` has ``in_channels + 1``
        input channels.
    kernel_size, stride, padding, dilation, bias
        As for :class:`torch.nn.Conv2d`.

    Shape
    -----
    - ``t``: scalar (0-dim tensor or float).
    - ``x``: ``(N, in_channels, H, W)``.
    - output: ``(N, out_channels, H_out, W_out)`` as for ``nn.Conv2d``.

    References
    ----------
    Chen et al. (2018); ``torchdiffeq`` ``examples/odenet_mnist.py``.
    """

    _conv_cls = nn.Conv2d
    _spatial_dims = 2


class TimeSequential(TimeDependentModule):
    """Sequential container for vector fields: ``f(t, x) = layer_n(... layer_1(t, x))``.

    Children deriving from :class:`TimeDependentModule` are called as ``child(t, x)``; all other
    children (activations, normalisation, ...) as ``child(x)``.

    Parameters
    ----------
    *layers : nn.Module
        The layers, applied in order.

    Examples
    --------
    >>> f = TimeSequential(ConcatLinear(2, 16), nn.Tanh(), ConcatLinear(16, 2))
    >>> f(torch.tensor(0.5), torch.zeros(8, 2)).shape
    torch.Size([8, 2])
    """

    def __init__(self, *layers: nn.Module) -> None:
        super().__init__()
        if not layers:
            raise ValueError("TimeSequential needs at least one layer, got none.")
        for i, layer in enumerate(layers):
            if not isinstance(layer, nn.Module):
                raise TypeError(
                    f"layers[{i}] must be an nn.Module, got {type(layer).__name__}; wrap functions "
                    "in a module (e.g. nn.Tanh() instead of torch.tanh)."
                )
        self.layers = nn.ModuleList(layers)

    def forward(self, t: Tensor | float, x: Tensor) -> Tensor:
        for layer in self.layers:
            x = layer(t, x) if isinstance(layer, TimeDependentModule) else layer(x)
        return x


class Autonomous(TimeDependentModule):
    """Use a module ``g(x)`` as the time-independent vector field ``f(t, x) = g(x)``.

    Parameters
    ----------
    module : nn.Module
        Called as ``module(x)``; the time is ignored.
    """

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        if not isinstance(module, nn.Module):
            raise TypeError(f"module must be an nn.Module, got {type(module).__name__}.")
        self.module = module

    def forward(self, t: Tensor | float, x: Tensor) -> Tensor:
        return self.module(x)


class SecondOrder(TimeDependentModule):
    """A second-order neural ODE ``x'' = g(t, x, x')`` as the first-order field of ``z = [x, v]``.

    ``f(t, z) = [v, g(t, z)]`` with ``z`` split into halves along ``dim``: the field returns the velocity and
    the acceleration the module predicts from the whole state (Norcliffe et al. 2020; torchdyn's
    ``NeuralODE(..., order=2)``). Solve it from ``z0 = torch.cat([x0, v0], dim)``; for a learnt initial velocity,
    augment: ``AugmentedODEBlock(SecondOrder(g), augment_dim=D)`` starts from ``v0 = 0``.

    Parameters
    ----------
    module : callable
        ``g(t, z)``: the acceleration, of the shape of ``x`` (half of ``z`` along ``dim``). A module of ``z`` alone
        goes in :class:`Autonomous`.
    dim : int, default 1
        The dimension that holds ``[x, v]``: features of ``(N, 2D)``, channels of ``(N, 2C, *)``.

    Shape
    -----
    - input ``z``: ``(N, 2D)`` or ``(N, 2C, *)``; output: the same.

    References
    ----------
    A. Norcliffe, C. Bodnar, B. Day, N. Simidjievski, P. Liò, "On Second Order Behaviour in Augmented Neural
    ODEs", NeurIPS 2020. https://arxiv.org/abs/2006.07220
    """

    def __init__(self, module, dim: int = 1) -> None:
        super().__init__()
        if not callable(module):
            raise TypeError(f"module must be a callable g(t, z), got {type(module).__name__}.")
        self.module = module
        self.dim = axis("dim", dim)

    def forward(self, t: Tensor | float, z: Tensor) -> Tensor:
        size = z.shape[self.dim] if -z.ndim <= self.dim < z.ndim else None
        if size is None or size % 2:
            raise ValueError(f"SecondOrder: the state [x, v] must have an even size along dim={self.dim}, got "
                             f"shape {tuple(z.shape)}; start from torch.cat([x0, v0], dim={self.dim})")
        velocity = z.narrow(self.dim, size // 2, size // 2)
        acceleration = self.module(t, z)
        if not isinstance(acceleration, Tensor) or acceleration.shape != velocity.shape:
            got = tuple(acceleration.shape) if isinstance(acceleration, Tensor) else type(acceleration).__name__
            raise ValueError(f"SecondOrder: module(t, z) must return the acceleration, of shape "
                             f"{tuple(velocity.shape)} (half of z along dim={self.dim}), got {got}")
        return torch.cat([velocity, acceleration], self.dim)

    def extra_repr(self) -> str:
        return f"dim={self.dim}"
