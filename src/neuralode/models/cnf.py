"""Continuous normalising flows (CNF, FFJORD) and the discrete planar flow they are compared with.

A continuous normalising flow transports a standard normal base density through an ODE
``dz/dt = f(t, z)``. The log-density of the moving state obeys the instantaneous change of
variables (Chen et al. 2018, Theorem 1)

.. math::

    \\frac{d \\log p(z(t))}{dt} = -\\operatorname{tr}\\Big(\\frac{\\partial f}{\\partial z}(t, z(t))\\Big),

so the pair ``(z, log p)`` is one ODE, solved here as a tuple state by the public
:func:`neuralode.solve`. Data live at ``t1`` and the base at ``t0``:

- :meth:`CNF.log_prob` solves from ``x = z(t1)`` backwards to ``z(t0)`` with ``l(t1) = 0`` and
  ``dl/dt = -tr(df/dz)``, so ``l(t0) = int_{t0}^{t1} tr dt`` and
  ``log p(x) = log N(z(t0); 0, I) - l(t0)``;
- :meth:`CNF.sample` solves from ``z(t0) ~ N(0, I)`` forwards with ``l(t0) = log N(z(t0); 0, I)``,
  so ``l(t1) = log p(x)``.

The trace is computed exactly (one vector-Jacobian product per dimension; for low dimensions) or
by Hutchinson's estimator ``eps^T (df/dz) eps`` with a probe ``eps`` drawn once per solve and one
vector-Jacobian product per evaluation (FFJORD, Grathwohl et al. 2019). The kinetic energy
``int ||f||^2 dt`` and the Jacobian Frobenius norm ``int ||df/dz||_F^2 dt`` (Finlay et al. 2020) are
optional extra state components, computed from the same vector-Jacobian products.

References
----------
.. [1] R. T. Q. Chen, Y. Rubanova, J. Bettencourt, D. Duvenaud, "Neural Ordinary Differential
   Equations", NeurIPS 2018, Section 4. https://arxiv.org/abs/1806.07366
.. [2] W. Grathwohl, R. T. Q. Chen, J. Bettencourt, I. Sutskever, D. Duvenaud, "FFJORD: Free-form
   Continuous Dynamics for Scalable Reversible Generative Models", ICLR 2019.
   https://arxiv.org/abs/1810.01367
.. [3] C. Finlay, J.-H. Jacobsen, L. Nurbekyan, A. M. Oberman, "How to train your neural ODE: the
   world of Jacobian and kinetic regularization", ICML 2020. https://arxiv.org/abs/2002.02798
.. [4] D. J. Rezende, S. Mohamed, "Variational Inference with Normalizing Flows", ICML 2015.
   https://arxiv.org/abs/1505.05770
.. [5] M. F. Hutchinson, "A stochastic estimator of the trace of the influence matrix for Laplacian
   smoothing splines", Communications in Statistics - Simulation and Computation, 1990.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from neuralode.solve import solve
from neuralode.nn import PROBES, TimeDependentModule, TimeSequential, sample_probe
from neuralode.nn._checks import one_of, positive_float, positive_int
from neuralode.nn.regularisers import graph_inputs, in_inference_mode, vjp_mode

__all__ = [
    "TRACE_ESTIMATORS",
    "CNF",
    "CNFOutput",
    "ConcatSquashLinear",
    "ConcatSquashMLP",
    "PlanarCNFDynamics",
    "PlanarFlow",
    "standard_normal_log_prob",
    "trace_exact",
    "trace_hutchinson",
]

#: Ways of computing ``tr(df/dz)`` in :class:`CNF`.
TRACE_ESTIMATORS = ("exact", "hutchinson")

_LOG_2PI = math.log(2.0 * math.pi)


def standard_normal_log_prob(z: Tensor) -> Tensor:
    """``log N(z; 0, I)`` per sample: ``z`` of shape ``(N, D)`` -> ``(N,)``."""
    return -0.5 * (z.pow(2).sum(-1) + z.shape[-1] * _LOG_2PI)


# --------------------------------------------------------------------------- trace estimators
def trace_exact(f: Tensor, z: Tensor, *, create_graph: bool = False) -> tuple[Tensor, Tensor]:
    """Exact ``tr(df/dz)`` and ``||df/dz||_F^2`` per sample, by one vector-Jacobian product per dimension.

    Parameters
    ----------
    f : Tensor, shape (N, D)
        ``f(t, z)``, computed from ``z`` with gradients enabled. Samples must not interact (the
        Jacobian of the batch is block diagonal), which holds for every per-sample vector field.
    z : Tensor, shape (N, D)
        The input ``f`` was computed from; must require grad.
    create_graph : bool
        Keep the graph of the products, so the result can be differentiated (training).

    Returns
    -------
    trace, frobenius : Tensor, shape (N,)
        ``sum_i (df_i/dz_i)`` and ``sum_ij (df_i/dz_j)^2``: the vjp with the unit vector ``e_i``
        is row ``i`` of the Jacobian, so both come from the same ``D`` products.
    """
    trace = f.new_zeros(f.shape[0])
    frobenius = f.new_zeros(f.shape[0])
    for i in range(f.shape[1]):
        (row,) = torch.autograd.grad(f[:, i].sum(), z, create_graph=create_graph, retain_graph=True)
        trace = trace + row[:, i]
        frobenius = frobenius + row.pow(2).sum(1)
    return trace, frobenius


def trace_hutchinson(f: Tensor, z: Tensor, probe: Tensor, *, create_graph: bool = False) -> tuple[Tensor, Tensor]:
    """Hutchinson's estimates of ``tr(df/dz)`` and ``||df/dz||_F^2`` per sample from one vjp.

    With ``E[eps eps^T] = I``: ``E[eps^T J eps] = tr(J)`` and ``E[||eps^T J||^2] = ||J||_F^2``.

    Parameters
    ----------
    f, z : Tensor, shape (N, D)
        As for :func:`trace_exact`.
    probe : Tensor, shape (N, D)
        ``eps``, e.g. from :func:`neuralode.nn.sample_probe` (Gaussian or Rademacher).
    create_graph : bool
        Keep the graph of the product.

    Returns
    -------
    trace, frobenius : Tensor, shape (N,)
    """
    (eps_jac,) = torch.autograd.grad(f, z, probe, create_graph=create_graph, retain_graph=True)
    return (eps_jac * probe).sum(1), eps_jac.pow(2).sum(1)


class _CNFField:
    """Right-hand side of the augmented state ``(z, l[, kinetic][, frobenius])``.

    Not a module: it holds no parameters, only the user's dynamics and the probe fixed for one solve
    (so the adjoint's backward solve sees the same function as the forward one). ``sign`` is -1 when
    integrating from t1 to t0, so that the regularisers come out as positive integrals over
    [t0, t1] whichever the direction.
    """

    def __init__(self, dynamics, trace: str, probe: Tensor | None, kinetic: bool, frobenius: bool, sign: float):
        self.dynamics, self.trace, self.probe = dynamics, trace, probe
        self.kinetic, self.frobenius, self.sign = kinetic, frobenius, sign

    def __call__(self, t: Tensor, state: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        z = state[0]
        outer_grad, inference = torch.is_grad_enabled(), in_inference_mode()
        with vjp_mode(inference):
            t, z = graph_inputs(t, z, outer_grad, inference)   # the trace needs z in a graph
            f = self.dynamics(t, z)
            if f.shape != z.shape:
                raise ValueError(f"the CNF dynamics must return dz/dt of the shape of z {tuple(z.shape)}, "
                                 f"got {tuple(f.shape)}")
            if self.trace == "exact":
                trace, frob = trace_exact(f, z, create_graph=outer_grad)
            else:
                trace, frob = trace_hutchinson(f, z, self.probe, create_graph=outer_grad)
        out = [f, -trace]
        if self.kinetic:
            out.append(self.sign * f.pow(2).sum(1))
        if self.frobenius:
            out.append(self.sign * frob)
        if not outer_grad:
            out = [o.detach() for o in out]
        return tuple(out)


# --------------------------------------------------------------------------- dynamics
class PlanarCNFDynamics(TimeDependentModule):
    """The planar CNF of Chen et al. (2018): ``dz/dt = sum_m u_m(t) tanh(w_m(t)^T z + b_m(t))``.

    A hypernetwork maps the time ``t`` to the ``M = width`` planar units' parameters
    ``(u_m, w_m, b_m)``: ``t -> tanh(Linear(1, hidden)) -> tanh(Linear(hidden, hidden)) ->
    Linear(hidden, 2 M D + M)``. Unlike the discrete planar flow, the units act in parallel
    (a sum), and no constraint on ``u`` is needed: an ODE flow is invertible whatever ``f`` is,
    as long as it is Lipschitz. The trace is cheap in closed form but :class:`CNF` uses autograd
    for every dynamics alike.

    Parameters
    ----------
    dim : int
        ``D``, the data dimension.
    width : int, default 64
        ``M``, the number of planar units (the paper's "width"; 64 in its Figure 4).
    hidden : int, default 32
        Width of the hypernetwork's hidden layers.

    Shape
    -----
    - ``t``: scalar; ``z``: ``(N, D)``; output ``(N, D)``.

    Notes
    -----
    The paper's formula is a sum over units; the ``torchdiffeq`` example ``cnf.py`` takes the mean
    and gates ``u`` by a sigmoid. We keep the sum, with the hypernetwork's output layer scaled
    down by ``1/sqrt(M)`` at initialisation so that ``|f|`` does not grow with the width.
    """

    def __init__(self, dim: int, width: int = 64, hidden: int = 32) -> None:
        super().__init__()
        self.dim = positive_int("dim", dim)
        self.width = positive_int("width", width)
        hidden = positive_int("hidden", hidden)
        self.hypernet = nn.Sequential(
            nn.Linear(1, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(),
            nn.Linear(hidden, 2 * self.width * self.dim + self.width),
        )
        with torch.no_grad():
            self.hypernet[-1].weight.mul_(1.0 / math.sqrt(self.width))
            self.hypernet[-1].bias.mul_(1.0 / math.sqrt(self.width))

    def unit_parameters(self, t: Tensor | float) -> tuple[Tensor, Tensor, Tensor]:
        """``(u, w, b)`` at time ``t``: shapes ``(M, D)``, ``(M, D)``, ``(M,)``."""
        p = self.hypernet[0].weight
        tt = torch.as_tensor(t, dtype=p.dtype, device=p.device).reshape(1, 1)
        params = self.hypernet(tt).reshape(-1)
        md = self.width * self.dim
        u = params[:md].view(self.width, self.dim)
        w = params[md:2 * md].view(self.width, self.dim)
        return u, w, params[2 * md:]

    def forward(self, t: Tensor | float, z: Tensor) -> Tensor:
        if z.dim() != 2 or z.shape[1] != self.dim:
            raise ValueError(f"z must have shape (N, {self.dim}) for PlanarCNFDynamics(dim={self.dim}), "
                             f"got {tuple(z.shape)}")
        u, w, b = self.unit_parameters(t)
        u, w, b = u.to(z.dtype), w.to(z.dtype), b.to(z.dtype)
        return torch.tanh(z @ w.T + b) @ u


class ConcatSquashLinear(TimeDependentModule):
    """FFJORD's time-conditioned linear layer: ``y = (W x + c) * sigmoid(G t + g) + h t``.

    Parameters
    ----------
    in_features, out_features : int
        Sizes of the last dimension of ``x`` and of the output.

    Shape
    -----
    - ``t``: scalar; ``x``: ``(*, in_features)``; output ``(*, out_features)``.

    References
    ----------
    Grathwohl et al. (2019), ``ffjord/lib/layers/diffeq_layers/basic.py`` (``ConcatSquashLinear``).
    """

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.in_features = positive_int("in_features", in_features)
        self.out_features = positive_int("out_features", out_features)
        self.linear = nn.Linear(self.in_features, self.out_features)
        self.gate = nn.Linear(1, self.out_features)
        self.hyper_bias = nn.Linear(1, self.out_features, bias=False)

    def forward(self, t: Tensor | float, x: Tensor) -> Tensor:
        if x.dim() < 1 or x.shape[-1] != self.in_features:
            raise ValueError(f"x must have shape (*, {self.in_features}) for ConcatSquashLinear(in_features="
                             f"{self.in_features}), got {tuple(x.shape)}")
        tt = torch.as_tensor(t, dtype=x.dtype, device=x.device).reshape(1, 1)
        scale = torch.sigmoid(self.gate(tt)).reshape(-1)
        return self.linear(x) * scale + self.hyper_bias(tt).reshape(-1)


_ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {"tanh": nn.Tanh, "softplus": nn.Softplus}


class ConcatSquashMLP(TimeDependentModule):
    """FFJORD's MLP dynamics: :class:`ConcatSquashLinear` layers with a smooth activation between.

    Parameters
    ----------
    dim : int
        ``D``, the data dimension (input and output width).
    hidden : sequence of int, default (64, 64)
        Hidden widths.
    activation : {"tanh", "softplus"}, default "tanh"
        Smooth activations only: the trace needs ``df/dz`` to be continuous (FFJORD uses softplus
        or tanh; ReLU would make the density piecewise constant in its log-derivative).

    Shape
    -----
    - ``t``: scalar; ``z``: ``(N, D)``; output ``(N, D)``.
    """

    def __init__(self, dim: int, hidden: Sequence[int] = (64, 64), activation: str = "tanh") -> None:
        super().__init__()
        self.dim = positive_int("dim", dim)
        if isinstance(hidden, int) or not isinstance(hidden, Sequence):
            raise TypeError(f"hidden must be a sequence of ints such as (64, 64), got {hidden!r}")
        widths = [positive_int(f"hidden[{i}]", h) for i, h in enumerate(hidden)]
        one_of("activation", activation, tuple(_ACTIVATIONS))
        layers: list[nn.Module] = []
        previous = self.dim
        for width in widths:
            layers += [ConcatSquashLinear(previous, width), _ACTIVATIONS[activation]()]
            previous = width
        layers.append(ConcatSquashLinear(previous, self.dim))
        self.net = TimeSequential(*layers)

    def forward(self, t: Tensor | float, z: Tensor) -> Tensor:
        if z.dim() != 2 or z.shape[1] != self.dim:
            raise ValueError(f"z must have shape (N, {self.dim}) for ConcatSquashMLP(dim={self.dim}), "
                             f"got {tuple(z.shape)}")
        return self.net(t, z)


# --------------------------------------------------------------------------- CNF
@dataclass
class CNFOutput:
    """What :meth:`CNF.forward` returns for a batch of data ``x`` of shape ``(N, D)``.

    Attributes
    ----------
    log_prob : Tensor, shape (N,)
        ``log p(x)``.
    z : Tensor, shape (N, D)
        The base-space points ``z(t0)``.
    delta_log_prob : Tensor, shape (N,)
        ``int_{t0}^{t1} tr(df/dz) dt`` (the estimate, with Hutchinson's trace), so that
        ``log_prob = log N(z; 0, I) - delta_log_prob``.
    kinetic : Tensor of shape (N,) or None
        ``int_{t0}^{t1} ||f||^2 dt`` when the CNF was built with ``kinetic=True``.
    frobenius : Tensor of shape (N,) or None
        ``int_{t0}^{t1} ||df/dz||_F^2 dt`` (exact, or Hutchinson's estimate) with ``frobenius=True``.
    stats : dict
        The solve's ``Solution.stats`` (``nfe``, ``n_steps``, ... ; ``nfe_backward`` after backward).
    """

    log_prob: Tensor
    z: Tensor
    delta_log_prob: Tensor
    kinetic: Tensor | None
    frobenius: Tensor | None
    stats: dict


class CNF(nn.Module):
    """Continuous normalising flow with a standard normal base at ``t0`` and data at ``t1``.

    Parameters
    ----------
    dynamics : nn.Module
        The vector field ``f(t, z)``, ``z`` of shape ``(N, D)``, e.g. :class:`PlanarCNFDynamics`
        (Chen et al. 2018) or :class:`ConcatSquashMLP` (FFJORD). Samples must not interact.
    dim : int
        ``D``.
    t0, t1 : float, default 0.0, 1.0
        Base time and data time, ``t0 != t1``.
    trace : {"exact", "hutchinson"}, default "exact"
        ``"exact"`` costs ``D`` vector-Jacobian products per evaluation (use for small ``D``, and
        for evaluation); ``"hutchinson"`` costs one and is unbiased (FFJORD; for training in higher
        dimensions). With Hutchinson the log-density itself is a stochastic (unbiased) estimate.
    probe : {"gaussian", "rademacher"}, default "rademacher"
        Distribution of Hutchinson's probe, drawn once per solve (it must be fixed during a solve,
        or the ODE would be random). Rademacher probes have the smaller variance.
    method : str, default "dopri5"
        A method of :func:`neuralode.solve`.
    rtol, atol : float, default 1e-5
        Tolerances (FFJORD's values).
    options : dict, optional
        Solver options (e.g. ``{"step_size": 0.05}`` for a fixed-step method).
    gradient : {"adjoint", "direct", "checkpoint"} or a strategy object, default "adjoint"
        How the solve is differentiated (Chen et al. use the adjoint).
    kinetic, frobenius : bool, default False
        Also integrate ``||f||^2`` and ``||df/dz||_F^2`` (Finlay et al. 2020); returned in
        :class:`CNFOutput`. They add state components, so the solver's error control sees them.

    Attributes
    ----------
    last_stats : dict or None
        ``Solution.stats`` of the last solve (updated in place by an adjoint backward).

    Examples
    --------
    >>> cnf = CNF(ConcatSquashMLP(2, (32, 32)), 2)
    >>> x = cnf.sample(5)
    >>> cnf.log_prob(x).shape
    torch.Size([5])
    """

    def __init__(
        self,
        dynamics: nn.Module,
        dim: int,
        *,
        t0: float = 0.0,
        t1: float = 1.0,
        trace: str = "exact",
        probe: str = "rademacher",
        method: str = "dopri5",
        rtol: float = 1e-5,
        atol: float = 1e-5,
        options: Mapping[str, Any] | None = None,
        gradient: str | Any = "adjoint",
        kinetic: bool = False,
        frobenius: bool = False,
    ) -> None:
        super().__init__()
        if not isinstance(dynamics, nn.Module):
            raise TypeError(f"dynamics must be an nn.Module called as dynamics(t, z), got {type(dynamics).__name__}; "
                            "use PlanarCNFDynamics or ConcatSquashMLP")
        self.dynamics = dynamics
        self.dim = positive_int("dim", dim)
        for name, value in (("t0", t0), ("t1", t1)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise TypeError(f"{name} must be a finite float, got {value!r}")
        if t0 == t1:
            raise ValueError(f"t0 and t1 must differ, got t0 = t1 = {t0}")
        self.t0, self.t1 = float(t0), float(t1)
        self.trace = one_of("trace", trace, TRACE_ESTIMATORS)
        self.probe = one_of("probe", probe, PROBES)
        if not isinstance(method, str):
            raise TypeError(f"method must be a str such as 'dopri5', got {type(method).__name__}")
        self.method = method
        self.rtol = positive_float("rtol", rtol)
        self.atol = positive_float("atol", atol)
        if options is not None and not isinstance(options, Mapping):
            raise TypeError(f"options must be a dict such as {{'step_size': 0.1}}, got {type(options).__name__}")
        self.options = dict(options) if options is not None else None
        if isinstance(gradient, str):
            one_of("gradient", gradient, ("adjoint", "direct", "checkpoint"))
        self.gradient = gradient
        self.kinetic = bool(kinetic)
        self.frobenius = bool(frobenius)
        self.last_stats: dict | None = None

    def _check_points(self, name: str, x: Tensor) -> None:
        if not isinstance(x, Tensor):
            raise TypeError(f"{name} must be a Tensor of shape (N, {self.dim}), got {type(x).__name__}")
        if x.dim() != 2 or x.shape[1] != self.dim:
            raise ValueError(f"{name} must have shape (N, {self.dim}), got {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}; cast it with .float()")

    def _solve(self, z: Tensor, l0: Tensor, start: float, end: float, probe: Tensor | None):
        sign = 1.0 if end > start else -1.0
        field = _CNFField(self.dynamics, self.trace, probe, self.kinetic, self.frobenius, sign)
        zeros = z.new_zeros(z.shape[0])
        y0 = (z, l0) + tuple(zeros.clone() for _ in range(self.kinetic + self.frobenius))
        t = torch.tensor([start, end], dtype=torch.float64, device=z.device)
        solution = solve(field, y0, t, method=self.method, rtol=self.rtol, atol=self.atol,
                                   options=self.options, gradient=self.gradient,
                                   adjoint_params=tuple(self.dynamics.parameters()))
        self.last_stats = solution.stats
        final = tuple(y[-1] for y in solution.ys)
        kinetic = final[2] if self.kinetic else None
        frobenius = final[2 + self.kinetic] if self.frobenius else None
        return final[0], final[1], kinetic, frobenius, solution.stats

    def _draw_probe(self, like: Tensor, probe: Tensor | None) -> Tensor | None:
        if self.trace == "exact":
            return None
        if probe is None:
            return sample_probe(like, self.probe)
        if not isinstance(probe, Tensor) or probe.shape != like.shape:
            raise ValueError(f"probe must be a Tensor of shape {tuple(like.shape)}, got "
                             f"{tuple(probe.shape) if isinstance(probe, Tensor) else type(probe).__name__}")
        return probe.to(like)

    def forward(self, x: Tensor, *, probe: Tensor | None = None) -> CNFOutput:
        """Map data ``x`` (at ``t1``) to the base (at ``t0``) and return its log-density and more.

        Parameters
        ----------
        x : Tensor, shape (N, D)
        probe : Tensor, shape (N, D), optional
            Hutchinson probe to use (default: drawn afresh); ignored with the exact trace.

        Returns
        -------
        CNFOutput
        """
        self._check_points("x", x)
        probe = self._draw_probe(x, probe)
        z, delta, kinetic, frobenius, stats = self._solve(x, x.new_zeros(x.shape[0]), self.t1, self.t0, probe)
        return CNFOutput(standard_normal_log_prob(z) - delta, z, delta, kinetic, frobenius, stats)

    def log_prob(self, x: Tensor, *, probe: Tensor | None = None) -> Tensor:
        """``log p(x)``, shape ``(N,)``, for data ``x`` of shape ``(N, D)``; see :meth:`forward`."""
        return self.forward(x, probe=probe).log_prob

    def sample(self, n: int | None = None, *, z: Tensor | None = None, return_log_prob: bool = False,
               probe: Tensor | None = None) -> Tensor | tuple[Tensor, Tensor]:
        """Draw samples: ``z ~ N(0, I)`` at ``t0``, solved forwards to ``x = z(t1)``.

        Parameters
        ----------
        n : int, optional
            Number of samples (drawn in the dtype and device of the parameters).
        z : Tensor, shape (N, D), optional
            Base points to transport instead of fresh draws (give ``n`` or ``z``).
        return_log_prob : bool
            Also return ``log p(x)`` from the same solve (for reverse-KL training, Chen et al. 2018
            Section 4.1).
        probe : Tensor, optional
            Hutchinson probe; ignored with the exact trace.

        Returns
        -------
        x : Tensor, shape (N, D)
        log_prob : Tensor, shape (N,), with ``return_log_prob=True``
        """
        if (n is None) == (z is None):
            raise ValueError("give exactly one of n (number of samples) and z (base points of shape (N, D))")
        if z is None:
            n = positive_int("n", n)
            param = next(self.dynamics.parameters(), None)
            dtype = param.dtype if param is not None else torch.get_default_dtype()
            z = torch.randn(n, self.dim, dtype=dtype, device=None if param is None else param.device)
        self._check_points("z", z)
        probe = self._draw_probe(z, probe)
        x, log_prob, _, _, _ = self._solve(z, standard_normal_log_prob(z), self.t0, self.t1, probe)
        return (x, log_prob) if return_log_prob else x

    def extra_repr(self) -> str:
        parts = [f"dim={self.dim}", f"t0={self.t0}", f"t1={self.t1}", f"trace={self.trace!r}"]
        if self.trace == "hutchinson":
            parts.append(f"probe={self.probe!r}")
        parts += [f"method={self.method!r}", f"rtol={self.rtol:g}", f"atol={self.atol:g}",
                  f"gradient={self.gradient!r}"]
        if self.kinetic or self.frobenius:
            parts.append(f"kinetic={self.kinetic}, frobenius={self.frobenius}")
        return ", ".join(parts)


# --------------------------------------------------------------------------- planar flow
class PlanarFlow(nn.Module):
    """Discrete planar normalising flow of depth ``K`` (Rezende and Mohamed 2015).

    Each layer maps ``z -> z + u_hat tanh(w^T z + b)``, with the exact log-determinant
    ``log |1 + u_hat^T psi(z)|``, ``psi(z) = (1 - tanh^2(w^T z + b)) w``. Invertibility needs
    ``w^T u_hat >= -1``; as in the paper's appendix, ``u_hat = u + (m(w^T u) - w^T u) w / ||w||^2``
    with ``m(a) = -1 + softplus(a)``, so ``w^T u_hat = m(w^T u) > -1``.

    The flow has no closed-form inverse, so it gives densities of its own samples only (what
    Chen et al. 2018, Section 4.1, compare against: fitting a target density by reverse KL).

    Parameters
    ----------
    dim : int
        ``D``.
    depth : int
        ``K``, the number of planar layers.

    Shape
    -----
    - :meth:`forward`: ``z`` ``(N, D)`` -> ``(x (N, D), log_det (N,))``.
    """

    def __init__(self, dim: int, depth: int) -> None:
        super().__init__()
        self.dim = positive_int("dim", dim)
        self.depth = positive_int("depth", depth)
        self.u = nn.Parameter(0.1 * torch.randn(self.depth, self.dim))
        self.w = nn.Parameter(0.1 * torch.randn(self.depth, self.dim))
        self.b = nn.Parameter(torch.zeros(self.depth))

    def u_hat(self) -> Tensor:
        """The constrained ``u_hat``, shape ``(K, D)``, with ``w_k^T u_hat_k > -1`` for every layer."""
        wu = (self.w * self.u).sum(1, keepdim=True)
        m = -1.0 + F.softplus(wu)
        return self.u + (m - wu) * self.w / self.w.pow(2).sum(1, keepdim=True).clamp_min(1e-12)

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor]:
        if not isinstance(z, Tensor) or z.dim() != 2 or z.shape[1] != self.dim:
            shape = tuple(z.shape) if isinstance(z, Tensor) else type(z).__name__
            raise ValueError(f"z must be a Tensor of shape (N, {self.dim}), got {shape}")
        u_hat = self.u_hat().to(z.dtype)
        w, b = self.w.to(z.dtype), self.b.to(z.dtype)
        log_det = z.new_zeros(z.shape[0])
        for k in range(self.depth):
            h = torch.tanh(z @ w[k] + b[k])  # (N,)
            psi_u = (1.0 - h.pow(2)) * (w[k] @ u_hat[k])
            log_det = log_det + torch.log((1.0 + psi_u).abs())
            z = z + h[:, None] * u_hat[k]
        return z, log_det

    def sample(self, n: int | None = None, *, z: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Samples ``x`` and their log-densities ``log q(x) = log N(z; 0, I) - sum_k log|det_k|``.

        Give ``n`` (fresh standard normal draws) or ``z`` (base points, ``(N, D)``).
        """
        if (n is None) == (z is None):
            raise ValueError("give exactly one of n (number of samples) and z (base points of shape (N, D))")
        if z is None:
            z = torch.randn(positive_int("n", n), self.dim, dtype=self.u.dtype, device=self.u.device)
        x, log_det = self.forward(z)
        return x, standard_normal_log_prob(z) - log_det

    def extra_repr(self) -> str:
        return f"dim={self.dim}, depth={self.depth}"
