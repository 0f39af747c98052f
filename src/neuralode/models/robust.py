"""The MNIST networks of Yan, Du, Tan and Feng (2020): CNN, ODE-Net and TisODE.

The layout follows the authors' code release (``HanshuYAN/TisODE``, ``mnist/networks.py``):

- stem: ``Conv2d(C_in, C, 3)`` (no padding: 28 -> 26), ``GroupNorm, ReLU``,
  ``Conv2d(C, C, 4, 2, 1)`` (26 -> 13), ``GroupNorm, ReLU``;
- body, one of
  - CNN: one post-activation residual block ``z + relu(norm(conv(relu(norm(conv(z))))))`` with
    bias-free 3x3 convolutions;
  - ODE-Net: ``dz/dt = f(t, z)`` on ``[0, 1]``, ``f = relu(norm(ConcatConv(relu(norm(ConcatConv(t, z))))))``
    (the time enters every convolution as an extra channel), forward Euler with step 0.1;
  - TisODE: a *time-invariant* field ``f(z)`` (the CNN's residual branch, wrapped in
    :class:`~neuralode.nn.Autonomous`), forward Euler with step 0.05;
- head: ``AdaptiveAvgPool2d(1), Flatten, Linear(C, num_classes)`` (no normalisation before the
  pool, unlike Chen et al.'s head).

All three are differentiated by backpropagation through the Euler steps (the authors' setting:
``adjoint: False``). With ``C = 64`` they have 141,130 (CNN), 142,410 (ODE-Net) and 141,130
(TisODE) parameters, the counts printed in the authors' training logs.

**The steady-state regulariser of TisODE.** The time-invariant field makes the flow depend only on
the state, so a trajectory that has settled (``f(z) = 0``) stays put; Yan et al. ask the flow to
be near such a steady state at the output time ``T`` by penalising how far it still moves just
before and after ``T``. Their code integrates the field from ``0`` to ``t_b`` and, along the way,
the elementwise ``|f|`` from ``t_a`` to ``t_b``; the penalty is the mean over every element of the
feature map and over the batch::

    L_ss = mean_{i, c, h, w}  int_{t_a}^{t_b} |f(z_i(t))_{c,h,w}| dt,      (t_a, T, t_b) = (0.9, 1.0, 1.5)

(an ``nn.L1Loss`` against zero), added to the cross-entropy with weight ``0.01``. Here the
integral is one more component of the solved state (``da/dt = mean |f(z)|``, one value per sample),
so it costs no extra field evaluations: :class:`TisODENet` exposes it as :attr:`TisODENet.steady_state`
after a forward pass in training mode. In evaluation mode only ``[0, T]`` is solved.

References
----------
.. [1] H. Yan, J. Du, V. Y. F. Tan, J. Feng, "On Robustness of Neural Ordinary Differential
   Equations", ICLR 2020. https://arxiv.org/abs/1910.05513 ; code: https://github.com/HanshuYAN/TisODE
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from neuralode.models.base import FIXED_STEP_RK_METHODS, ODENet, ResNet
from neuralode.nn import Autonomous, ConcatConv2d, TimeSequential
from neuralode.nn._checks import one_of, positive_float, positive_int
from neuralode.solve import solve

__all__ = ["ROBUST_KINDS", "SteadyStateDynamics", "TisODENet", "robust_classifier"]

ROBUST_KINDS = ("cnn", "odenet", "tisode")


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(32, channels), channels)


def _stem(in_channels: int, channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, channels, 3, 1),
        _norm(channels),
        nn.ReLU(),
        nn.Conv2d(channels, channels, 4, 2, 1),
        _norm(channels),
        nn.ReLU(),
    )


def _head(channels: int, num_classes: int) -> nn.Sequential:
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, num_classes))


def _branch(channels: int) -> nn.Sequential:
    """``relu(norm(conv(relu(norm(conv(z))))))`` with bias-free 3x3 convolutions."""
    return nn.Sequential(
        nn.Conv2d(channels, channels, 3, 1, 1, bias=False),
        _norm(channels),
        nn.ReLU(),
        nn.Conv2d(channels, channels, 3, 1, 1, bias=False),
        _norm(channels),
        nn.ReLU(),
    )


def _time_field(channels: int) -> TimeSequential:
    return TimeSequential(
        ConcatConv2d(channels, channels, 3, 1, 1),
        _norm(channels),
        nn.ReLU(),
        ConcatConv2d(channels, channels, 3, 1, 1),
        _norm(channels),
        nn.ReLU(),
    )


class SteadyStateDynamics:
    """Vector field of the state ``(z, a)`` with ``dz/dt = f(z)`` and ``da/dt = mean |f(z)|``.

    Not a module: it holds only the user's field. ``a`` has one value per sample (the mean runs
    over every non-batch dimension), so ``a(t_b) - a(t_a)`` is the per-sample steady-state term of
    Yan et al. (2020) whatever the solver's steps are.

    Parameters
    ----------
    func : callable
        ``func(t, z) -> dz/dt`` with ``z`` of shape ``(N, *)``.
    """

    def __init__(self, func) -> None:
        if not callable(func):
            raise TypeError(f"func must be callable as func(t, z), got {type(func).__name__}.")
        self.func = func

    def __call__(self, t: Tensor, state: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        f = self.func(t, state[0])
        return f, f.abs().flatten(1).mean(1)


class TisODENet(nn.Module):
    """``head(z(T))`` with ``dz/dt = f(z)``, ``z(0) = stem(x)``: the TisODE classifier.

    Parameters
    ----------
    stem, head : nn.Module
        Input and output layers.
    field : nn.Module
        Time-invariant vector field, called as ``field(t, z)`` (wrap a module ``g(z)`` in
        :class:`~neuralode.nn.Autonomous`).
    t_end : float, default 1.0
        The output time ``T``.
    steady : pair of floats, default (0.9, 1.5)
        ``(t_a, t_b)``, the window of the steady-state integral; ``0 < t_a < t_b``.
    method : str, default "euler"
        A method of :func:`neuralode.solve`.
    step_size : float, default 0.05
        Step of a fixed-step method.
    gradient : {"direct", "adjoint", "checkpoint"}, default "direct"

    Attributes
    ----------
    steady_state : Tensor of shape (N,) or None
        ``mean |f|`` integrated over ``[t_a, t_b]`` per sample, from the last forward pass in
        training mode (``None`` after one in evaluation mode), connected to the graph.
    nfe_forward : int or None
        Field evaluations of the last forward solve.
    """

    def __init__(
        self,
        stem: nn.Module,
        field: nn.Module,
        head: nn.Module,
        *,
        t_end: float = 1.0,
        steady: Sequence[float] = (0.9, 1.5),
        method: str = "euler",
        step_size: float = 0.05,
        gradient: str = "direct",
    ) -> None:
        super().__init__()
        self.stem, self.field, self.head = stem, field, head
        self.t_end = positive_float("t_end", t_end)
        steady = tuple(float(s) for s in steady)
        if len(steady) != 2 or not 0.0 < steady[0] < steady[1]:
            raise ValueError(f"steady must be a window (t_a, t_b) with 0 < t_a < t_b, got {steady}.")
        self.steady = steady
        self.method = method
        self.step_size = positive_float("step_size", step_size)
        self.gradient = gradient
        self.steady_state: Tensor | None = None
        self.last_stats: dict[str, Any] | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = dict(super().__getstate__())
        state["steady_state"] = None  # a graph tensor: deepcopy and pickle refuse it
        return state

    @property
    def nfe_forward(self) -> int | None:
        return None if self.last_stats is None else int(self.last_stats["nfe"])

    def _solve(self, func, y0, times: list[float], like: Tensor):
        t = torch.tensor(times, dtype=torch.float64, device=like.device)
        options = {"step_size": self.step_size} if self.method in FIXED_STEP_RK_METHODS else None
        solution = solve(func, y0, t, method=self.method, options=options, gradient=self.gradient,
                         rtol=1e-3, atol=1e-3)
        self.last_stats = solution.stats
        return solution.ys

    def forward(self, x: Tensor) -> Tensor:
        z0 = self.stem(x)
        if not self.training:
            self.steady_state = None
            return self.head(self._solve(self.field, z0, [0.0, self.t_end], z0)[-1])
        t_a, t_b = self.steady
        times = sorted({0.0, self.t_end, t_a, t_b})
        zs, acc = self._solve(SteadyStateDynamics(self.field), (z0, z0.new_zeros(z0.shape[0])), times, z0)
        self.steady_state = acc[times.index(t_b)] - acc[times.index(t_a)]
        return self.head(zs[times.index(self.t_end)])



def robust_classifier(
    kind: str,
    *,
    in_channels: int = 1,
    num_classes: int = 10,
    channels: int = 64,
    step_size: float | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Build one of Yan et al.'s MNIST classifiers.

    Parameters
    ----------
    kind : {"cnn", "odenet", "tisode"}
    in_channels, num_classes, channels : int
        Image channels, classes, feature maps (64 in the paper's code).
    step_size : float, optional
        Euler step of the ODE models (default 0.1 for the ODE-Net, 0.05 for TisODE, the authors').
    **kwargs
        ``odenet``: further arguments of :class:`~neuralode.models.ODENet` (``t``, ``method``,
        ``gradient``); ``tisode``: of :class:`TisODENet` (``t_end``, ``steady``, ``method``,
        ``gradient``).

    Returns
    -------
    nn.Module
        Maps ``(N, in_channels, H, W)`` to logits ``(N, num_classes)``.
    """
    kind = one_of("kind", kind, ROBUST_KINDS)
    in_channels = positive_int("in_channels", in_channels)
    num_classes = positive_int("num_classes", num_classes)
    channels = positive_int("channels", channels)
    stem, head = _stem(in_channels, channels), _head(channels, num_classes)
    if kind == "cnn":
        if step_size is not None or kwargs:
            raise TypeError("kind='cnn' takes no solver arguments; use kind='odenet' or 'tisode'.")
        return ResNet(stem, [_branch(channels)], head)
    if kind == "odenet":
        step = positive_float("step_size", 0.1 if step_size is None else step_size)
        kwargs.setdefault("method", "euler")
        kwargs.setdefault("gradient", "direct")
        if kwargs["method"] in FIXED_STEP_RK_METHODS:
            kwargs.setdefault("options", {"step_size": step})
        return ODENet(stem, _time_field(channels), head, **kwargs)
    step = 0.05 if step_size is None else step_size
    return TisODENet(stem, Autonomous(_branch(channels)), head, step_size=step, **kwargs)
