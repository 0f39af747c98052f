"""RNN-VAE: Rubanova et al.'s (2019) stochastic RNN baseline for irregularly sampled series.

A sequence-to-sequence variational autoencoder without an ODE (Rubanova, Chen and Duvenaud 2019,
Section 4, the "RNN-VAE" rows of their tables; their code: ``YuliaRubanova/latent_ode``,
``lib/rnn_baselines.py``, class ``RNN_VAE``, built in ``run_models.py`` with ``--rnn-vae``):

.. math::

    q(z_0 | x) = \\mathcal N(\\mu, \\operatorname{diag}(\\sigma^2)), \\qquad
    h_{-1} = z_0, \\quad h_k = \\operatorname{GRU}([\\hat x_{k-1}, 1, t_k - t_{k-1}], h_{k-1}), \\quad
    \\hat x_k = g(h_k),

* **encoder**: a GRU over ``[x * m, m, gap]`` read backwards in time (the ``"rnn"``
  :class:`~neuralode.models.latent_ode.ObservationEncoder`, ``encoder_hidden`` units: their
  ``--rec-dims``), then an MLP ``Linear(encoder_hidden, units) - tanh - Linear(units, 2 K)`` (their
  ``z0_net``; our encoder's output layer is its first ``Linear``) giving ``mu`` and ``log sigma^2``;
* ``z0 = mu + sigma * eps`` (one reparameterised sample);
* **decoder**: a GRU cell whose hidden state *is* the latent state (``K`` units, initial state
  ``z0`` at ``t0``) and whose input at each step is its own previous prediction, an all-ones mask and
  the time gap; ``g`` is ``Linear(K, units) - tanh - Linear(units, D)`` (their ``decoder``);
* trained on the ELBO with a Gaussian likelihood of fixed ``sigma_obs`` and the KL to ``N(0, I)``,
  as :class:`~neuralode.models.LatentODE` (see :class:`RNNVAEOutput`).

Differences from their code, each for a reason:

* ``log sigma^2`` instead of their ``sigma = |raw|``: the same family, but the KL (which has
  ``log sigma``) stays finite when an output crosses 0, and it is :class:`LatentODE`'s convention.
* The encoder's gap input is each sample's own gap (to its previous observation, ``t0`` before the
  first); theirs is the gap between neighbouring times of the batch's union grid, so a sample's
  input depended on its batch-mates.
* Their decoder feeds the encoder's first data point (of the reversed series, i.e. the *last*
  time's values) as the first input and shifts the outputs by one step (the prediction at the first
  time is that data point, the one at ``t_k`` is read from the state before the gap
  ``t_{k-1} - t_{k-2}`` was fed); here the first input is ``g(z0)`` and the prediction at ``t_k``
  is read from the state that has seen the gap to ``t_k``.
* Their ``get_reconstruction`` calls ``utils.reverse`` on the ``(B, T, D)`` data to read it
  backwards in time, but that function flips dimension 0, which there is the batch (their RNN
  encoder for the latent ODE, ``lib/encoder_decoder.py``, permutes time to dimension 0 first):
  their RNN-VAE decodes sample ``b`` from the encoding of sample ``B - 1 - b`` and is scored
  against sample ``b``, in training and in test. ``reverse_batch=True`` reproduces that (the
  posterior of sample ``B - 1 - b`` decodes row ``b``), for diagnosing their figure only.
* ``decoder_grid="union"`` rolls the decoder over every time of the batch's union grid for every
  sample, as their code does (a 50-record PhysioNet batch at 0.1 h has up to 481 times against
  about 71 per record); ``"own"`` rolls over each sample's own target times only, as
  :class:`~neuralode.models.RNNBaseline` does, so nothing a sample gets depends on its batch.

Batches are union-grid batches as for :class:`~neuralode.models.LatentODE` (see
:mod:`neuralode.models.latent_ode`): ``times (U,)``, ``values (B, U, D)``, ``mask (B, U, D)``.

References
----------
.. [1] Y. Rubanova, R. T. Q. Chen, D. Duvenaud, "Latent ODEs for Irregularly-Sampled Time Series",
   NeurIPS 2019. https://arxiv.org/abs/1907.03907
.. [2] D. P. Kingma, M. Welling, "Auto-Encoding Variational Bayes", ICLR 2014.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from neuralode.models.latent_ode import (
    ObservationEncoder,
    _check_eps,
    _mlp,
    _ObservationNoise,
    check_start,
    check_t0,
    gather_observations,
    gaussian_log_likelihood,
    normal_kl,
    resolve_targets,
)
from neuralode.nn._checks import one_of, positive_int

__all__ = ["DECODER_GRIDS", "RNNVAE", "RNNVAEOutput"]

#: Where :class:`RNNVAE`'s decoder steps: every union-grid time (their code) or each sample's own.
DECODER_GRIDS = ("union", "own")


@dataclass
class RNNVAEOutput:
    """What :meth:`RNNVAE.forward` returns for ``B`` samples and ``T`` target times.

    Attributes
    ----------
    pred : Tensor, shape (B, T, D)
        Decoded means at the target times (0 at times a sample's decoder did not visit: with
        ``decoder_grid="own"``, the times that are not its own targets).
    z0, qz0_mean, qz0_logvar : Tensor, shape (B, K)
        The posterior sample and the posterior's parameters.
    log_likelihood : Tensor, shape (B,) or None
        ``sum of log N(x; pred, sigma_obs^2)`` over each sample's observed target entries.
    kl : Tensor, shape (B,)
        ``KL(q(z0|x) || N(0, I))`` in closed form.
    elbo : Tensor, shape (B,) or None
        ``log_likelihood - kl`` (one-sample estimate).
    n_observed : Tensor, shape (B,) or None
        Observed target entries per sample.
    """

    pred: Tensor
    z0: Tensor
    qz0_mean: Tensor
    qz0_logvar: Tensor
    log_likelihood: Tensor | None
    kl: Tensor
    elbo: Tensor | None
    n_observed: Tensor | None

    def loss(self, kl_weight: float = 1.0) -> Tensor:
        """``-mean_b(log_likelihood - kl_weight * kl)``; ``kl_weight < 1`` for KL annealing."""
        if self.log_likelihood is None:
            raise ValueError("no targets were given, so there is no likelihood; pass target_values and target_mask")
        return -(self.log_likelihood - kl_weight * self.kl).mean()


class RNNVAE(nn.Module):
    """Rubanova et al.'s RNN-VAE baseline (see the module docstring for the model and its differences).

    Parameters
    ----------
    obs_dim : int
        ``D``, features per observation.
    latent_dim : int, default 20
        ``K``: the size of ``z0`` and of the decoder GRU's state (their ``--latents``; 20 for PhysioNet).
    encoder_hidden : int, default 40
        Encoder GRU units (their ``--rec-dims``; 40 for PhysioNet).
    units : int, default 50
        Hidden width of the posterior head and of the output MLP (their ``--units``; 50 for PhysioNet).
    obs_std : float, default 0.01
        The observation noise ``sigma_obs`` (their 0.01; its initial value when learned).
    learn_obs_std : bool, default False
    decoder_grid : {"union", "own"}, default "own"
        See the module docstring; ``"union"`` is their code's.
    t0 : float, default 0.0
        Reference time of ``z0``; every time must be ``>= t0``.
    reverse_batch : bool, default False
        Decode sample ``b`` from the posterior of sample ``B - 1 - b``, as their released code does
        (see the module docstring). A diagnostic, never a model to use.

    Shape
    -----
    - ``forward(times (U,), values (B, U, D), mask (B, U, D))`` -> :class:`RNNVAEOutput`.

    Examples
    --------
    >>> model = RNNVAE(obs_dim=2, latent_dim=3, encoder_hidden=4, units=5)
    >>> times = torch.tensor([0.1, 0.4, 0.5])
    >>> values = torch.randn(3, 3, 2); mask = torch.rand(3, 3, 2) < 0.7
    >>> model(times, values, mask).loss().backward()
    """

    def __init__(self, obs_dim: int, latent_dim: int = 20, encoder_hidden: int = 40, units: int = 50, *,
                 obs_std: float = 0.01, learn_obs_std: bool = False, decoder_grid: str = "own",
                 t0: float = 0.0, reverse_batch: bool = False) -> None:
        super().__init__()
        self.obs_dim = positive_int("obs_dim", obs_dim)
        self.latent_dim = positive_int("latent_dim", latent_dim)
        self.encoder_hidden = positive_int("encoder_hidden", encoder_hidden)
        self.units = positive_int("units", units)
        self.decoder_grid = one_of("decoder_grid", decoder_grid, DECODER_GRIDS)
        # Their z0_net is Linear(rec_dims, units) - tanh - Linear(units, 2K): the encoder's output
        # layer is its first Linear, the head the rest.
        self.encoder = ObservationEncoder(self.obs_dim, self.encoder_hidden, self.units, kind="rnn")
        self.posterior = nn.Sequential(nn.Tanh(), nn.Linear(self.units, 2 * self.latent_dim))
        # Input [x_hat, ones, gap]: their decoder input concatenates an all-ones mask, a constant
        # that only acts as a bias; kept so that the parameter count is theirs.
        self.cell = nn.GRUCell(2 * self.obs_dim + 1, self.latent_dim)
        self.output = _mlp([self.latent_dim, self.units, self.obs_dim])
        self.noise = _ObservationNoise(self.obs_dim, obs_std, bool(learn_obs_std))
        self.t0 = check_t0(t0)
        if not isinstance(reverse_batch, bool):
            raise TypeError(f"reverse_batch must be a bool, got {reverse_batch!r}")
        self.reverse_batch = reverse_batch

    def encode(self, times: Tensor, values: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """Posterior parameters ``(mean, logvar)``, each ``(B, K)``, from a union-grid batch."""
        check_start(self, times, "times")
        out = self.posterior(self.encoder(gather_observations(times, values, mask, t0=self.t0), self.t0))
        return out[:, :self.latent_dim], out[:, self.latent_dim:]

    def decode(self, z0: Tensor, times: Tensor, mask: Tensor | None = None) -> Tensor:
        """Roll the decoder from ``z0`` at ``t0`` over ``times``.

        Parameters
        ----------
        z0 : Tensor, shape (B, K)
        times : Tensor, shape (T,), strictly increasing, ``>= t0``
        mask : Tensor, shape (B, T, D), optional
            With ``decoder_grid="own"``, a sample steps only through the times where its ``mask``
            has an entry (all times without ``mask``). Ignored by ``"union"``.

        Returns
        -------
        Tensor, shape (B, T, D)
            Predictions; 0 at the times a sample did not step through.
        """
        if not isinstance(z0, Tensor) or z0.dim() != 2 or z0.shape[1] != self.latent_dim:
            shape = tuple(z0.shape) if isinstance(z0, Tensor) else type(z0).__name__
            raise ValueError(f"z0 must have shape (B, {self.latent_dim}), got {shape}")
        check_start(self, times, "times")
        batch, n_times = z0.shape[0], times.shape[0]
        if self.decoder_grid == "own" and mask is not None:
            own = gather_observations(times, z0.new_zeros(batch, n_times, self.obs_dim), mask, t0=self.t0)
            step_times, valid, index = own.times, own.valid, own.index
        else:  # every time for every sample
            step_times = times.to(torch.float64)[None].expand(batch, n_times)
            valid = torch.ones(batch, n_times, dtype=torch.bool, device=z0.device)
            index = torch.arange(n_times, device=z0.device)[None].expand(batch, n_times)
        h = z0
        x_hat = self.output(h)  # the prediction at t0 is the first input
        ones = h.new_ones(batch, self.obs_dim)
        t_prev = torch.full((batch,), self.t0, dtype=torch.float64, device=z0.device)
        preds = []
        for k in range(step_times.shape[1]):
            ok = valid[:, k]
            gap = (step_times[:, k] - t_prev).to(h.dtype)[:, None]
            h = torch.where(ok[:, None], self.cell(torch.cat([x_hat, ones, gap], -1), h), h)
            out = self.output(h)
            preds.append(out)
            x_hat = torch.where(ok[:, None], out, x_hat)
            t_prev = torch.where(ok, step_times[:, k], t_prev)
        stacked = torch.stack(preds, 1) * valid[:, :, None].to(h.dtype)  # (B, L, D)
        pred = h.new_zeros(batch, n_times, self.obs_dim)
        return pred.scatter_add(1, index[:, :, None].expand(-1, -1, self.obs_dim), stacked)

    def forward(self, times: Tensor, values: Tensor, mask: Tensor, *, target_times: Tensor | None = None,
                target_values: Tensor | None = None, target_mask: Tensor | None = None,
                eps: Tensor | None = None) -> RNNVAEOutput:
        """Encode, sample ``z0``, decode at the target times and score them.

        Arguments as for :meth:`neuralode.models.LatentODE.forward`: the observed batch
        ``times (U,)``, ``values (B, U, D)``, ``mask (B, U, D)``; ``target_times (T,)`` (default
        ``times``) with ``target_values`` and ``target_mask (B, T, D)`` to score; ``eps (B, K)``, the
        standard normal noise of the sample (zeros: the posterior mean; default: fresh draws).
        """
        target_times, target_values, target_mask = resolve_targets(times, values, mask, target_times, target_values,
                                                                   target_mask)
        mean, logvar = self.encode(times, values, mask)
        if self.reverse_batch:  # their utils.reverse on the batch axis (see the module docstring)
            mean, logvar = mean.flip(0), logvar.flip(0)
        z0 = mean + torch.exp(0.5 * logvar) * _check_eps(eps, mean)
        pred = self.decode(z0, target_times, None if target_mask is None else target_mask.bool())
        kl = normal_kl(mean, logvar)
        log_lik = elbo = n_obs = None
        if target_values is not None:
            log_lik = gaussian_log_likelihood(target_values, pred, self.noise(), target_mask)
            elbo = log_lik - kl
            n_obs = target_mask.bool().sum((1, 2))
        return RNNVAEOutput(pred, z0, mean, logvar, log_lik, kl, elbo, n_obs)
