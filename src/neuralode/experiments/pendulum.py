"""``pendulum``: learn a real pendulum's dynamics and extrapolate, ODE vs discrete steps.

Data: the measured trajectories of Schmidt & Lipson (2009) (``real_pend_h_1.txt``: angle
``o`` and angular velocity ``v`` of one pendulum filmed at 6 frames/s for 94.5 s, with dropped
frames), read with :func:`neuralode.data.load_pendulum`. The first ``train_fraction`` of
each trajectory is the training data; the rest is for extrapolation.

Both models see the same data in the same way: every step takes ``batch_size`` windows of
``window`` frames that lie inside the training part, starts each at its first observation
and rolls out to the window's end on the frame grid (``dt`` = the smallest time step of the
file); the loss is the mean squared error at the frames that were observed (dropped frames
are masked). States are standardised with the training part's mean and standard deviation.

* ODE model: ``dx/dt = f(x)``, ``f`` an MLP ``D-H-H-D`` (tanh), solved with fixed-step
  rk4 at ``dt`` (``neuralode.solve``, direct backprop).
* discrete model (ResNet-style): ``x_{n+1} = x_n + g(x_n)``, ``g`` the same MLP, one step
  per frame.

Evaluation: from the last training observation, each model is rolled out to the end of the
trajectory; reported are the RMS errors (original units) over the extrapolation, over its
first ``short_horizon`` seconds, and the fit on the training part. Plots: the trajectories
(time series, extrapolation marked) and the extrapolation error over time.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Annotated

import numpy as np
import torch
from torch import nn

import neuralode
from neuralode.data import data_search_path, load_pendulum
from neuralode.data import find_data_dir as locate_data_dir
from neuralode.models import MLP

from .base import Experiment
from .config import NON_EMPTY, ConfigError, Fraction, NonNegInt, PosFloat, PosInt, Range, RunConfig
from .runner import RunContext, figure

__all__ = ["Pendulum", "PendulumConfig", "default_data_dirs", "find_data_dir"]

_MODELS = ("ode", "discrete")
_LABELS = {"ode": "ODE model", "discrete": "discrete steps x + g(x)"}


def default_data_dirs() -> list[Path]:
    """Where the data are looked for without ``data_dir``, in order: ``$NEURALODE_DATA/pendulum``,
    the user cache, the checkout's ``../shared/data/pendulum`` (:mod:`neuralode.data.locate`)."""
    return data_search_path("pendulum")


def find_data_dir(data_dir: str | None, file: str) -> Path:
    """The directory holding ``file``; ConfigError naming the places tried and the fix."""
    try:
        return locate_data_dir("pendulum", data_dir, required=[(file,)])
    except FileNotFoundError as exc:
        raise ConfigError(f"pendulum: {exc}") from None


@dataclasses.dataclass
class PendulumConfig(RunConfig):
    """Configuration of ``pendulum``.

    Attributes
    ----------
    data_dir : directory of the data files; ``None``: found by the data rule of
        :mod:`neuralode.data.locate` (``$NEURALODE_DATA/pendulum``, the user cache, the checkout's
        ``../shared/data/pendulum``); the resolved path is recorded.
    file : the data file (one or more trials; every trial is split in time).
    train_fraction : leading fraction of each trajectory used for training.
    hidden : width of both MLPs (two hidden layers).
    steps, lr, batch_size, window : Adam steps, learning rate, windows per step and frames
        per window.
    short_horizon : seconds of extrapolation for the short-horizon error.
    """

    data_dir: str | None = None
    file: Annotated[str, NON_EMPTY] = "real_pend_h_1.txt"
    train_fraction: Fraction = 0.5
    hidden: PosInt = 64
    steps: PosInt = 600
    lr: float = 3e-3
    batch_size: PosInt = 32
    window: Annotated[int, Range(2)] = 24
    short_horizon: PosFloat = 10.0
    log_every: PosInt = 10
    eval_every: NonNegInt = 100
    checkpoint_every: PosInt = 100


class Pendulum(Experiment):
    name = "pendulum"
    description = "real pendulum (Schmidt & Lipson 2009): ODE vs discrete-step model, extrapolation error"
    Config = PendulumConfig

    @classmethod
    def resolve(cls, config: PendulumConfig) -> PendulumConfig:
        c = config
        if not 0 < c.train_fraction < 1:
            raise ConfigError(f"train_fraction must be in (0, 1), got {c.train_fraction}")
        if min(c.hidden, c.steps, c.batch_size) < 1 or c.window < 2 or c.lr <= 0 or c.short_horizon <= 0:
            raise ConfigError("hidden, steps, batch_size must be >= 1, window >= 2, lr and short_horizon > 0")
        if c.log_every < 1 or c.checkpoint_every < 1:
            raise ConfigError("log_every and checkpoint_every must be >= 1")
        return dataclasses.replace(c, data_dir=str(find_data_dir(c.data_dir, c.file)))

    @property
    def num_steps(self) -> int:
        return self.config.steps

    def setup(self) -> None:
        c = self.config
        path = Path(c.data_dir) / c.file
        data = load_pendulum(path)
        self.columns = data.columns
        trajs = data.trajectories()
        short = [tr.trial for tr in trajs if len(tr.times) < 2]
        if short:  # the frame step below is the smallest gap between two times of a trial
            raise ValueError(f"{path}: trial {short[0]} has only one row; every trial needs at least 2 (times "
                             f"and states to learn from); drop that trial from the file or pass another --set file=")
        self.dt = float(min(np.diff(tr.times.numpy()).min() for tr in trajs))
        self.trajs = []  # per trial: frame index (T,), times (T,), states (T, D) float32, n_train
        train_states = []
        for tr in trajs:
            times = tr.times.numpy()
            frames = np.rint((times - times[0]) / self.dt).astype(np.int64)
            n_train = max(2, round(c.train_fraction * len(times)))
            states = tr.states.numpy()
            self.trajs.append({"frames": frames, "times": times, "states": states, "n_train": n_train})
            train_states.append(states[:n_train])
        allt = np.concatenate(train_states)
        self.mean, self.std = allt.mean(0), allt.std(0) + 1e-8
        # Training windows: (trajectory, start observation) whose `window` frames stay inside
        # the training part.
        self.starts = []
        for k, tr in enumerate(self.trajs):
            last = tr["frames"][tr["n_train"] - 1]
            for i in range(tr["n_train"] - 1):
                if tr["frames"][i] + c.window - 1 <= last:
                    self.starts.append((k, i))
        if not self.starts:
            raise ConfigError(f"window={c.window} frames is longer than the training part; lower window "
                              f"or raise train_fraction")

    def _norm(self, states: np.ndarray) -> torch.Tensor:
        return torch.tensor((states - self.mean) / self.std, dtype=torch.float32, device=self.device)

    def build_model(self) -> nn.Module:
        c = self.config
        d = len(self.mean)
        return nn.ModuleDict({
            "ode": MLP(d, [c.hidden, c.hidden], d, activation=nn.Tanh),
            "discrete": MLP(d, [c.hidden, c.hidden], d, activation=nn.Tanh),
        }).to(self.device)

    def build_optimizer(self, model):
        # Per-parameter Adam state and disjoint parameters: each model trains as if alone.
        return torch.optim.Adam(model.parameters(), lr=self.config.lr)

    def rollout(self, model, name: str, x0: torch.Tensor, frames: int) -> torch.Tensor:
        """States at frames ``0..frames-1`` from ``x0`` (B, D), normalised; shape (frames, B, D)."""
        if name == "ode":
            f = model["ode"]
            t = torch.arange(frames, dtype=torch.float64, device=x0.device) * self.dt
            return neuralode.solve(lambda t, x: f(x), x0, t, method="rk4", options={"step_size": self.dt},
                                   gradient="direct").ys
        g = model["discrete"]
        xs = [x0]
        for _ in range(frames - 1):
            xs.append(xs[-1] + g(xs[-1]))
        return torch.stack(xs)

    def batch(self, position):
        c = self.config
        rng = np.random.default_rng([c.seed, position.step])
        picks = rng.integers(0, len(self.starts), c.batch_size)
        x0, target, mask = [], np.zeros((c.window, c.batch_size, len(self.mean))), np.zeros((c.window, c.batch_size))
        for b, p in enumerate(picks):
            k, i = self.starts[p]
            tr = self.trajs[k]
            rel = tr["frames"] - tr["frames"][i]
            sel = np.nonzero((rel >= 0) & (rel < c.window) & (np.arange(len(rel)) < tr["n_train"]))[0]
            target[rel[sel], b] = (tr["states"][sel] - self.mean) / self.std
            mask[rel[sel], b] = 1.0
            x0.append(tr["states"][i])
        return (self._norm(np.stack(x0)), torch.tensor(target, dtype=torch.float32, device=self.device),
                torch.tensor(mask, dtype=torch.float32, device=self.device))

    def loss(self, model, batch, position):
        x0, target, mask = batch
        total = torch.zeros((), device=self.device)
        logs = {}
        for name in _MODELS:
            pred = self.rollout(model, name, x0, self.config.window)
            mse = (((pred - target) ** 2).mean(-1) * mask).sum() / mask.sum()
            logs[f"loss/{name}"] = mse.item()
            total = total + mse
        return total, logs

    # -- evaluation ------------------------------------------------------------------
    def _extrapolate(self, model):
        """Per trajectory: times, truth and each model's prediction (original units) from the
        last training observation to the end, plus the fit over the training part."""
        out = []
        with torch.no_grad():
            for tr in self.trajs:
                n = tr["n_train"]
                frames = tr["frames"] - tr["frames"][n - 1]
                entry = {"times": tr["times"], "states": tr["states"], "n_train": n, "pred": {}, "fit": {}}
                x0 = self._norm(tr["states"][n - 1:n])
                fit0 = self._norm(tr["states"][:1])
                for name in _MODELS:
                    ys = self.rollout(model, name, x0, int(frames[-1]) + 1)[:, 0].cpu().double().numpy()
                    entry["pred"][name] = ys[frames[n - 1:]] * self.std + self.mean
                    ys = self.rollout(model, name, fit0, int(tr["frames"][n - 1]) + 1)[:, 0].cpu().double().numpy()
                    entry["fit"][name] = ys[tr["frames"][:n]] * self.std + self.mean
                out.append(entry)
        return out

    def _errors(self, extrapolation) -> dict:
        c = self.config
        metrics = {}
        for name in _MODELS:
            sq, sq_short, sq_fit = [], [], []
            for e in extrapolation:
                n = e["n_train"]
                true = e["states"][n - 1:]
                err = ((e["pred"][name] - true) ** 2).mean(-1)
                horizon = e["times"][n - 1:] - e["times"][n - 1] <= c.short_horizon
                sq.append(err)
                sq_short.append(err[horizon])
                sq_fit.append(((e["fit"][name] - e["states"][:n]) ** 2).mean(-1))
            metrics[f"{name}_extrapolation_rmse"] = float(np.sqrt(np.concatenate(sq).mean()))
            metrics[f"{name}_short_rmse"] = float(np.sqrt(np.concatenate(sq_short).mean()))
            metrics[f"{name}_train_rollout_rmse"] = float(np.sqrt(np.concatenate(sq_fit).mean()))
        return metrics

    def evaluate(self, model, position, run):
        return {k.replace("_extrapolation_rmse", "/extrapolation_rmse"): v
                for k, v in self._errors(self._extrapolate(model)).items() if k.endswith("_extrapolation_rmse")}

    def finish(self, model, run: RunContext) -> dict:
        extrapolation = self._extrapolate(model)
        metrics = {"data_file": str(Path(self.config.data_dir) / self.config.file), "frame_dt": self.dt,
                   **self._errors(extrapolation)}
        self._plot_trajectories(run, extrapolation)
        self._plot_error(run, extrapolation)
        return metrics

    def _plot_trajectories(self, run, extrapolation):
        e = extrapolation[0]
        n = e["n_train"]
        d = e["states"].shape[1]
        fig = figure(figsize=(12, 2.6 * d), layout="constrained")
        axes = fig.subplots(d, 1, sharex=True, squeeze=False)[:, 0]
        colors = {"ode": "tab:red", "discrete": "tab:blue"}
        for j, ax in enumerate(axes):
            ax.plot(e["times"], e["states"][:, j], "k.", ms=2, label="measured")
            ax.axvline(e["times"][n - 1], color="gray", ls="--", lw=0.8)
            for name in _MODELS:
                ax.plot(e["times"][:n], e["fit"][name][:, j], color=colors[name], lw=0.8, alpha=0.5)
                ax.plot(e["times"][n - 1:], e["pred"][name][:, j], color=colors[name], lw=1.2, label=_LABELS[name])
            ax.set_ylabel(self.columns[j] if j < len(self.columns) else f"x{j}")
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=7, loc="upper right")
        axes[0].set_title(f"{self.config.file}: trained left of the dashed line, extrapolated right of it "
                          f"(faint: rollout from the first point)", fontsize=9)
        axes[-1].set_xlabel("time [s]")
        run.save_figure(fig, "trajectories")

    def _plot_error(self, run, extrapolation):
        fig = figure(figsize=(8, 3.8), layout="constrained")
        ax = fig.subplots()
        colors = {"ode": "tab:red", "discrete": "tab:blue"}
        for k, e in enumerate(extrapolation):
            n = e["n_train"]
            t = e["times"][n - 1:] - e["times"][n - 1]
            for name in _MODELS:
                err = np.sqrt(((e["pred"][name] - e["states"][n - 1:]) ** 2).mean(-1))
                ax.plot(t, err, color=colors[name], lw=1, alpha=0.9 if k == 0 else 0.5,
                        label=_LABELS[name] if k == 0 else None)
        ax.set_xlabel("seconds after the last training observation")
        ax.set_ylabel("RMS error over the state")
        ax.set_title("extrapolation error over time")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        run.save_figure(fig, "extrapolation_error")
