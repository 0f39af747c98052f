"""``physionet``: interpolate held-out ICU measurements with a latent ODE (Rubanova et al. 2019).

Data: the PhysioNet/CinC Challenge 2012 records (``neuralode.data.load_physionet``; set A by
default, the first ``max_records`` patients of the archive), each an irregular multivariate series
of 37 variables with a mask of what was measured, times in hours since admission (0-48 h).
Patients without any time-series observation are dropped. Records are split into train and test
(a seeded permutation); every variable is min-max normalised with statistics of the training
records only (``PhysioNetNormalizer``), so training values lie in ``[0, 1]``. For the ODE solver,
times are divided by ``time_scale`` (48 h), so a series spans ``[0, 1]``.

Task (interpolation): a fraction ``holdout`` of each record's *observed entries* is hidden from
the encoder and becomes the target. Training draws a fresh hold-out set every step (a pure
function of ``(seed, step)``) and scores the reconstruction of all observed entries; evaluation
uses a fixed hold-out set per test record and reports the **masked MSE on the held-out entries**
in normalised units (Rubanova et al. 2019 report interpolation MSE of about ``2e-3`` for latent
ODEs on PhysioNet, in their own normalisation and with their own subsampling; it is shown as a
reference, not a like-for-like figure).

Models, trained on union-grid batches (``collate_physionet``):

* ``latent_ode``: :class:`neuralode.models.LatentODE` (latent ``latent_dim``, GRU encoder, MLP
  dynamics, MLP decoder, fixed-step RK4), ELBO with observation ``sigma = obs_std``; evaluated at the
  posterior mean;
* ``rnn``: :class:`neuralode.models.RNNBaseline` (GRU encoder-decoder of ``rnn_hidden`` units),
  the same Gaussian likelihood.

A third row, ``mean``, predicts each variable's training mean (in normalised units), so the MSEs
have a floor to be read against.
"""

from __future__ import annotations

import dataclasses
import math
import time
import zlib
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from torch import nn

from neuralode.data import (
    PHYSIONET_VARIABLES,
    PhysioNetNormalizer,
    collate_physionet,
    load_physionet,
)
from neuralode.models import LatentODE, RNNBaseline, count_parameters

from .base import Experiment, Position, Reference, epoch_permutation
from .config import ConfigError, RunConfig
from .runner import RunContext, figure

__all__ = ["PhysioNet", "PhysioNetConfig", "holdout_mask"]

_MODELS = ("latent_ode", "rnn")


def holdout_mask(mask: torch.Tensor, fraction: float, rng: np.random.Generator) -> torch.Tensor:
    """A random subset (each entry with probability ``fraction``) of the True entries of ``mask``."""
    draw = torch.from_numpy(rng.random(tuple(mask.shape)) < fraction)
    return mask & draw.to(mask.device)


@dataclasses.dataclass
class PhysioNetConfig(RunConfig):
    """Configuration of ``physionet``.

    Attributes
    ----------
    data_path : the set-a archive (or an extracted directory); relative paths are tried from the
        working directory and then from the repository root.
    max_records : patients read from the archive (0: all 4,000).
    test_fraction : share of the patients held out for testing.
    holdout : share of each record's observed entries hidden from the encoder and scored.
    time_scale : hours per unit of solver time (48: a stay spans [0, 1]).
    iters, batch_size, lr : Adam steps, records per step, step size.
    latent_dim, encoder_hidden, dynamics_hidden, decoder_hidden, step_size, obs_std : the latent ODE.
    rnn_hidden : GRU units of the RNN baseline.
    eval_batch : records per evaluation batch (bounds the union grid).
    """

    data_path: str = "../shared/data/physionet2012/set-a.tar.gz"
    max_records: int = 300
    test_fraction: float = 0.2
    holdout: float = 0.2
    time_scale: float = 48.0
    iters: int = 100
    batch_size: int = 32
    lr: float = 1e-2
    latent_dim: int = 10
    encoder: str = "rnn"
    encoder_hidden: int = 32
    dynamics_hidden: int = 32
    decoder_hidden: int = 32
    step_size: float = 0.05
    obs_std: float = 0.05
    rnn_hidden: int = 32
    eval_batch: int = 64
    log_every: int = 10
    checkpoint_every: int = 100


def _resolve_path(path: str) -> Path:
    p = Path(path)
    if p.exists() or p.is_absolute():
        return p
    root = Path(__file__).resolve().parents[3]  # src/neuralode/experiments -> repository root
    return root / p if (root / p).exists() else p


class PhysioNet(Experiment):
    name = "physionet"
    description = "latent ODE vs RNN interpolating held-out PhysioNet 2012 measurements (masked MSE; paper ~2e-3)"
    Config = PhysioNetConfig
    references: ClassVar[dict[str, Reference]] = {
        "test_mse/latent_ode": Reference(2e-3, "latent ODE interpolation MSE, normalised units (approximate)",
                                         "Rubanova et al. 2019, Table 2"),
    }

    @classmethod
    def resolve(cls, config: PhysioNetConfig) -> PhysioNetConfig:
        c = config
        if not 0 < c.holdout < 1 or not 0 < c.test_fraction < 1:
            raise ConfigError("holdout and test_fraction must be in (0, 1)")
        if c.max_records < 0 or c.max_records in (1, 2, 3):
            raise ConfigError("max_records must be 0 (all) or >= 4")
        if min(c.iters, c.batch_size, c.latent_dim, c.encoder_hidden, c.rnn_hidden, c.eval_batch) < 1:
            raise ConfigError("iters, batch_size, latent_dim, encoder_hidden, rnn_hidden and eval_batch must be >= 1")
        if c.time_scale <= 0 or c.step_size <= 0 or c.obs_std <= 0:
            raise ConfigError("time_scale, step_size and obs_std must be > 0")
        if c.encoder not in ("rnn", "odernn"):
            raise ConfigError(f"encoder must be 'rnn' or 'odernn', got {c.encoder!r}")
        return c

    # -- data -----------------------------------------------------------------------
    def setup(self) -> None:
        c = self.config
        path = _resolve_path(c.data_path)
        if not path.exists():
            raise ConfigError(f"PhysioNet data not found at {c.data_path}; put set-a.tar.gz there or "
                              f"pass --set data_path=/path/to/set-a.tar.gz")
        records = [r for r in load_physionet(path, max_records=c.max_records or None) if r.times.numel()]
        if len(records) < 4:
            raise ConfigError(f"only {len(records)} records with observations in {path}; need at least 4")
        order = np.random.default_rng([c.seed, zlib.crc32(b"split")]).permutation(len(records))
        n_test = max(1, round(len(records) * c.test_fraction))
        train = [records[i] for i in order[n_test:]]
        test = [records[i] for i in order[:n_test]]
        self.normalizer = PhysioNetNormalizer.fit(train, method="minmax")
        self.train, self.test = self.normalizer.apply(train), self.normalizer.apply(test)
        self.n_records = len(records)
        # Training mean per variable (normalised units): the "mean" baseline.
        vals = torch.cat([r.values for r in self.train])
        msk = torch.cat([r.mask for r in self.train])
        self.var_mean = (vals * msk).sum(0) / msk.sum(0).clamp_min(1)
        self.test_batches = []
        for start in range(0, len(self.test), c.eval_batch):
            batch = self._collate(self.test[start:start + c.eval_batch])
            held = holdout_mask(batch[2], c.holdout, np.random.default_rng([c.seed, zlib.crc32(b"test"), start]))
            self.test_batches.append((*batch, held))
        self.totals = {k: [0.0, 0.0] for k in _MODELS}  # seconds, nfe
        self.dataset_stats = {
            "records": self.n_records, "train_records": len(self.train), "test_records": len(self.test),
            "mean_times_per_record": float(np.mean([r.times.numel() for r in records])),
            "observed_fraction": float(msk.float().mean()),
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

    def build_model(self) -> nn.Module:
        c = self.config
        d = len(PHYSIONET_VARIABLES)
        models = nn.ModuleDict()
        for kind in _MODELS:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(c.seed * 1_000_003 + zlib.crc32(kind.encode()))
                if kind == "latent_ode":
                    models[kind] = LatentODE(d, c.latent_dim, encoder=c.encoder, encoder_hidden=c.encoder_hidden,
                                             dynamics_hidden=c.dynamics_hidden, decoder_hidden=c.decoder_hidden or None,
                                             obs_std=c.obs_std, method="rk4", step_size=c.step_size)
                else:
                    models[kind] = RNNBaseline(d, c.rnn_hidden, obs_std=c.obs_std)
        return models.to(self.device)

    def build_optimizer(self, model):
        return torch.optim.Adam(model.parameters(), lr=self.config.lr)

    def batch(self, position: Position):
        c = self.config
        order = epoch_permutation(c.seed, position.epoch, len(self.train))
        idx = np.sort(order[position.index * c.batch_size:(position.index + 1) * c.batch_size])
        times, values, mask = self._collate([self.train[i] for i in idx])
        held = holdout_mask(mask, c.holdout, np.random.default_rng([c.seed, zlib.crc32(b"train"), position.step]))
        return times, values, mask, held

    def _forward(self, model, kind, times, values, mask, held):
        seen = mask & ~held
        inputs = torch.where(seen, values, torch.zeros((), dtype=values.dtype, device=values.device))
        kwargs = {"target_times": times, "target_values": values, "target_mask": mask}
        if kind == "latent_ode" and not model.training:
            kwargs["eps"] = torch.zeros(values.shape[0], self.config.latent_dim, device=values.device)
        return model[kind](times, inputs, seen, **kwargs)

    def loss(self, model, batch, position):
        times, values, mask, held = batch
        per_record = mask.sum() / values.shape[0]  # observed entries per record: loss per entry
        total = torch.zeros((), device=self.device)
        logs = {}
        for kind in _MODELS:
            t0 = time.perf_counter()
            out = self._forward(model, kind, times, values, mask, held)
            loss = out.loss() / per_record
            self.totals[kind][0] += time.perf_counter() - t0
            if kind == "latent_ode":
                self.totals[kind][1] += out.stats.get("nfe", 0)
            logs[f"loss/{kind}"] = loss.item()
            with torch.no_grad():
                logs[f"train_heldout_mse/{kind}"] = _masked_mse(out.pred, values, held)
            total = total + loss
        return total, logs

    @torch.no_grad()
    def _test_mse(self, model) -> dict:
        sums = {k: 0.0 for k in (*_MODELS, "mean")}
        count = 0
        for times, values, mask, held in self.test_batches:
            for kind in _MODELS:
                pred = self._forward(model, kind, times, values, mask, held).pred
                sums[kind] += float(((pred - values).pow(2) * held).sum())
            sums["mean"] += float(((self.var_mean.to(values) - values).pow(2) * held).sum())
            count += int(held.sum())
        return {f"test_mse/{k}": v / max(count, 1) for k, v in sums.items()}

    def evaluate(self, model, position, run):
        return self._test_mse(model)

    def finish(self, model, run: RunContext) -> dict:
        c = self.config
        metrics = self._test_mse(model)
        for kind in _MODELS:
            metrics[f"params/{kind}"] = count_parameters(model[kind])
            metrics[f"train_s_per_iter/{kind}"] = self.totals[kind][0] / max(1, c.iters)
        metrics["nfe_per_iter/latent_ode"] = self.totals["latent_ode"][1] / max(1, c.iters)
        metrics.update({f"data/{k}": v for k, v in self.dataset_stats.items()})
        self._plot_series(run, model)
        self._plot_mse(run, metrics)
        return metrics

    @torch.no_grad()
    def _plot_series(self, run, model):
        """One test record: observed, held-out and both models' predictions for the busiest variables."""
        c = self.config
        times, values, mask, held = self.test_batches[0]
        b = int(mask.sum((1, 2)).argmax())
        t = times.cpu().numpy() * c.time_scale
        preds = {k: self._forward(model, k, times, values, mask, held).pred[b].cpu().numpy() for k in _MODELS}
        counts = mask[b].sum(0).cpu().numpy()
        top = np.argsort(-counts)[:4]
        fig = figure(figsize=(10, 6))
        axes = np.asarray(fig.subplots(2, 2)).ravel()
        fig.subplots_adjust(hspace=0.35)
        m, h, v = mask[b].cpu().numpy(), held[b].cpu().numpy(), values[b].cpu().numpy()
        for ax, j in zip(axes, top):
            own = m[:, j]
            seen, hid = own & ~h[:, j], h[:, j]
            ax.plot(t[seen], v[seen, j], "k.", ms=5, label="input")
            ax.plot(t[hid], v[hid, j], "o", mfc="none", color="tab:green", ms=6, label="held out")
            rows = m.any(-1)  # the record's own times
            for kind, color in (("latent_ode", "tab:blue"), ("rnn", "tab:red")):
                ax.plot(t[rows], preds[kind][rows, j], color=color, lw=1.2,
                        label="latent ODE" if kind == "latent_ode" else "RNN")
            ax.set_title(PHYSIONET_VARIABLES[j], fontsize=9)
            ax.set_xlabel("hours")
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=7)
        run.save_figure(fig, "interpolation")

    def _plot_mse(self, run, metrics):
        fig = figure(figsize=(5, 3.4))
        ax = fig.subplots()
        names = ["latent_ode", "rnn", "mean"]
        vals = [metrics[f"test_mse/{k}"] for k in names]
        ax.bar(["latent ODE", "RNN", "train mean"], vals, color=["tab:blue", "tab:red", "0.6"])
        ax.axhline(2e-3, color="k", ls="--", lw=1, label="Rubanova et al. 2019 (~2e-3)")
        ax.set_ylabel("held-out MSE (normalised)")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3, axis="y")
        run.save_figure(fig, "mse")

    def state_dict(self) -> dict:
        return {"totals": {k: list(v) for k, v in self.totals.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.totals = {k: [float(x) for x in v] for k, v in state["totals"].items()}


def _masked_mse(pred: torch.Tensor, values: torch.Tensor, mask: torch.Tensor) -> float:
    n = int(mask.sum())
    return float(((pred - values).pow(2) * mask).sum()) / max(n, 1)
