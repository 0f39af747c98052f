"""Latent ODE for irregularly sampled time series, with an ODE-RNN or RNN encoder, and an RNN baseline.

The generative model (Chen et al. 2018, Section 5) is

.. math::

    z_0 \\sim \\mathcal N(0, I), \\qquad \\frac{dz}{dt} = f_\\theta(z), \\qquad
    x(t_i) \\sim \\mathcal N\\big(g_\\theta(z(t_i)), \\operatorname{diag}(\\sigma^2)\\big),

with a recognition network ``q(z_0 | x) = N(mu, diag(exp(logvar)))`` that reads the observations
backwards in time: a GRU whose input includes the time gaps (Chen et al.) or an ODE-RNN, whose hidden
state follows a learned ODE between observations and jumps by a GRU update at each of them
(Rubanova, Chen and Duvenaud 2019). Training maximises the ELBO

.. math::

    \\mathcal L = \\mathbb E_{q(z_0|x)} \\Big[\\sum_{i, d:\\, m_{id} = 1} \\log \\mathcal N(x_{id};
    g(z(t_i))_d, \\sigma_d^2)\\Big] - \\operatorname{KL}\\big(q(z_0|x) \\,\\|\\, \\mathcal N(0, I)\\big),

estimated with one reparameterised sample ``z_0 = mu + exp(logvar / 2) * eps``.

Batch representation
--------------------
A batch of ``B`` series with their own numbers of observations and their own times is given on a
**union time grid** (what :func:`neuralode.data.collate_physionet` with ``grid="union"`` builds):

- ``times``: shape ``(U,)``, strictly increasing, the union of the batch's observation times;
- ``values``: shape ``(B, U, D)``; anything where not observed;
- ``mask``: shape ``(B, U, D)``, True (or 1) where ``values`` holds an observation; a sample
  "has" the time ``times[u]`` when any entry of ``mask[b, u]`` is set.

Nothing a sample gets depends on the other samples of its batch (given its own ``eps``):

- the encoders first gather each sample's own observation times (a padded ``(B, L)`` layout,
  ``L`` = the most observations of any sample) and skip padded steps exactly (the hidden state is
  kept by ``torch.where``; the ODE-RNN's ODE runs over the sample's own gap, rescaled to
  ``s in [0, 1]`` as ``dh/ds = (t_prev - t_j) h'(h)``, so padded steps have a zero gap and every
  sample takes the same fixed steps in ``s``);
- the decoder solves once for the whole batch from the reference time ``t0`` (a model attribute,
  not the batch's first time) through the union grid. Output times never change the steps
  :func:`neuralode.solve` takes, and with a fixed step size the grid ``t0 + k h`` is the same for
  every batch (we extend the solve to the next grid point after the last output time so that the
  last step is never clipped at a batch-dependent end), so a sample's values at its own times are
  the same as if it were solved alone (up to floating-point rounding of batched matrix products).
  With an adaptive method (``step_size=None``) the samples share accepted steps, and a sample's
  result depends on its batch-mates within the solver's tolerance only.

References
----------
.. [1] R. T. Q. Chen, Y. Rubanova, J. Bettencourt, D. Duvenaud, "Neural Ordinary Differential
   Equations", NeurIPS 2018, Section 5. https://arxiv.org/abs/1806.07366
.. [2] Y. Rubanova, R. T. Q. Chen, D. Duvenaud, "Latent ODEs for Irregularly-Sampled Time Series",
   NeurIPS 2019. https://arxiv.org/abs/1907.03907
.. [3] D. P. Kingma, M. Welling, "Auto-Encoding Variational Bayes", ICLR 2014 (reparameterisation).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from neuralode.solve import solve
from neuralode.nn import Autonomous
from neuralode.nn._checks import one_of, positive_float, positive_int
from neuralode.options import check_method

__all__ = [
    "ENCODERS",
    "LatentODE",
    "LatentODEOutput",
    "ObservationEncoder",
    "Observations",
    "RNNBaseline",
    "size_matched_rnn_width",
    "RNNBaselineOutput",
    "gaussian_log_likelihood",
    "gather_observations",
    "normal_kl",
]

#: Encoders of :class:`LatentODE`.
ENCODERS = ("odernn", "rnn")

_LOG_2PI = math.log(2.0 * math.pi)


# --------------------------------------------------------------------------- batch representation
@dataclass
class Observations:
    """Each sample's own observations, gathered from a union grid by :func:`gather_observations`.

    Attributes
    ----------
    times : Tensor, float64, shape (B, L)
        The sample's observation times in increasing order, padded (with the last time, or ``t0``
        for a sample without observations) beyond ``lengths[b]``.
    values : Tensor, shape (B, L, D)
        The observed values, 0 where not observed or padded.
    mask : Tensor, bool, shape (B, L, D)
    valid : Tensor, bool, shape (B, L)
        True for the first ``lengths[b]`` steps of sample ``b``.
    index : Tensor, int64, shape (B, L)
        Position of each step on the union grid (meaningless where not valid).
    lengths : Tensor, int64, shape (B,)
    """

    times: Tensor
    values: Tensor
    mask: Tensor
    valid: Tensor
    index: Tensor
    lengths: Tensor


def _check_union_batch(times: Tensor, values: Tensor | None, mask: Tensor | None, prefix: str = "") -> None:
    if not isinstance(times, Tensor) or times.dim() != 1:
        shape = tuple(times.shape) if isinstance(times, Tensor) else type(times).__name__
        raise ValueError(f"{prefix}times must be a 1-D tensor (the batch's union time grid, shape (U,)), got {shape}")
    if times.numel() == 0:
        raise ValueError(f"{prefix}times is empty; a batch needs at least one time")
    if times.numel() > 1 and not bool((times[1:] > times[:-1]).all()):
        raise ValueError(f"{prefix}times must be strictly increasing (a union grid without duplicates, e.g. "
                         "torch.unique of all samples' times)")
    if values is None:
        return
    if not isinstance(values, Tensor) or values.dim() != 3 or values.shape[1] != times.shape[0]:
        shape = tuple(values.shape) if isinstance(values, Tensor) else type(values).__name__
        raise ValueError(f"{prefix}values must have shape (B, U, D) with U = len({prefix}times) = {times.shape[0]}, "
                         f"got {shape}")
    if not values.is_floating_point():
        raise TypeError(f"{prefix}values must be a floating-point tensor, got {values.dtype}")
    if not isinstance(mask, Tensor) or mask.shape != values.shape:
        shape = tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__
        raise ValueError(f"{prefix}mask must have the shape of {prefix}values {tuple(values.shape)}, got {shape}; "
                         "use torch.ones_like(values, dtype=torch.bool) for fully observed series")


def gather_observations(times: Tensor, values: Tensor, mask: Tensor, *, t0: float = 0.0) -> Observations:
    """Gather each sample's own observation times from a union-grid batch (see the module docstring).

    Parameters
    ----------
    times : Tensor, shape (U,)
    values : Tensor, shape (B, U, D)
    mask : Tensor, shape (B, U, D), bool or 0/1
    t0 : float
        Padding time of samples without observations.

    Returns
    -------
    Observations
    """
    _check_union_batch(times, values, mask)
    mask = mask.bool()
    has_time = mask.any(-1)  # (B, U)
    lengths = has_time.sum(1)
    width = max(int(lengths.max()), 1) if lengths.numel() else 1   # (an empty batch has no max)
    # A stable sort puts each sample's observed positions first, in time order.
    order = torch.sort((~has_time).to(torch.int8), dim=1, stable=True).indices[:, :width]
    valid = torch.arange(width, device=times.device)[None, :] < lengths[:, None]
    t64 = times.to(torch.float64)
    obs_times = t64[order]
    # Pad with the last own time so that padded gaps are exactly zero.
    last = torch.where(lengths > 0, obs_times.gather(1, (lengths - 1).clamp_min(0)[:, None]).squeeze(1),
                       torch.full_like(lengths, t0, dtype=torch.float64))
    obs_times = torch.where(valid, obs_times, last[:, None])
    gather = order[:, :, None].expand(-1, -1, values.shape[2])
    obs_mask = mask.gather(1, gather) & valid[:, :, None]
    obs_values = torch.where(obs_mask, values.gather(1, gather), torch.zeros((), dtype=values.dtype))
    return Observations(obs_times, obs_values, obs_mask, valid, order, lengths)


# --------------------------------------------------------------------------- likelihood and KL
def check_t0(t0) -> float:
    """A model's reference time ``t0``: a finite number (not a bool)."""
    if isinstance(t0, bool) or not isinstance(t0, (int, float)) or not math.isfinite(t0):
        raise TypeError(f"t0 must be a finite float, got {t0!r}")
    return float(t0)


def check_start(model: nn.Module, times: Tensor, name: str) -> None:
    """``times`` (a union grid, shape (T,)) must be valid and start no earlier than ``model.t0``."""
    _check_union_batch(times, None, None, prefix="target_" if name.startswith("target") else "")
    if float(times[0]) < model.t0:
        raise ValueError(f"{name} start at {float(times[0])}, before the model's t0={model.t0}; build the model "
                         f"with t0 <= the earliest time (e.g. {type(model).__name__}(..., t0={float(times[0])}))")


def resolve_targets(times: Tensor, values: Tensor, mask: Tensor, target_times: Tensor | None,
                    target_values: Tensor | None, target_mask: Tensor | None):
    """The times, values and mask a model's ``forward`` scores, checked: the observed batch itself when no
    ``target_times`` are given; ``target_values`` and ``target_mask`` both or neither (prediction only).

    Shapes as in :meth:`LatentODE.forward`: ``times (U,)``, ``values`` and ``mask (B, U, D)``;
    ``target_times (T,)``, ``target_values`` and ``target_mask (B, T, D)``.
    """
    _check_union_batch(times, values, mask)
    if target_times is None:
        if target_values is not None or target_mask is not None:
            raise ValueError("target_values and target_mask need target_times")
        return times, values, mask
    if (target_values is None) != (target_mask is None):
        raise ValueError("give both target_values and target_mask, or neither (prediction only)")
    if target_values is not None:
        _check_union_batch(target_times, target_values, target_mask, prefix="target_")
        if target_values.shape[0] != values.shape[0]:
            raise ValueError(f"target_values has {target_values.shape[0]} samples, values has {values.shape[0]}")
    return target_times, target_values, target_mask


def gaussian_log_likelihood(x: Tensor, mean: Tensor, std: Tensor, mask: Tensor) -> Tensor:
    """``sum over observed entries of log N(x; mean, std^2)`` per sample.

    Parameters
    ----------
    x, mean : Tensor, shape (B, T, D)
    std : Tensor, broadcastable to (B, T, D) (e.g. shape (D,))
    mask : Tensor, shape (B, T, D), bool or 0/1

    Returns
    -------
    Tensor, shape (B,)
    """
    std = std.to(mean.dtype)
    log_density = -0.5 * ((x - mean) / std).pow(2) - torch.log(std) - 0.5 * _LOG_2PI
    return torch.where(mask.bool(), log_density, torch.zeros((), dtype=mean.dtype)).sum((1, 2))


def normal_kl(mean: Tensor, logvar: Tensor) -> Tensor:
    """``KL(N(mean, diag(exp(logvar))) || N(0, I))`` per sample: shape ``(B, K)`` -> ``(B,)``."""
    return 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).sum(-1)


def _mlp(sizes: list[int], activation: type[nn.Module] = nn.Tanh) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2:
            layers.append(activation())
    return nn.Sequential(*layers)


# --------------------------------------------------------------------------- encoder
class ObservationEncoder(nn.Module):
    """Reads each sample's observations backwards in time and returns a vector at ``t0``.

    Parameters
    ----------
    obs_dim : int
        ``D``.
    hidden_dim : int
        Size of the GRU's hidden state.
    out_dim : int
        Size of the output (``2 K`` for a Gaussian posterior over a ``K``-dim latent).
    kind : {"odernn", "rnn"}, default "odernn"
        ``"rnn"``: a GRU whose input is ``[x * m, m, t_j - t_{j-1}]`` (the gap to the earlier
        observation, ``t0`` before the first; Chen et al. 2018). ``"odernn"``: a GRU on
        ``[x * m, m]`` whose hidden state follows ``dh/dt = h'(h)`` (an MLP) between observations
        and from the first one back to ``t0`` (Rubanova et al. 2019).
    ode_hidden : int, default 2 * hidden_dim
        Hidden width of the ODE-RNN's MLP.
    ode_layers : int, default 1
        Hidden (tanh) layers of the ODE-RNN's MLP. Rubanova et al.'s PhysioNet encoder has four
        of 50 units (their ``--rec-layers 3 --units 50``: ``create_net`` adds one to the count).
    substeps : int, default 2
        Fixed RK4 steps per gap for the ODE-RNN. A gap of any length gets the same number, in the
        rescaled time ``s in [0, 1]``, which keeps samples independent of each other.

    Shape
    -----
    - input: :class:`Observations` with ``B`` samples; output ``(B, out_dim)``.
    """

    def __init__(self, obs_dim: int, hidden_dim: int, out_dim: int, *, kind: str = "odernn",
                 ode_hidden: int | None = None, ode_layers: int = 1, substeps: int = 2) -> None:
        super().__init__()
        self.obs_dim = positive_int("obs_dim", obs_dim)
        self.hidden_dim = positive_int("hidden_dim", hidden_dim)
        self.out_dim = positive_int("out_dim", out_dim)
        self.kind = one_of("kind", kind, ENCODERS)
        self.substeps = positive_int("substeps", substeps)
        self.gru = nn.GRUCell(2 * self.obs_dim + (1 if self.kind == "rnn" else 0), self.hidden_dim)
        if self.kind == "odernn":
            ode_hidden = 2 * self.hidden_dim if ode_hidden is None else positive_int("ode_hidden", ode_hidden)
            layers = positive_int("ode_layers", ode_layers)
            self.ode_func = _mlp([self.hidden_dim, *[ode_hidden] * layers, self.hidden_dim])
        self.out = nn.Linear(self.hidden_dim, self.out_dim)

    def _evolve(self, h: Tensor, gap: Tensor) -> Tensor:
        """Solve ``dh/dt = h'(h)`` over each sample's own ``gap`` (``(B,)``, may be 0 or negative)."""
        scale = gap.to(h.dtype)[:, None]
        func = lambda s, y: scale * self.ode_func(y)  # noqa: E731 - a closure over this step's gaps
        s = torch.tensor([0.0, 1.0], dtype=torch.float64, device=h.device)
        solution = solve(func, h, s, method="rk4", options={"step_size": 1.0 / self.substeps},
                                   gradient="direct")
        return solution.ys[-1]

    def forward(self, obs: Observations, t0: float = 0.0) -> Tensor:
        batch, width, _ = obs.values.shape
        h = obs.values.new_zeros(batch, self.hidden_dim)
        for j in range(width - 1, -1, -1):
            valid = obs.valid[:, j]
            t_prev = obs.times[:, j - 1] if j > 0 else torch.full_like(obs.times[:, 0], t0)
            gap = torch.where(valid, obs.times[:, j] - t_prev, torch.zeros_like(t_prev))  # >= 0
            m = obs.mask[:, j].to(h.dtype)
            inputs = [obs.values[:, j] * m, m]
            if self.kind == "rnn":
                inputs.append(gap.to(h.dtype)[:, None])
            h = torch.where(valid[:, None], self.gru(torch.cat(inputs, -1), h), h)
            if self.kind == "odernn" and bool((gap != 0).any()):
                h = self._evolve(h, -gap)  # backwards in time, from t_j to t_{j-1}
        return self.out(h)


# --------------------------------------------------------------------------- latent ODE
@dataclass
class LatentODEOutput:
    """What :meth:`LatentODE.forward` returns for ``B`` samples and ``T`` target times.

    Attributes
    ----------
    pred : Tensor, shape (B, T, D)
        Decoded means ``g(z(t))`` at the target times.
    z : Tensor, shape (B, T, K)
        The latent trajectory at the target times.
    z0, qz0_mean, qz0_logvar : Tensor, shape (B, K)
        The posterior sample and the posterior's parameters.
    log_likelihood : Tensor, shape (B,) or None
        ``sum of log N(x; pred, sigma^2)`` over each sample's observed target entries.
    kl : Tensor, shape (B,)
        ``KL(q(z0|x) || N(0, I))``.
    elbo : Tensor, shape (B,) or None
        ``log_likelihood - kl`` (one-sample estimate).
    n_observed : Tensor, shape (B,) or None
        Observed target entries per sample.
    stats : dict
        The decoder solve's ``Solution.stats``.
    """

    pred: Tensor
    z: Tensor
    z0: Tensor
    qz0_mean: Tensor
    qz0_logvar: Tensor
    log_likelihood: Tensor | None
    kl: Tensor
    elbo: Tensor | None
    n_observed: Tensor | None
    stats: dict

    def loss(self, kl_weight: float = 1.0) -> Tensor:
        """``-mean_b(log_likelihood - kl_weight * kl)``; ``kl_weight < 1`` for KL annealing."""
        if self.log_likelihood is None:
            raise ValueError("no targets were given, so there is no likelihood; pass target_values and target_mask")
        return -(self.log_likelihood - kl_weight * self.kl).mean()


def _check_eps(eps: Tensor | None, like: Tensor) -> Tensor:
    if eps is None:
        return torch.randn_like(like)
    if not isinstance(eps, Tensor) or eps.shape != like.shape:
        shape = tuple(eps.shape) if isinstance(eps, Tensor) else type(eps).__name__
        raise ValueError(f"eps must be a Tensor of shape {tuple(like.shape)} (batch, latent_dim), got {shape}")
    return eps.to(like)


class _ObservationNoise(nn.Module):
    """The observation standard deviation ``sigma`` (per output dimension), fixed or learned."""

    def __init__(self, obs_dim: int, obs_std: float, learn: bool) -> None:
        super().__init__()
        log_std = torch.full((obs_dim,), math.log(positive_float("obs_std", obs_std)))
        if learn:
            self.log_std = nn.Parameter(log_std)
        else:
            self.register_buffer("log_std", log_std)

    def forward(self) -> Tensor:
        return self.log_std.exp()


class LatentODE(nn.Module):
    """Latent ODE variational autoencoder for irregularly sampled series (Chen et al. 2018; Rubanova et al. 2019).

    Parameters
    ----------
    obs_dim : int
        ``D``, features per observation.
    latent_dim : int, default 4
        ``K``, the size of ``z`` (4 in the spiral experiment of Chen et al.).
    encoder : {"odernn", "rnn"}, default "odernn"
        See :class:`ObservationEncoder`.
    encoder_hidden : int, default 25
        GRU hidden size of the encoder (25 in Chen et al.'s spiral experiment).
    dynamics_hidden : int, default 20
        Hidden width of the latent dynamics MLP ``f``.
    dynamics_layers : int, default 2
        Hidden (tanh) layers of ``f``; Rubanova et al.'s PhysioNet model has four (``--gen-layers 3``).
    decoder_hidden : int or None, default None
        ``None``: a linear output map ``g``; an int: an MLP with one tanh hidden layer.
    obs_std : float, default 0.1
        The observation noise ``sigma`` (its initial value when learned).
    learn_obs_std : bool, default False
        Learn one ``log sigma`` per feature.
    t0 : float, default 0.0
        Reference time of ``z0``; every time must be ``>= t0``. A model attribute and not the
        batch's first time, so that a sample's ``z0`` means the same in every batch.
    method : str, default "rk4"
        Decoder method of :func:`neuralode.solve`.
    step_size : float or None, default 0.1
        Fixed step size of the decoder (in the data's time unit); ``None`` for an adaptive
        ``method`` (e.g. ``"dopri5"``), whose batch then shares steps (see the module docstring).
    rtol, atol : float
        Tolerances of an adaptive decoder.
    gradient : {"direct", "adjoint", "checkpoint"} or a strategy, default "direct"
        How the decoder solve is differentiated. Short fixed-step solves are cheapest to
        backpropagate directly (and that gradient is exact for the discretisation); choose
        ``"adjoint"`` for long series and constant memory, as Chen et al. did.
    encoder_substeps : int, default 2
        RK4 steps per gap in the ODE-RNN encoder.
    encoder_ode_hidden, encoder_ode_layers : int, optional
        Width (default ``2 * encoder_hidden``) and hidden layers (default 1) of the ODE-RNN
        encoder's MLP (see :class:`ObservationEncoder`); unused by the ``"rnn"`` encoder.

    Examples
    --------
    >>> model = LatentODE(obs_dim=2)
    >>> times = torch.tensor([0.1, 0.4, 0.5])
    >>> values = torch.randn(3, 3, 2); mask = torch.rand(3, 3, 2) < 0.7
    >>> out = model(times, values, mask)
    >>> out.loss().backward()
    """

    def __init__(self, obs_dim: int, latent_dim: int = 4, *, encoder: str = "odernn", encoder_hidden: int = 25,
                 dynamics_hidden: int = 20, decoder_hidden: int | None = None, obs_std: float = 0.1,
                 learn_obs_std: bool = False, t0: float = 0.0, method: str = "rk4", step_size: float | None = 0.1,
                 rtol: float = 1e-5, atol: float = 1e-6, gradient: str | Any = "direct",
                 encoder_substeps: int = 2, dynamics_layers: int = 2, encoder_ode_hidden: int | None = None,
                 encoder_ode_layers: int = 1) -> None:
        super().__init__()
        self.obs_dim = positive_int("obs_dim", obs_dim)
        self.latent_dim = positive_int("latent_dim", latent_dim)
        self.encoder = ObservationEncoder(self.obs_dim, positive_int("encoder_hidden", encoder_hidden),
                                          2 * self.latent_dim, kind=encoder, substeps=encoder_substeps,
                                          ode_hidden=encoder_ode_hidden, ode_layers=encoder_ode_layers)
        hidden = positive_int("dynamics_hidden", dynamics_hidden)
        layers = positive_int("dynamics_layers", dynamics_layers)
        self.dynamics = Autonomous(_mlp([self.latent_dim, *[hidden] * layers, self.latent_dim]))
        if decoder_hidden is None:
            self.decoder = nn.Linear(self.latent_dim, self.obs_dim)
        else:
            self.decoder = _mlp([self.latent_dim, positive_int("decoder_hidden", decoder_hidden), self.obs_dim])
        self.noise = _ObservationNoise(self.obs_dim, obs_std, bool(learn_obs_std))
        self.t0 = check_t0(t0)
        if not isinstance(method, str):
            raise TypeError(f"method must be a str such as 'rk4' or 'dopri5', got {type(method).__name__}")
        self.method = method
        self.step_size = None if step_size is None else positive_float("step_size", step_size)
        # Checked here, not at the first forward pass: the decoder's options come from step_size, and a mismatch
        # read there as an option the user never gave ("option 'interp' means nothing for method 'dopri5'").
        adaptive = check_method(method).adaptive
        if adaptive and self.step_size is not None:
            raise ValueError(f"method {method!r} chooses its own steps, but step_size={step_size} (the default 0.1 is "
                             f"for fixed-step methods such as 'rk4'): pass step_size=None with method={method!r}")
        if not adaptive and self.step_size is None:
            raise ValueError(f"method {method!r} takes fixed steps: give step_size (e.g. 0.1), or choose an adaptive "
                             f"method such as 'dopri5' for step_size=None")
        self.rtol = positive_float("rtol", rtol)
        self.atol = positive_float("atol", atol)
        if isinstance(gradient, str):
            one_of("gradient", gradient, ("direct", "adjoint", "checkpoint"))
        self.gradient = gradient

    @property
    def obs_std(self) -> Tensor:
        """The observation standard deviation, shape ``(D,)``."""
        return self.noise()

    def encode(self, times: Tensor, values: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """Posterior parameters ``(mean, logvar)``, each ``(B, K)``, from a union-grid batch."""
        check_start(self, times, "times")
        obs = gather_observations(times, values, mask, t0=self.t0)
        out = self.encoder(obs, self.t0)
        return out[:, :self.latent_dim], out[:, self.latent_dim:]

    def decode(self, z0: Tensor, times: Tensor) -> tuple[Tensor, Tensor, dict]:
        """Solve the latent ODE from ``z0`` at ``t0`` and decode at ``times``.

        Parameters
        ----------
        z0 : Tensor, shape (B, K)
        times : Tensor, shape (T,), strictly increasing, ``>= t0``

        Returns
        -------
        pred : Tensor, shape (B, T, D)
        z : Tensor, shape (B, T, K)
        stats : dict
            The solve's statistics.
        """
        if not isinstance(z0, Tensor) or z0.dim() != 2 or z0.shape[1] != self.latent_dim:
            shape = tuple(z0.shape) if isinstance(z0, Tensor) else type(z0).__name__
            raise ValueError(f"z0 must have shape (B, {self.latent_dim}), got {shape}")
        check_start(self, times, "times")
        grid = [float(v) for v in times.detach().to(torch.float64).cpu().tolist()]
        first = 1 if grid[0] > self.t0 else 0  # t0 itself is the first output when it is a target
        solve_times = ([self.t0] if first else []) + grid
        options = None
        if self.step_size is not None:
            options = {"step_size": self.step_size, "interp": "cubic"}
            # End on the grid t0 + k h, so the last step is the same whatever the batch's last time.
            n_steps = math.ceil((grid[-1] - self.t0) / self.step_size - 1e-9)
            end = self.t0 + n_steps * self.step_size
            if end > grid[-1]:
                solve_times.append(end)
        if len(solve_times) == 1:  # a single target at t0: nothing to solve
            z = z0[None]
            stats: dict = {"nfe": 0, "n_steps": 0}
        else:
            t = torch.tensor(solve_times, dtype=torch.float64, device=z0.device)
            solution = solve(self.dynamics, z0, t, method=self.method, rtol=self.rtol, atol=self.atol,
                                       options=options, gradient=self.gradient,
                                       adjoint_params=tuple(self.dynamics.parameters()))
            z, stats = solution.ys[first:first + len(grid)], solution.stats
        z = z.transpose(0, 1)  # (B, T, K)
        return self.decoder(z), z, stats

    def forward(self, times: Tensor, values: Tensor, mask: Tensor, *, target_times: Tensor | None = None,
                target_values: Tensor | None = None, target_mask: Tensor | None = None,
                eps: Tensor | None = None) -> LatentODEOutput:
        """Encode the observations, sample ``z0``, decode at the target times and score them.

        Parameters
        ----------
        times, values, mask : Tensor
            The observed batch on its union grid: ``(U,)``, ``(B, U, D)``, ``(B, U, D)``.
        target_times : Tensor, shape (T,), optional
            Where to decode (default: ``times``, i.e. reconstruction). Give ``target_values`` and
            ``target_mask`` of shape ``(B, T, D)`` to score them (interpolation / extrapolation).
        target_values, target_mask : Tensor, optional
            Default to ``values``, ``mask`` when ``target_times`` is not given.
        eps : Tensor, shape (B, K), optional
            Standard normal noise of the reparameterised sample (default: fresh draws).

        Returns
        -------
        LatentODEOutput
        """
        target_times, target_values, target_mask = resolve_targets(times, values, mask, target_times, target_values,
                                                                   target_mask)
        mean, logvar = self.encode(times, values, mask)
        z0 = mean + torch.exp(0.5 * logvar) * _check_eps(eps, mean)
        pred, z, stats = self.decode(z0, target_times)
        kl = normal_kl(mean, logvar)
        log_lik = elbo = n_obs = None
        if target_values is not None:
            log_lik = gaussian_log_likelihood(target_values, pred, self.obs_std, target_mask)
            elbo = log_lik - kl
            n_obs = target_mask.bool().sum((1, 2))
        return LatentODEOutput(pred, z, z0, mean, logvar, log_lik, kl, elbo, n_obs, stats)

    def sample_prior(self, times: Tensor, n: int) -> Tensor:
        """Decoded means of ``n`` trajectories from the prior ``z0 ~ N(0, I)``: shape ``(n, T, D)``."""
        param = self.decoder.weight if isinstance(self.decoder, nn.Linear) else self.decoder[0].weight
        z0 = torch.randn(positive_int("n", n), self.latent_dim, dtype=param.dtype, device=param.device)
        return self.decode(z0, times)[0]


# --------------------------------------------------------------------------- RNN baseline
@dataclass
class RNNBaselineOutput:
    """What :meth:`RNNBaseline.forward` returns.

    Attributes
    ----------
    pred : Tensor, shape (B, T, D)
        Predictions at the target times (0 at times that are not the sample's own targets).
    log_likelihood : Tensor, shape (B,) or None
    n_observed : Tensor, shape (B,) or None
    """

    pred: Tensor
    log_likelihood: Tensor | None
    n_observed: Tensor | None

    def loss(self) -> Tensor:
        """``-mean_b log_likelihood``."""
        if self.log_likelihood is None:
            raise ValueError("no targets were given, so there is no likelihood; pass target_values and target_mask")
        return -self.log_likelihood.mean()


class RNNBaseline(nn.Module):
    """Deterministic GRU encoder-decoder for irregular series: the baseline of Chen et al. (2018), Section 5.

    The encoder is the ``"rnn"`` :class:`ObservationEncoder` (a GRU over the observations, backwards,
    with the time gaps as input) and gives the decoder's initial hidden state at ``t0``. The decoder
    rolls a GRU cell autoregressively over target times: at step ``k`` its input is
    ``[x_hat_{k-1}, t_k - t_{k-1}]`` (``x_hat_{-1} = 0``, ``t_{-1} = t0``) and it predicts
    ``x_hat_k = W h_k + c``. Scored with the same Gaussian likelihood as :class:`LatentODE`, at the
    observed target entries only.

    Which target times it rolls over is the ``roll`` argument of :meth:`forward`: ``"own"`` (each
    sample's own observed target times, the default) or ``"all"`` (every time of the target grid,
    observed or not; the likelihood still counts only the observed entries). A model that is to
    predict between its observations should be trained with ``"all"``: trained with ``"own"`` on
    sparse series it only ever sees long gaps, and rolled at test time over a dense grid it is
    asked for steps it never took (it drifts).

    Parameters
    ----------
    obs_dim : int
    hidden_dim : int, default 25
        Hidden size of both GRUs. With the defaults of both models the parameter counts are of the
        same order (compare with :func:`neuralode.models.count_parameters`).
    obs_std : float, default 0.1
    learn_obs_std : bool, default False
    t0 : float, default 0.0
    """

    def __init__(self, obs_dim: int, hidden_dim: int = 25, *, obs_std: float = 0.1, learn_obs_std: bool = False,
                 t0: float = 0.0) -> None:
        super().__init__()
        self.obs_dim = positive_int("obs_dim", obs_dim)
        self.hidden_dim = positive_int("hidden_dim", hidden_dim)
        self.encoder = ObservationEncoder(self.obs_dim, self.hidden_dim, self.hidden_dim, kind="rnn")
        self.cell = nn.GRUCell(self.obs_dim + 1, self.hidden_dim)
        self.readout = nn.Linear(self.hidden_dim, self.obs_dim)
        self.noise = _ObservationNoise(self.obs_dim, obs_std, bool(learn_obs_std))
        self.t0 = check_t0(t0)

    def forward(self, times: Tensor, values: Tensor, mask: Tensor, *, target_times: Tensor | None = None,
                target_values: Tensor | None = None, target_mask: Tensor | None = None,
                roll: str = "own") -> RNNBaselineOutput:
        """Arguments as for :meth:`LatentODE.forward` (without ``eps``: the model is deterministic).

        ``roll`` names the times the decoder steps through: ``"own"``, each sample's observed
        target times (``target_mask``; every target time when no targets are given), or ``"all"``,
        every time of ``target_times`` for every sample. ``pred`` is 0 at times not rolled over.
        With a fully observed ``target_mask`` the two are the same.
        """
        one_of("roll", roll, ("own", "all"))
        target_times, target_values, target_mask = resolve_targets(times, values, mask, target_times, target_values,
                                                                   target_mask)
        check_start(self, times, "times")
        check_start(self, target_times, "target_times")
        batch = values.shape[0]
        h = self.encoder(gather_observations(times, values, mask, t0=self.t0), self.t0)
        if target_mask is None:  # prediction at every target time
            roll_mask = torch.ones(batch, target_times.shape[0], self.obs_dim, dtype=torch.bool, device=h.device)
            roll_values = h.new_zeros(batch, target_times.shape[0], self.obs_dim)
        else:
            roll_mask, roll_values = target_mask, target_values
            if roll == "all":
                roll_mask = torch.ones_like(target_mask, dtype=torch.bool)
        # With roll="own", each sample's own target times only, so that other samples' times add no steps.
        own = gather_observations(target_times, roll_values, roll_mask, t0=self.t0)
        prev = h.new_zeros(batch, self.obs_dim)
        t_prev = torch.full_like(own.times[:, 0], self.t0)
        preds = []
        for k in range(own.times.shape[1]):
            valid = own.valid[:, k]
            gap = (own.times[:, k] - t_prev).to(h.dtype)[:, None]
            h = torch.where(valid[:, None], self.cell(torch.cat([prev, gap], -1), h), h)
            x_hat = self.readout(h)
            preds.append(x_hat)
            prev = torch.where(valid[:, None], x_hat, prev)
            t_prev = torch.where(valid, own.times[:, k], t_prev)
        stacked = torch.stack(preds, 1) * own.valid[:, :, None].to(h.dtype)  # (B, L, D)
        pred = h.new_zeros(batch, target_times.shape[0], self.obs_dim)
        pred = pred.scatter_add(1, own.index[:, :, None].expand(-1, -1, self.obs_dim), stacked)
        log_lik = n_obs = None
        if target_values is not None:
            log_lik = gaussian_log_likelihood(target_values, pred, self.noise(), target_mask)
            n_obs = target_mask.bool().sum((1, 2))
        return RNNBaselineOutput(pred, log_lik, n_obs)


def size_matched_rnn_width(obs_dim: int, parameters: int) -> int:
    """The :class:`RNNBaseline` hidden size whose parameter count is closest to ``parameters``.

    Chen et al. (2018) compare the latent ODE with "an RNN baseline of the same size"; this picks the
    GRU width that makes it so (ties go to the smaller width). The counts are taken from modules built
    on the ``meta`` device, so no memory is allocated.

    Examples
    --------
    >>> size_matched_rnn_width(2, 3354)  # the spiral latent ODE's size
    19
    """
    obs_dim = positive_int("obs_dim", obs_dim)
    parameters = positive_int("parameters", parameters)
    best, best_gap, width = 1, None, 1
    while True:
        with torch.device("meta"):
            count = sum(p.numel() for p in RNNBaseline(obs_dim, width).parameters())
        gap = abs(count - parameters)
        if best_gap is None or gap < best_gap:
            best, best_gap = width, gap
        if count >= parameters:  # counts grow with the width, so nothing further can be closer
            return best
        width += 1
