"""``physionet``: a latent ODE vs an RNN reconstructing and interpolating ICU series (Rubanova et al. 2019).

Data: the PhysioNet/CinC Challenge 2012 records (``neuralode.data.load_physionet``; set A by
default; ``data_path`` may list several archives, e.g. sets A and B as in Rubanova et al., read in
order, and ``max_records`` caps the total), each an irregular multivariate series of 37 variables
with a mask of what was measured, times in hours since admission (0-48 h). With ``quantization``
(hours, 0 = off) times are rounded to multiples of it and a variable's values in one rounded time
averaged, as Rubanova et al.'s loader does (0.1 h or 0.016 h there). Patients without any
time-series observation are dropped. Records are split into train and test (a seeded permutation);
every variable is min-max normalised, ``(x - min) / (max - min)``, with statistics of the training
records only (``PhysioNetNormalizer``), so training values lie in ``[0, 1]``. For the ODE solver,
times are divided by ``time_scale`` (48 h), so a series spans ``[0, 1]``.

Task: a fraction ``holdout`` of each record's *observed entries* is hidden from the encoder. Training
draws a fresh hold-out set every step (a pure function of ``(seed, step)``) and scores the
reconstruction of all observed entries. Evaluation uses a fixed hold-out set per test batch and
reports, for every model, two masked MSEs in normalised units:

* ``test_mse_heldout/<model>``: on the held-out entries only (interpolation of unseen values; the
  harder task). With ``holdout=0`` there are none and it is NaN.
* ``test_mse_recon/<model>``: on the entries the encoder was given. This is Rubanova et al.'s
  PhysioNet "interpolation" protocol: their released code scores the model on the very data and
  mask the encoder read (unless ``--sample-tp`` subsamples), so their MSEs (latent ODE 2.1e-3 with
  an ODE-RNN encoder, 3.9e-3 with an RNN encoder, RNN-VAE 5.9e-3) are reconstruction errors. Run
  with ``holdout=0`` for exactly their setting.
* ``test_mse_recon_rubanova_norm/<model>``: the same errors in Rubanova et al.'s normalisation.
  They normalise by ``(x - min) / max``, not ``(x - min) / (max - min)``, so an error ``e`` in our
  units is ``e * (max - min) / max`` in theirs (per variable; ``max`` here is our training maximum).
* ``test_mse_rubanova/<model>``: Rubanova et al.'s MSE exactly as their code averages it, in their
  normalisation: per patient and variable the mean squared error over that variable's scored
  entries (0 for a variable the patient never had), then the mean over the variables, then over
  the patients (``lib/likelihood_eval.py``, ``compute_masked_likelihood``). A patient's rare
  variables weigh as much as its heart rate. The seed references are attached to this metric.

Models, trained on union-grid batches (``collate_physionet``):

* ``latent_ode``: :class:`neuralode.models.LatentODE` (latent ``latent_dim``, GRU or ODE-RNN
  encoder, MLP dynamics, MLP decoder, fixed-step RK4), ELBO with observation ``sigma = obs_std``;
  evaluated at the posterior mean;
* ``rnn``: :class:`neuralode.models.RNNBaseline`, a deterministic GRU encoder-decoder with the same
  Gaussian likelihood; by default (``rnn_hidden=0``) of the same size as the latent ODE (the width
  whose parameter count is closest, :func:`neuralode.models.size_matched_rnn_width`);
* ``rnn_vae`` (only when listed in ``models``): :class:`neuralode.models.RNNVAE`, Rubanova et al.'s
  stochastic RNN baseline at their sizes (latent ``latent_dim``, encoder GRU ``encoder_hidden``, MLPs
  of ``rnn_vae_units``), trained on the same ELBO as the latent ODE; evaluated at the posterior mean.

Another row, ``mean``, predicts each variable's training mean (in normalised units), so the MSEs
have a floor to be read against. ``models`` trains any of them alone (the same member, seed and
batches as in a run with the others). Paper references: ``test_mse_rubanova/latent_ode_odernn``
(2.118e-3), ``.../latent_ode_rnn`` (3.9e-3), ``.../rnn_vae`` (5.9e-3); the final metrics repeat the
latent ODE's as ``test_mse_rubanova/latent_ode_<encoder>`` so that it meets its own row.

Rubanova et al.'s training (``run_models.py``), each a setting here: Adamax (``optimizer``) at
``lr=1e-2`` times 0.999 per step down to 1e-3 (``lr_schedule=exponential``), the KL term weighted
0 for 10 epochs and ``1 - 0.99^(epoch - 10)`` after (``kl_schedule=rubanova``), and a likelihood
that averages per patient and variable, with the KL averaged over latent dimensions
(``likelihood=variable``); observation noise 0.01 (``obs_std``), dynamics and encoder ODE MLPs of
four tanh layers of 50 units (``dynamics_layers``, ``encoder_ode_layers``, ``encoder_ode_hidden``),
a linear decoder (``decoder_hidden=0``).
"""

from __future__ import annotations

import dataclasses
import math
import time
import zlib
from pathlib import Path
from typing import Annotated, ClassVar

import numpy as np
import torch
from torch import nn

from neuralode.data import (
    PHYSIONET_VARIABLES,
    find_data_dir,
    PhysioNetNormalizer,
    collate_physionet,
    load_physionet,
)
from neuralode.data._io import expand_user
from neuralode.models import (
    DECODER_GRIDS,
    RNNVAE,
    LatentODE,
    RNNBaseline,
    count_parameters,
    size_matched_rnn_width,
)

from .base import Experiment, Position, Reference, epoch_permutation
from .config import ConfigError, Fraction, NonNegFloat, NonNegInt, PosFloat, PosInt, Range, RunConfig, added_later
from .runner import RunContext, figure

__all__ = ["PhysioNet", "PhysioNetConfig", "holdout_mask", "rubanova_mse"]

_MODELS = ("latent_ode", "rnn", "rnn_vae")
_DEFAULT_MODELS = ("latent_ode", "rnn")  # the RNN-VAE on request: the CPU default stays two models
_VAES = ("latent_ode", "rnn_vae")  # members with a posterior over z0: a KL term, the mean at test time
# Metric families of `_test_mse`: (prefix, which entries, units).
_HELDOUT, _RECON, _RECON_RUB = "test_mse_heldout", "test_mse_recon", "test_mse_recon_rubanova_norm"
_RUB = "test_mse_rubanova"  # their units and their averaging (per patient and variable first)
_LOG_2PI = math.log(2.0 * math.pi)
_COLORS = {"latent_ode": "tab:blue", "rnn": "tab:red", "rnn_vae": "tab:orange", "mean": "0.6"}
_LABELS = {"latent_ode": "latent ODE", "rnn": "RNN", "rnn_vae": "RNN-VAE", "mean": "train mean"}
# Rubanova et al. 2019, Table 4 (PhysioNet interpolation, MSE x 1e-3): 2.118 is the latent ODE with
# the ODE-RNN encoder; 3.9 (RNN encoder) and 5.9 (RNN-VAE) are given to two figures here.
_PAPER = {"odernn": 2.118e-3, "rnn": 3.9e-3, "rnn_vae": 5.9e-3}


def holdout_mask(mask: torch.Tensor, fraction: float, rng: np.random.Generator) -> torch.Tensor:
    """A random subset (each entry with probability ``fraction``) of the True entries of ``mask``."""
    draw = torch.from_numpy(rng.random(tuple(mask.shape)) < fraction)
    return mask & draw.to(mask.device)


@dataclasses.dataclass
class PhysioNetConfig(RunConfig):
    """Configuration of ``physionet``.

    Attributes
    ----------
    data_dir : the folder of the PhysioNet 2012 files; empty: found by the data rule of
        :mod:`neuralode.data.locate` (``$NEURALODE_DATA/physionet2012``, the user cache, the
        checkout's ``../shared/data/physionet2012``).
    data_path : one or more set archives (or extracted directories), comma separated, read in order
        (``set-a.tar.gz,set-b.tar.gz`` for Rubanova et al.'s 8,000 patients). An absolute path, or a
        relative one that exists from the working directory, is used as is; any other name is looked
        up in ``data_dir``. The resolved absolute paths are what ``config.json`` records.
    max_records : patients read in all (0: every patient of every ``data_path``).
    quantization : round times to multiples of this many hours, averaging a variable's values that
        land on one rounded time (0: minute resolution; Rubanova et al. use 0.1 and 0.016).
    test_fraction : share of the patients held out for testing.
    holdout : share of each record's observed entries hidden from the encoder and scored as
        ``test_mse_heldout`` (0: none, Rubanova et al.'s reconstruction protocol).
    time_scale : hours per unit of solver time (48: a stay spans [0, 1]).
    models : which of ``latent_ode``, ``rnn`` and ``rnn_vae`` to train (the first two by default).
    iters, batch_size, lr : optimiser steps, records per step, initial step size.
    optimizer : ``adam`` or ``adamax`` (Rubanova et al.'s).
    lr_schedule, lr_decay, min_lr : the learning rate of step ``s`` (0-based), a pure function of
        the step (resuming needs no scheduler state): ``constant``; ``exponential``,
        ``max(lr * lr_decay^(s + 1), min_lr)`` (Rubanova et al.: 0.999 per step down to lr / 10);
        ``cosine`` from ``lr`` to ``min_lr`` at the last step.
    kl_schedule, kl_weight, kl_wait_epochs, kl_decay : the weight of the KL term in epoch ``e``:
        ``constant`` ``kl_weight``; ``rubanova``, 0 for ``e < kl_wait_epochs`` and
        ``kl_weight * (1 - kl_decay^(e - kl_wait_epochs))`` after (their 10 and 0.99).
    likelihood : ``entry``, the log-likelihood summed over observed entries and, with the KL,
        divided by the batch's mean entries per record (every entry weighs the same); ``variable``,
        Rubanova et al.'s: per record the mean over variables of the mean log-likelihood of that
        variable's entries, plus the KL divided by ``latent_dim``.
    latent_dim, encoder, encoder_hidden, dynamics_hidden, dynamics_layers, encoder_ode_hidden
        (0: ``2 * encoder_hidden``), encoder_ode_layers, encoder_substeps (RK4 steps per gap of the
        ODE-RNN), decoder_hidden (0: linear), step_size, obs_std : the latent ODE.
    rnn_hidden : GRU units of the RNN baseline (0: size-matched to the latent ODE).
    rnn_roll : the times the RNN baseline's decoder steps through: ``own``, each record's own observation
        times (its schedule: how many steps it takes, and when, depends on when the record was measured), or
        ``all``, every time of the batch's union grid, which hides most of that schedule (a record's times are
        among up to 481 others); see :meth:`neuralode.models.RNNBaseline.forward`.
    rnn_vae_units : hidden width of the RNN-VAE's posterior head and output MLP (0: ``dynamics_hidden``,
        as Rubanova et al.'s ``--units`` sets both); its latent size and encoder GRU are
        ``latent_dim`` and ``encoder_hidden`` (their ``--latents`` and ``--rec-dims``).
    rnn_vae_grid : where the RNN-VAE's decoder steps: ``union``, every time of the batch's union
        grid (their code), or ``own``, each record's own times (see :mod:`neuralode.models.rnn_vae`).
    rnn_vae_reverse_batch : decode each record from the posterior of the record at the mirrored
        position of its batch, as Rubanova et al.'s released RNN-VAE does (``utils.reverse`` flips
        the batch axis there); a diagnostic of their figure, off by default.
    rnn_vae_sample, latent_ode_sample : train that model on a posterior sample (true, the ELBO's
        estimate) or on the posterior mean (false: a deterministic autoencoder of the same
        architecture, the KL term still weighted by the schedule); a diagnostic of what sampling costs.
    eval_batch : records per evaluation batch (bounds the union grid).
    """

    data_dir: str = ""
    data_path: tuple[str, ...] = ("set-a.tar.gz",)
    max_records: NonNegInt = 300
    quantization: NonNegFloat = 0.0
    test_fraction: Fraction = 0.2
    holdout: Annotated[float, Range(0, 1, high_open=True)] = 0.2
    time_scale: PosFloat = 48.0
    models: tuple[str, ...] = _DEFAULT_MODELS
    iters: PosInt = 100
    batch_size: PosInt = 32
    lr: float = 1e-2
    optimizer: str = "adam"
    lr_schedule: str = "constant"
    lr_decay: Annotated[float, Range(0, 1, low_open=True)] = 0.999
    min_lr: NonNegFloat = 1e-3
    kl_schedule: str = "constant"
    kl_weight: NonNegFloat = 1.0
    kl_wait_epochs: NonNegInt = 10
    kl_decay: Annotated[float, Range(0, 1, high_open=True)] = 0.99
    likelihood: str = "entry"
    latent_dim: PosInt = 10
    encoder: str = "rnn"
    encoder_hidden: PosInt = 32
    dynamics_hidden: PosInt = 32
    dynamics_layers: PosInt = 2
    encoder_ode_hidden: NonNegInt = 0
    encoder_ode_layers: PosInt = 1
    encoder_substeps: PosInt = 2
    decoder_hidden: NonNegInt = 32
    step_size: PosFloat = 0.05
    obs_std: PosFloat = 0.05
    rnn_hidden: NonNegInt = 0
    rnn_roll: str = added_later("own")   # (runs written before it rolled over their own times)
    rnn_vae_units: NonNegInt = 0
    rnn_vae_grid: str = "union"
    rnn_vae_reverse_batch: bool = False
    rnn_vae_sample: bool = True
    latent_ode_sample: bool = True
    eval_batch: PosInt = 64
    log_every: PosInt = 10
    checkpoint_every: PosInt = 100


def _resolve_path(given: str, data_dir: str) -> str:
    """One entry of ``data_path`` as an absolute path (see :class:`PhysioNetConfig`)."""
    p = expand_user(given, "data_path")
    if p.is_absolute() or p.exists():
        if not p.exists():
            raise ConfigError(f"physionet: data_path entry {given} does not exist; put the PhysioNet "
                              f"2012 set there or pass --set data_path=/path/to/set-a.tar.gz (docs/data.md)")
        return str(p.resolve())
    try:
        return str(find_data_dir("physionet2012", data_dir, required=[(given,)]) / given)
    except FileNotFoundError as exc:
        raise ConfigError(f"physionet: data_path entry {given!r}: {exc}") from None


class PhysioNet(Experiment):
    name = "physionet"
    # (docs/experiments.md shows this line, as `neuralode list` prints it)
    description = ("latent ODE vs RNN on PhysioNet 2012: reconstruction MSE (Rubanova's protocol, "
                   "paper 2.1e-3 to 5.9e-3) and held-out MSE")
    Config = PhysioNetConfig
    _SOURCE = "Rubanova et al. 2019, PhysioNet interpolation (their code scores the encoder's inputs)"
    # The runner reads one class-level dict, but the latent ODE's paper figure depends on the
    # encoder: finish() also reports its MSE as test_mse_rubanova/latent_ode_<encoder>, and each
    # encoder's row has its own figure. The deterministic RNN has no row in their table (their RNN
    # baseline there is the RNN-VAE), so it has no reference.
    references: ClassVar[dict[str, Reference]] = {
        f"{_RUB}/latent_ode_odernn": Reference(_PAPER["odernn"], "latent ODE, ODE-RNN encoder, their units", _SOURCE),
        f"{_RUB}/latent_ode_rnn": Reference(_PAPER["rnn"], "latent ODE, RNN encoder, their units", _SOURCE),
        f"{_RUB}/rnn_vae": Reference(_PAPER["rnn_vae"], "RNN-VAE, their units", _SOURCE),
    }

    @classmethod
    def resolve(cls, config: PhysioNetConfig) -> PhysioNetConfig:
        c = config
        if not 0 <= c.holdout < 1:
            raise ConfigError(f"holdout must be in [0, 1) (0: score reconstruction only), got {c.holdout}")
        if not 0 < c.test_fraction < 1:
            raise ConfigError(f"test_fraction must be in (0, 1), got {c.test_fraction}")
        if not math.isfinite(c.quantization) or c.quantization < 0:
            raise ConfigError(f"quantization must be a finite number of hours >= 0 (0: off), got {c.quantization}")
        if not c.data_path or not all(p.strip() for p in c.data_path):
            raise ConfigError("data_path must name at least one PhysioNet set (e.g. data_path=/x/set-a.tar.gz)")
        if c.max_records < 0 or c.max_records in (1, 2, 3):
            raise ConfigError("max_records must be 0 (all) or >= 4")
        if min(c.iters, c.batch_size, c.latent_dim, c.encoder_hidden, c.eval_batch) < 1:
            raise ConfigError("iters, batch_size, latent_dim, encoder_hidden and eval_batch must be >= 1")
        if c.rnn_hidden < 0:
            raise ConfigError(f"rnn_hidden must be >= 0 (0: size-matched to the latent ODE), got {c.rnn_hidden}")
        if c.rnn_vae_units < 0:
            raise ConfigError(f"rnn_vae_units must be >= 0 (0: dynamics_hidden), got {c.rnn_vae_units}")
        if c.rnn_roll not in ("own", "all"):
            raise ConfigError(f"rnn_roll must be one of own, all, got {c.rnn_roll!r}")
        if c.rnn_vae_grid not in DECODER_GRIDS:
            raise ConfigError(f"rnn_vae_grid must be one of {', '.join(DECODER_GRIDS)}, got {c.rnn_vae_grid!r}")
        if c.time_scale <= 0 or c.step_size <= 0 or c.obs_std <= 0:
            raise ConfigError("time_scale, step_size and obs_std must be > 0")
        if c.encoder not in ("rnn", "odernn"):
            raise ConfigError(f"encoder must be 'rnn' or 'odernn', got {c.encoder!r}")
        if not c.models or any(m not in _MODELS for m in c.models) or len(set(c.models)) < len(c.models):
            raise ConfigError(f"models must list some of {', '.join(_MODELS)}, each once, got {list(c.models)}")
        for name, value, allowed in (("optimizer", c.optimizer, ("adam", "adamax")),
                                     ("lr_schedule", c.lr_schedule, ("constant", "exponential", "cosine")),
                                     ("kl_schedule", c.kl_schedule, ("constant", "rubanova")),
                                     ("likelihood", c.likelihood, ("entry", "variable"))):
            if value not in allowed:
                raise ConfigError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")
        if not c.lr > 0 or c.min_lr < 0 or (c.lr_schedule != "constant" and c.min_lr > c.lr):
            raise ConfigError(f"need lr > 0 and 0 <= min_lr <= lr for a decaying schedule, got lr={c.lr} "
                              f"min_lr={c.min_lr}")
        if not 0 < c.lr_decay <= 1 or not 0 <= c.kl_decay < 1:
            raise ConfigError(f"lr_decay must be in (0, 1] and kl_decay in [0, 1), got {c.lr_decay}, {c.kl_decay}")
        if c.kl_weight < 0 or c.kl_wait_epochs < 0:
            raise ConfigError(f"kl_weight and kl_wait_epochs must be >= 0, got {c.kl_weight}, {c.kl_wait_epochs}")
        if min(c.dynamics_layers, c.encoder_ode_layers, c.encoder_substeps) < 1 or c.encoder_ode_hidden < 0 or c.decoder_hidden < 0:
            raise ConfigError("dynamics_layers, encoder_ode_layers and encoder_substeps must be >= 1, encoder_ode_hidden and "
                              "decoder_hidden >= 0 (0: the default width, a linear decoder)")
        # Found before a run directory is made, so missing data leaves nothing behind.
        return dataclasses.replace(c, data_path=tuple(_resolve_path(p.strip(), c.data_dir) for p in c.data_path))

    # -- data -----------------------------------------------------------------------
    def _load(self) -> list:
        c = self.config
        loaded = []
        for given in c.data_path:
            path = Path(given.strip())
            if not path.exists():
                raise ConfigError(f"PhysioNet data not found at {given}; put set-a.tar.gz there or "
                                  f"pass --set data_path=/path/to/set-a.tar.gz")
            left = c.max_records - len(loaded) if c.max_records else None
            if left == 0:
                break
            loaded += load_physionet(path, max_records=left, quantization=c.quantization)
        ids = [r.record_id for r in loaded]
        if len(set(ids)) != len(ids):
            raise ConfigError(f"data_path={','.join(c.data_path)} holds some patients twice; list each set once")
        return [r for r in loaded if r.times.numel()]

    def setup(self) -> None:
        c = self.config
        records = self._load()
        if len(records) < 4:
            raise ConfigError(f"only {len(records)} records with observations in {','.join(c.data_path)}; "
                              "need at least 4")
        order = np.random.default_rng([c.seed, zlib.crc32(b"split")]).permutation(len(records))
        n_test = max(1, round(len(records) * c.test_fraction))
        train = [records[i] for i in order[n_test:]]
        test = [records[i] for i in order[:n_test]]
        self.normalizer = norm = PhysioNetNormalizer.fit(train, method="minmax")
        self.train, self.test = norm.apply(train), norm.apply(test)
        self.n_records = len(records)
        # Squared error in our units -> in Rubanova et al.'s, (x - min) / max: times ((max - min) / max)^2
        # per variable. A constant variable has max - min = 0 but our scale is 1 (nothing divided by
        # zero), so its raw error is e * 1. A zero max (or an unseen variable) counts as 1.
        high = torch.stack([torch.where(r.mask, r.values, -math.inf).amax(0) for r in train]).amax(0)
        high = torch.where(torch.isfinite(high), high, 1.0)
        raw_max = torch.where(high == 0, 1.0, high)
        self.rubanova_weight = (norm.scale / raw_max).square().to(torch.float32).to(self.device)
        # Training mean per variable (normalised units): the "mean" baseline.
        vals = torch.cat([r.values for r in self.train])
        msk = torch.cat([r.mask for r in self.train])
        self.var_mean = (vals * msk).sum(0) / msk.sum(0).clamp_min(1)
        self.test_batches = []
        for start in range(0, len(self.test), c.eval_batch):
            batch = self._collate(self.test[start:start + c.eval_batch])
            held = holdout_mask(batch[2], c.holdout, np.random.default_rng([c.seed, zlib.crc32(b"test"), start]))
            self.test_batches.append((*batch, held))
        self.totals = {k: [0.0, 0.0] for k in c.models}  # seconds, nfe
        self.dataset_stats = {
            "records": self.n_records, "train_records": len(self.train), "test_records": len(self.test),
            "mean_times_per_record": float(np.mean([r.times.numel() for r in records])),
            "observed_fraction": float(msk.float().mean()),
            "test_union_times": float(np.mean([b[0].numel() for b in self.test_batches])),
            "test_heldout_entries": sum(int(b[3].sum()) for b in self.test_batches),
            "test_seen_entries": sum(int((b[2] & ~b[3]).sum()) for b in self.test_batches),
        }

    def _collate(self, records):
        b = collate_physionet(records, grid="union")
        times = (b.times / self.config.time_scale).to(torch.float32)
        return times.to(self.device), b.values.to(self.device), b.mask.to(self.device)

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(len(self.train) / self.config.batch_size)

    @property
    def num_steps(self) -> int:
        return self.config.iters

    def _latent_ode(self) -> LatentODE:
        c = self.config
        return LatentODE(len(PHYSIONET_VARIABLES), c.latent_dim, encoder=c.encoder, encoder_hidden=c.encoder_hidden,
                         dynamics_hidden=c.dynamics_hidden, dynamics_layers=c.dynamics_layers,
                         encoder_ode_hidden=c.encoder_ode_hidden or None, encoder_ode_layers=c.encoder_ode_layers,
                         encoder_substeps=c.encoder_substeps,
                         decoder_hidden=c.decoder_hidden or None, obs_std=c.obs_std, method="rk4",
                         step_size=c.step_size)

    def build_model(self) -> nn.Module:
        c = self.config
        d = len(PHYSIONET_VARIABLES)
        self.rnn_hidden = c.rnn_hidden
        if self.rnn_hidden == 0:  # "an RNN of the same size": count on the meta device, no memory
            with torch.device("meta"):
                self.rnn_hidden = size_matched_rnn_width(d, count_parameters(self._latent_ode()))
        models = nn.ModuleDict()
        for kind in c.models:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(c.seed * 1_000_003 + zlib.crc32(kind.encode()))
                if kind == "latent_ode":
                    models[kind] = self._latent_ode()
                elif kind == "rnn_vae":
                    models[kind] = RNNVAE(d, c.latent_dim, c.encoder_hidden, c.rnn_vae_units or c.dynamics_hidden,
                                          obs_std=c.obs_std, decoder_grid=c.rnn_vae_grid,
                                          reverse_batch=c.rnn_vae_reverse_batch)
                else:
                    models[kind] = RNNBaseline(d, self.rnn_hidden, obs_std=c.obs_std)
        return models.to(self.device)

    def build_optimizer(self, model):
        # One optimiser over all members is the same as one per member: Adam's and Adamax's
        # updates are elementwise.
        kind = torch.optim.Adamax if self.config.optimizer == "adamax" else torch.optim.Adam
        return kind(model.parameters(), lr=self.config.lr)

    def lr_at(self, step: int) -> float:
        """Learning rate of optimiser step ``step`` (0-based); see :class:`PhysioNetConfig`.

        ``exponential`` is Rubanova et al.'s ``update_learning_rate``, which multiplies by the
        decay before every step (so the first step already takes ``0.999 lr``) and stops at the floor.
        """
        c = self.config
        if c.lr_schedule == "exponential":
            return max(c.lr * c.lr_decay ** (step + 1), c.min_lr)
        if c.lr_schedule == "cosine":
            frac = min(step, c.iters) / c.iters
            return c.min_lr + (c.lr - c.min_lr) * 0.5 * (1.0 + math.cos(math.pi * frac))
        return c.lr

    def kl_at(self, epoch: int) -> float:
        """Weight of the KL term in ``epoch`` (0-based); see :class:`PhysioNetConfig`.

        Why ``rubanova``: their code starts the KL at 0 for 10 epochs and lets it grow as
        ``1 - 0.99^(epoch - 10)``, so it is still only 0.6 at their last (100th) epoch; the
        posterior is hardly pulled towards the prior and the latent ODE trains almost as an
        autoencoder. With the full ELBO (``constant``, 1) the KL limits what ``z0`` carries.
        """
        c = self.config
        if c.kl_schedule == "rubanova":
            return 0.0 if epoch < c.kl_wait_epochs else c.kl_weight * (1.0 - c.kl_decay ** (epoch - c.kl_wait_epochs))
        return c.kl_weight

    def train_step(self, model, batch, position, optimizer):
        loss, logs = super().train_step(model, batch, position, optimizer)   # (the lr of lr_at, set and logged)
        return loss, {**logs, "kl_weight": self.kl_at(position.epoch)}

    def batch(self, position: Position):
        c = self.config
        order = epoch_permutation(c.seed, position.epoch, len(self.train))
        idx = np.sort(order[position.index * c.batch_size:(position.index + 1) * c.batch_size])
        times, values, mask = self._collate([self.train[i] for i in idx])
        held = holdout_mask(mask, c.holdout, np.random.default_rng([c.seed, zlib.crc32(b"train"), position.step]))
        return times, values, mask, held

    def _forward(self, model, kind, times, values, mask, held, *, sample: bool = False, step: int = 0):
        """One model on a batch; the latent ODE and the RNN-VAE decode a posterior sample if ``sample``, else its mean.

        Said explicitly rather than read from ``model.training``: the loop calls ``finish`` with the
        model still in training mode, and the final metrics must be those of the posterior mean.
        The latent ODE's sample comes from the global generator (as in the runs the docs report);
        the RNN-VAE's from a generator of ``(seed, step)``, so that it is the same member whether or
        not the latent ODE, trained first, has drawn before it.
        """
        seen = mask & ~held
        inputs = torch.where(seen, values, torch.zeros((), dtype=values.dtype, device=values.device))
        kwargs = {"target_times": times, "target_values": values, "target_mask": mask}
        shape = (values.shape[0], self.config.latent_dim)
        samples = {"latent_ode": self.config.latent_ode_sample, "rnn_vae": self.config.rnn_vae_sample}
        if kind in _VAES and not (sample and samples[kind]):
            kwargs["eps"] = torch.zeros(shape, device=values.device)
        elif kind == "rnn":
            kwargs["roll"] = self.config.rnn_roll
        elif kind == "rnn_vae":
            generator = torch.Generator().manual_seed(self.config.seed * 1_000_003 + zlib.crc32(b"rnn_vae") + step)
            kwargs["eps"] = torch.randn(shape, generator=generator).to(values.device)
        return model[kind](times, inputs, seen, **kwargs)

    def _objective(self, model, kind, out, values, mask, kl_weight: float) -> torch.Tensor:
        """The training loss of one model's output; see ``likelihood`` in :class:`PhysioNetConfig`."""
        latent = kind in _VAES
        if self.config.likelihood == "entry":
            per_record = mask.sum() / values.shape[0]  # observed entries per record: loss per entry
            return (out.loss(kl_weight) if latent else out.loss()) / per_record
        # Rubanova et al.'s: per record and variable the mean log-density of its entries (a variable
        # without entries adds 0), averaged over the D variables; the KL averaged over latent dimensions.
        std = model[kind].noise().to(values)
        log_density = -0.5 * ((values - out.pred) / std).square() - torch.log(std) - 0.5 * _LOG_2PI
        per_variable = mask / mask.sum(1, keepdim=True).clamp_min(1)
        log_lik = (torch.where(mask, log_density, 0.0) * per_variable).sum((1, 2)) / values.shape[2]
        loss = -log_lik.mean()
        if latent:
            loss = loss + kl_weight * out.kl.mean() / self.config.latent_dim
        return loss

    def loss(self, model, batch, position):
        times, values, mask, held = batch
        kl_weight = self.kl_at(position.epoch)
        total = torch.zeros((), device=self.device)
        logs = {}
        for kind in self.config.models:
            t0 = time.perf_counter()
            out = self._forward(model, kind, times, values, mask, held, sample=True, step=position.step)
            loss = self._objective(model, kind, out, values, mask, kl_weight)
            self.totals[kind][0] += time.perf_counter() - t0
            if kind == "latent_ode":
                self.totals[kind][1] += out.stats.get("nfe", 0)
            logs[f"loss/{kind}"] = loss.item()
            with torch.no_grad():
                logs[f"train_recon_mse/{kind}"] = _masked_mse(out.pred, values, mask & ~held)
                if self.config.holdout > 0:
                    logs[f"train_heldout_mse/{kind}"] = _masked_mse(out.pred, values, held)
            total = total + loss
        return total, logs

    @torch.no_grad()
    def _test_mse(self, model) -> dict:
        """Masked test MSEs of every model and the mean baseline; NaN where no entry is scored."""
        rows = self._rows
        sums = {(fam, k): 0.0 for fam in (_HELDOUT, _RECON, _RECON_RUB, _RUB) for k in rows}
        n_held = n_seen = n_records = 0
        weight = self.rubanova_weight
        for times, values, mask, held in self.test_batches:
            seen = mask & ~held
            preds = {k: self._forward(model, k, times, values, mask, held).pred for k in self.config.models}
            preds["mean"] = self.var_mean.to(values).expand_as(values)
            for k, pred in preds.items():
                err = (pred - values).square()
                sums[_HELDOUT, k] += float((err * held).sum())
                sums[_RECON, k] += float((err * seen).sum())
                sums[_RECON_RUB, k] += float((err * weight * seen).sum())
                sums[_RUB, k] += float(rubanova_mse(err * weight, seen).sum())
            n_held += int(held.sum())
            n_seen += int(seen.sum())
            n_records += values.shape[0]
        count = {_HELDOUT: n_held, _RECON: n_seen, _RECON_RUB: n_seen, _RUB: n_records}
        return {f"{fam}/{k}": v / count[fam] if count[fam] else math.nan for (fam, k), v in sums.items()}

    def evaluate(self, model, position, run):
        return self._test_mse(model)

    @property
    def _rows(self) -> tuple[str, ...]:
        return (*self.config.models, "mean")

    def finish(self, model, run: RunContext) -> dict:
        c = self.config
        metrics = self._test_mse(model)
        for kind in c.models:
            metrics[f"params/{kind}"] = count_parameters(model[kind])
            metrics[f"train_s_per_iter/{kind}"] = self.totals[kind][0] / max(1, c.iters)
        metrics["rnn_hidden"] = self.rnn_hidden
        if "latent_ode" in c.models:
            # The same figure under a name that says the encoder, to pair it with its paper row.
            metrics[f"{_RUB}/latent_ode_{c.encoder}"] = metrics[f"{_RUB}/latent_ode"]
            metrics["nfe_per_iter/latent_ode"] = self.totals["latent_ode"][1] / max(1, c.iters)
        metrics.update({f"data/{k}": v for k, v in self.dataset_stats.items()})
        self._plot_series(run, model)
        self._plot_mse(run, metrics)
        return metrics

    @torch.no_grad()
    def _plot_series(self, run, model):
        """One test record: inputs, held-out entries and both models' predictions for the busiest variables."""
        c = self.config
        times, values, mask, held = self.test_batches[0]
        b = int(mask.sum((1, 2)).argmax())
        t = times.cpu().numpy() * c.time_scale
        preds = {k: self._forward(model, k, times, values, mask, held).pred[b].cpu().numpy() for k in c.models}
        counts = mask[b].sum(0).cpu().numpy()
        top = np.argsort(-counts)[:4]
        fig = figure(figsize=(10, 6))
        axes = np.asarray(fig.subplots(2, 2)).ravel()
        fig.subplots_adjust(hspace=0.35)
        m, h, v = mask[b].cpu().numpy(), held[b].cpu().numpy(), values[b].cpu().numpy()
        for ax, j in zip(axes, top):
            own = m[:, j]
            seen, hid = own & ~h[:, j], h[:, j]
            ax.plot(t[seen], v[seen, j], "k.", ms=5, label="input (reconstruction target)")
            if hid.any():
                ax.plot(t[hid], v[hid, j], "o", mfc="none", color="tab:green", ms=6, label="held out")
            rows = m.any(-1)  # the record's own times
            for kind in preds:
                ax.plot(t[rows], preds[kind][rows, j], color=_COLORS[kind], lw=1.2, label=_LABELS[kind])
            ax.set_title(PHYSIONET_VARIABLES[j], fontsize=9)
            ax.set_xlabel("hours")
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=7)
        run.save_figure(fig, "interpolation")

    def _plot_mse(self, run, metrics):
        """Grouped bars: held-out and reconstruction MSE (our units), reconstruction in Rubanova's units."""
        fig = figure(figsize=(8, 3.6))
        ax = fig.subplots()
        groups = [(_HELDOUT, "held-out"), (_RECON, "reconstruction"), (_RECON_RUB, "reconstruction,\nRubanova's norm"),
                  (_RUB, "Rubanova's MSE\n(norm and averaging)")]
        rows = self._rows
        width = 0.8 / len(rows)
        for i, k in enumerate(rows):
            vals = [metrics[f"{fam}/{k}"] for fam, _ in groups]
            ax.bar(np.arange(len(groups)) + (i - (len(rows) - 1) / 2) * width,
                   [0.0 if math.isnan(x) else x for x in vals], width, color=_COLORS[k], label=_LABELS[k])
        if math.isnan(metrics[f"{_HELDOUT}/{rows[0]}"]):
            ax.text(0, 0, "holdout=0:\nnothing held out", ha="center", va="bottom", fontsize=7)
        # The paper's latent ODE (of this run's encoder) and RNN-VAE, drawn even without an RNN-VAE
        # member: it is the paper's RNN baseline that our RNN is read against.
        refs = [(f"{_RUB}/latent_ode_{self.config.encoder}", f"latent ODE, {self.config.encoder} encoder", "--")
                ] if "latent_ode" in rows else []
        refs.append((f"{_RUB}/rnn_vae", "RNN-VAE", ":"))
        for key, label, ls in refs:
            ref = self.references[key].value
            ax.plot([3 - 0.4, 3 + 0.4], [ref, ref], color="k", ls=ls, lw=1, label=f"Rubanova et al. {label} ({ref:g})")
        ax.set_xticks(np.arange(len(groups)), [g for _, g in groups], fontsize=8)
        ax.set_ylabel("test MSE")
        top = max([x for x in (metrics[f"{fam}/{k}"] for fam, _ in groups for k in rows) if not math.isnan(x)]
                  + [self.references[key].value for key, _, _ in refs])
        ax.set_ylim(0, 1.45 * top)  # headroom for the legend
        ax.legend(fontsize=7, ncol=2, loc="upper center")
        ax.grid(alpha=0.3, axis="y")
        run.save_figure(fig, "mse")

    def state_dict(self) -> dict:
        return {"totals": {k: list(v) for k, v in self.totals.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.totals = {k: [float(x) for x in v] for k, v in state["totals"].items()}


def rubanova_mse(sq_err: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Rubanova et al.'s MSE of each record, ``(B, T, D) -> (B,)``.

    Their ``compute_masked_likelihood`` averages per record and variable over the variable's
    entries in ``mask`` (a variable without any contributes 0, not nothing), then over all ``D``
    variables; the test MSE is the mean of this over records.
    """
    per_variable = (sq_err * mask).sum(1) / mask.sum(1).clamp_min(1)
    return per_variable.mean(1)


def _masked_mse(pred: torch.Tensor, values: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean squared error over the True entries of ``mask``; NaN when there are none (not 0)."""
    n = int(mask.sum())
    return float(((pred - values).pow(2) * mask).sum()) / n if n else math.nan
