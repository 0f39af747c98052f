"""Model families compared by Chen et al. (2018): MLP, ResNet, RK-Net and ODE-Net.

All three deep families share one layout, ``head(body(stem(x)))``:

- ``stem`` maps the input to the feature space (downsampling convolutions, augmentation, ...);
- ``body`` is a stack of residual blocks ``z <- z + f_k(z)`` (:class:`ResNet`: the explicit Euler
  method with step 1 and one vector field per step), or one ODE solve of a single time-dependent
  vector field ``f(t, z)`` (:class:`ODENet`: adaptive solver, adjoint gradients;
  :class:`RKNet`: a fixed-step Runge-Kutta method, backpropagation through the steps);
- ``head`` maps the features to the class logits.

The models contain no training or data code.

References
----------
.. [1] R. T. Q. Chen, Y. Rubanova, J. Bettencourt, D. Duvenaud, "Neural Ordinary Differential
   Equations", NeurIPS 2018, Section 3 and Table 1. https://arxiv.org/abs/1806.07366
.. [2] K. He, X. Zhang, S. Ren, J. Sun, "Identity Mappings in Deep Residual Networks", ECCV 2016
   (pre-activation residual blocks).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from torch import Tensor, nn

from neuralode.nn import ODEBlock
from neuralode.nn._checks import positive_float, positive_int

__all__ = ["FIXED_STEP_RK_METHODS", "MLP", "ResidualBlock", "ResNet", "ODENet", "RKNet", "count_parameters"]

#: Fixed-step Runge-Kutta methods of :func:`neuralode.solve` accepted by :class:`RKNet`.
FIXED_STEP_RK_METHODS = ("euler", "midpoint", "heun2", "heun3", "rk4", "rk4_classic")


def count_parameters(model: nn.Module, trainable_only: bool = True) -> int:
    """Number of scalar parameters of ``model`` (only those requiring gradients by default)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


class MLP(nn.Module):
    """Multilayer perceptron on flattened inputs.

    Parameters
    ----------
    in_features : int
        Number of input features after flattening (e.g. ``784`` for 28x28 images).
    hidden_features : sequence of int
        Widths of the hidden layers; ``(300,)`` is the 1-layer MLP of Chen et al. (2018).
    out_features : int
        Number of outputs (classes).
    activation : callable returning nn.Module, default nn.ReLU
        Factory of the activation put after every hidden layer.

    Shape
    -----
    - input: ``(N, *)`` with ``prod(*) == in_features``.
    - output: ``(N, out_features)``.
    """

    def __init__(
        self,
        in_features: int,
        hidden_features: Sequence[int],
        out_features: int,
        *,
        activation: Callable[[], nn.Module] = nn.ReLU,
    ) -> None:
        super().__init__()
        in_features = positive_int("in_features", in_features)
        out_features = positive_int("out_features", out_features)
        if isinstance(hidden_features, int) or not isinstance(hidden_features, Sequence):
            raise TypeError(
                f"hidden_features must be a sequence of ints such as (300,), got {hidden_features!r}."
            )
        widths = [positive_int(f"hidden_features[{i}]", w) for i, w in enumerate(hidden_features)]
        layers: list[nn.Module] = [nn.Flatten(start_dim=1)]
        previous = in_features
        for width in widths:
            layers += [nn.Linear(previous, width), activation()]
            previous = width
        layers.append(nn.Linear(previous, out_features))
        self.in_features = in_features
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() < 2 or x.shape[1:].numel() != self.in_features:
            raise ValueError(
                f"x must have shape (N, *) with {self.in_features} features per sample, got "
                f"{tuple(x.shape)}."
            )
        return self.net(x)


class ResidualBlock(nn.Module):
    """Residual block ``z + f(z)``: one explicit Euler step of size 1 of ``dz/dt = f(z)``.

    Parameters
    ----------
    f : nn.Module
        The residual branch; its output must have the shape of its input.
    """

    def __init__(self, f: nn.Module) -> None:
        super().__init__()
        if not isinstance(f, nn.Module):
            raise TypeError(f"f must be an nn.Module, got {type(f).__name__}.")
        self.f = f

    def forward(self, z: Tensor) -> Tensor:
        return z + self.f(z)


class ResNet(nn.Module):
    """``head(blocks(stem(x)))`` with residual blocks ``z <- z + f_k(z)``, each with its own weights.

    Parameters
    ----------
    stem : nn.Module
        Input layers (e.g. downsampling).
    residual_fns : sequence of nn.Module
        The residual branches ``f_k``; each becomes a :class:`ResidualBlock`.
    head : nn.Module
        Output layers.

    Shape
    -----
    Whatever ``stem`` accepts -> whatever ``head`` returns, usually ``(N, num_classes)``.
    """

    def __init__(self, stem: nn.Module, residual_fns: Sequence[nn.Module], head: nn.Module) -> None:
        super().__init__()
        if not residual_fns:
            raise ValueError("residual_fns must contain at least one residual branch, got none.")
        self.stem = stem
        self.blocks = nn.Sequential(*(ResidualBlock(f) for f in residual_fns))
        self.head = head

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.blocks(self.stem(x)))


class ODENet(nn.Module):
    """``head(ODEBlock(func)(stem(x)))``: the ODE-Net of Chen et al. (2018).

    Parameters
    ----------
    stem, head : nn.Module
        Input and output layers.
    func : nn.Module
        Time-dependent vector field ``func(t, z)`` on the stem's output.
    t : pair of floats, default (0.0, 1.0)
        Integration interval.
    method : str, default "dopri5"
        Adaptive method of :func:`neuralode.solve`.
    rtol, atol : float, default 1e-3
        Tolerances (those of the ``torchdiffeq`` MNIST example).
    gradient : {"adjoint", "direct", "checkpoint"}, default "adjoint"
        The adjoint method, as in the paper: memory does not grow with the number of steps an
        adaptive solver takes, at the cost of a second solve backwards in time and gradients that
        are only as accurate as that solve.
    **block_kwargs
        Further arguments of :class:`~neuralode.nn.ODEBlock` (``options``, ``adjoint_params``,
        ``kinetic``, ``frobenius``, ``probe``).

    Attributes
    ----------
    block : ODEBlock
        The ODE block; its ``nfe_forward``/``nfe_backward`` are also exposed on the model.
    """

    def __init__(
        self,
        stem: nn.Module,
        func: nn.Module,
        head: nn.Module,
        *,
        t: Sequence[float] = (0.0, 1.0),
        method: str = "dopri5",
        rtol: float = 1e-3,
        atol: float = 1e-3,
        gradient: str | Any = "adjoint",
        **block_kwargs: Any,
    ) -> None:
        super().__init__()
        if "return_trajectory" in block_kwargs:
            raise TypeError("return_trajectory is not an ODENet argument: a classifier uses the final state only.")
        self.stem = stem
        self.block = ODEBlock(func, t, method=method, rtol=rtol, atol=atol, gradient=gradient, **block_kwargs)
        self.head = head

    @property
    def nfe_forward(self) -> int | None:
        """Vector-field evaluations of the last forward solve."""
        return self.block.nfe_forward

    @property
    def nfe_backward(self) -> int | None:
        """Vector-field evaluations of the last backward (adjoint) solve, or ``None``."""
        return self.block.nfe_backward

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.block(self.stem(x)))


class RKNet(ODENet):
    """The ODE-Net's vector field integrated by a fixed-step Runge-Kutta method (Chen et al. 2018).

    Gradients are always ``"direct"``: backpropagation through the Runge-Kutta steps gives the
    exact gradient of the discrete network, and with a small fixed number of steps the memory of
    storing every stage is affordable. This is the RK-Net baseline of Table 1 of the paper.

    Parameters
    ----------
    stem, func, head : nn.Module
        As for :class:`ODENet`.
    t : pair of floats, default (0.0, 1.0)
        Integration interval.
    method : str, default "rk4"
        One of :data:`FIXED_STEP_RK_METHODS`; ``"rk4"`` is the 3/8-rule fourth-order method.
    step_size : float, default 0.25
        Step size (4 steps of ``rk4`` on ``[0, 1]``: 16 evaluations per forward pass).
    **block_kwargs
        ``kinetic``, ``frobenius``, ``probe`` of :class:`~neuralode.nn.ODEBlock`.
    """

    def __init__(
        self,
        stem: nn.Module,
        func: nn.Module,
        head: nn.Module,
        *,
        t: Sequence[float] = (0.0, 1.0),
        method: str = "rk4",
        step_size: float = 0.25,
        **block_kwargs: Any,
    ) -> None:
        if not isinstance(method, str) or method not in FIXED_STEP_RK_METHODS:
            raise ValueError(
                f"method must be a fixed-step Runge-Kutta method, one of {list(FIXED_STEP_RK_METHODS)}, "
                f"got {method!r}; use ODENet for adaptive methods."
            )
        for name in ("gradient", "rtol", "atol", "options", "adjoint_params"):
            if name in block_kwargs:
                raise TypeError(
                    f"{name} is not an RKNet argument: RK-Net always uses gradient='direct' and a fixed "
                    "step (set step_size); use ODENet to choose them."
                )
        step_size = positive_float("step_size", step_size)
        super().__init__(
            stem,
            func,
            head,
            t=t,
            method=method,
            gradient="direct",
            options={"step_size": step_size},
            **block_kwargs,
        )
        self.step_size = step_size
