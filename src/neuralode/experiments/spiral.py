"""``spiral``: learn the dynamics of a 2-D system from its trajectory.

Variants (``--set variant=...``):

``cubic`` (default; the classic ``torchdiffeq`` ``ode_demo``)
    ``dy/dt = (y**3) @ A`` with ``A = [[-0.1, 2.0], [-2.0, -0.1]]``, ``y0 = [2, 0]``, 1000
    points on ``[0, 25]`` (ground truth by ``neuralode.odeint`` with dopri5). The model is
    ``f(t, y) = MLP(y**3)`` with one hidden layer of 50 tanh units; each step fits a
    mini-batch of 20 windows of 10 time steps with RMSprop (lr 1e-3) on mean ``|pred - true|``.
``linear``
    ``dz/dt = A z`` with ``A = [[-0.1, -1.0], [1.0, -0.1]]``, ``z0 = [1, 1]``, learned with a
    single bias-free 2x2 linear layer, Adam lr 0.1, mean squared error; the learned weight is
    the estimate of ``A``.
``linear_hard``
    ``A = [[-1.0, -1.0], [1.0, -0.5]]`` observed with Gaussian noise, an MLP (two hidden
    tanh layers), Adam lr 1e-3; the estimate of ``A`` is the least-squares linear fit of the
    learned field over the true trajectory's states.

Metrics: the trajectory MSE over the whole span (the learned system solved from ``y0``
against the noise-free truth) and, for the linear variants, the Frobenius error of the
learned matrix. Plots: true vs learned trajectories at a few points during training, the
phase portrait with the learned vector field, and the evaluation curves.
"""

from __future__ import annotations

import dataclasses
from typing import Literal, Optional

import numpy as np
import torch
from torch import nn

import neuralode
from neuralode.models import MLP

from .base import Experiment, Position, epoch_permutation
from .config import ConfigError, NonNegFloat, NonNegInt, PosFloat, PosInt, RunConfig, max_steps_field, solve_cap
from .runner import RunContext, figure

__all__ = ["Spiral", "SpiralConfig"]

_SYSTEMS = {
    # variant: (A, y0, t_end)
    "cubic": ([[-0.1, 2.0], [-2.0, -0.1]], [2.0, 0.0], 25.0),
    "linear": ([[-0.1, -1.0], [1.0, -0.1]], [1.0, 1.0], 25.0),
    "linear_hard": ([[-1.0, -1.0], [1.0, -0.5]], [1.0, 1.0], 10.0),
}
# Defaults that depend on the variant, filled in by Spiral.resolve (None in the dataclass).
_VARIANT_DEFAULTS = {
    "cubic": dict(epochs=20, optimizer="rmsprop", lr=1e-3, hidden=50, noise_std=0.0, loss="l1"),
    "linear": dict(epochs=15, optimizer="adam", lr=0.1, hidden=0, noise_std=0.0, loss="mse"),
    "linear_hard": dict(epochs=30, optimizer="adam", lr=1e-3, hidden=50, noise_std=0.05, loss="mse"),
}


@dataclasses.dataclass
class SpiralConfig(RunConfig):
    """Configuration of ``spiral``; ``None`` fields take the variant's default.

    Attributes
    ----------
    variant : {"cubic", "linear", "linear_hard"}
    data_size : int
        Time points of the trajectory on ``[0, t_end]``.
    t_end : float or None
        End of the time span (cubic, linear: 25; linear_hard: 10).
    batch_time, batch_size : int
        Each step fits ``batch_size`` windows of ``batch_time`` consecutive points; an epoch
        is one pass over the shuffled windows.
    epochs : int or None
        Training length (cubic 20, linear 15, linear_hard 30).
    optimizer : {"rmsprop", "adam"} or None
    lr : float or None
    hidden : int or None
        Hidden units of the vector-field MLP (0: one bias-free linear layer, the linear variant).
    noise_std : float or None
        Standard deviation of the Gaussian observation noise (linear_hard: 0.05).
    loss : {"l1", "mse"} or None
    method, rtol, atol : solver settings of the training and evaluation solves.
    max_steps : int
        The most steps one adaptive solve may take (a diverging model stops with an error).
    snapshots : int
        Evaluations kept for the "true vs learned over training" figure.
    """

    variant: Literal["cubic", "linear", "linear_hard"] = "cubic"
    data_size: PosInt = 1000
    t_end: Optional[PosFloat] = None
    batch_time: PosInt = 10
    batch_size: PosInt = 20
    epochs: Optional[PosInt] = None
    optimizer: Optional[Literal["rmsprop", "adam"]] = None
    lr: Optional[float] = None
    hidden: Optional[NonNegInt] = None
    noise_std: Optional[NonNegFloat] = None
    loss: Optional[Literal["l1", "mse"]] = None
    method: str = "dopri5"
    rtol: float = 1e-5
    atol: float = 1e-6
    max_steps: PosInt = max_steps_field()
    snapshots: NonNegInt = 4
    eval_every: NonNegInt = 49
    checkpoint_every: PosInt = 49


class CubicField(nn.Module):
    """The ode_demo vector field ``f(t, y) = MLP(y**3)`` (``neuralode.models.MLP``), or a
    plain MLP / bias-free linear layer of ``y`` (``cube=False``, ``hidden=0``)."""

    def __init__(self, hidden: int, layers: int = 1, cube: bool = True):
        super().__init__()
        self.cube = cube
        if hidden == 0:
            self.net = nn.Linear(2, 2, bias=False)
        else:
            self.net = MLP(2, [hidden] * layers, 2, activation=nn.Tanh)
            for m in self.net.modules():  # ode_demo's initialisation
                if isinstance(m, nn.Linear):
                    nn.init.normal_(m.weight, mean=0.0, std=0.1)
                    nn.init.constant_(m.bias, 0.0)

    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.net(y**3 if self.cube else y)


class _TrueField(nn.Module):
    def __init__(self, A: torch.Tensor, cube: bool):
        super().__init__()
        self.A, self.cube = A, cube

    def forward(self, t, y):
        # cubic: the demo's row-vector form y**3 @ A; linear: dz/dt = A z, i.e. z @ A.T
        return y**3 @ self.A if self.cube else y @ self.A.T


class Spiral(Experiment):
    name = "spiral"
    description = "learn 2-D spiral dynamics from a trajectory (ode_demo; linear variants report the matrix)"
    Config = SpiralConfig

    @classmethod
    def resolve(cls, config: SpiralConfig) -> SpiralConfig:
        defaults = _VARIANT_DEFAULTS[config.variant]
        filled = {k: v for k, v in defaults.items() if getattr(config, k) is None}
        if config.t_end is None:
            filled["t_end"] = _SYSTEMS[config.variant][2]
        config = dataclasses.replace(config, **filled)
        if config.batch_time < 2 or config.data_size < config.batch_time + 1:
            raise ConfigError("spiral needs batch_time >= 2 and data_size > batch_time")
        n_windows = config.data_size - config.batch_time
        if not 1 <= config.batch_size <= n_windows:
            raise ConfigError(f"batch_size must be between 1 and data_size - batch_time = {n_windows}")
        if config.epochs < 1 or config.eval_every < 0 or config.checkpoint_every < 1:
            raise ConfigError("epochs and checkpoint_every must be >= 1, eval_every >= 0")
        if config.variant == "linear" and config.hidden != 0:
            raise ConfigError("variant=linear learns a single 2x2 linear layer; leave hidden unset (or 0)")
        return config

    # -- data ---------------------------------------------------------------------
    @property
    def steps_per_epoch(self) -> int:
        return (self.config.data_size - self.config.batch_time) // self.config.batch_size

    @property
    def num_steps(self) -> int:
        return self.config.epochs * self.steps_per_epoch

    def setup(self) -> None:
        c = self.config
        A, y0, _ = _SYSTEMS[c.variant]
        self.A_true = torch.tensor(A)
        self.cube = c.variant == "cubic"
        self.t = torch.linspace(0.0, c.t_end, c.data_size)
        self.y0 = torch.tensor([y0])  # (1, 2)
        with torch.no_grad():
            truth = neuralode.odeint(_TrueField(self.A_true, self.cube), self.y0, self.t, method="dopri5")
        self.y_true = truth.to(self.device)  # (T, 1, 2)
        noise = torch.zeros_like(truth)
        if c.noise_std:
            g = torch.Generator().manual_seed(c.seed)
            noise = c.noise_std * torch.randn(truth.shape, generator=g)
        self.y_obs = (truth + noise).to(self.device)
        self.t, self.y0 = self.t.to(self.device), self.y0.to(self.device)
        self.snapshot_steps = self._snapshot_steps()
        self.snapshots: dict[int, torch.Tensor] = {}

    def _snapshot_steps(self) -> list[int]:
        every = self.config.eval_every
        evals = sorted(set(range(0, self.num_steps, every) if every else []) | {0, self.num_steps})
        k = max(2, self.config.snapshots)
        picks = np.linspace(0, len(evals) - 1, k).round().astype(int)
        return sorted({evals[i] for i in picks})

    def batch(self, position: Position):
        c = self.config
        n_windows = c.data_size - c.batch_time
        order = epoch_permutation(c.seed, position.epoch, n_windows)
        s = torch.as_tensor(order[position.index * c.batch_size:(position.index + 1) * c.batch_size])
        y0 = self.y_obs[s, 0]  # (B, 2)
        ys = torch.stack([self.y_obs[s + i, 0] for i in range(c.batch_time)])  # (T, B, 2)
        return y0, self.t[: c.batch_time], ys

    # -- model --------------------------------------------------------------------
    def build_model(self) -> nn.Module:
        c = self.config
        layers = 2 if c.variant == "linear_hard" else 1
        return CubicField(c.hidden, layers=layers, cube=self.cube).to(self.device)

    def build_optimizer(self, model):
        c = self.config
        if c.optimizer == "rmsprop":
            return torch.optim.RMSprop(model.parameters(), lr=c.lr)
        return torch.optim.Adam(model.parameters(), lr=c.lr)

    def _solve(self, model, y0, t):
        c = self.config
        return neuralode.odeint(model, y0, t, method=c.method, rtol=c.rtol, atol=c.atol,
                                options=solve_cap(c.method, c.max_steps))

    def loss(self, model, batch, position):
        y0, t, ys = batch
        pred = self._solve(model, y0, t)
        err = pred - ys
        loss = err.abs().mean() if self.config.loss == "l1" else (err**2).mean()
        return loss, {}

    # -- evaluation ---------------------------------------------------------------
    def learned_matrix(self, model) -> torch.Tensor | None:
        """The linear variants' estimate of ``A``: the weight of the linear layer, or for
        an MLP the best linear fit ``f(z) ~ A z`` over the states of the true trajectory
        (least squares). The MLP's Jacobian at the origin would be the textbook choice, but
        the data say little about the field there and it drifts far from ``A``."""
        if self.cube:
            return None
        if isinstance(model.net, nn.Linear):
            return model.net.weight.detach().clone()
        z = self.y_true[:, 0]
        with torch.no_grad():
            f = model(torch.tensor(0.0), z)
        return torch.linalg.lstsq(z, f).solution.T  # f = z @ A.T

    def evaluate(self, model, position, run):
        with torch.no_grad():
            pred = self._solve(model, self.y0, self.t)
        out = {"traj_mse": ((pred - self.y_true) ** 2).mean().item()}
        if position.step in self.snapshot_steps:
            self.snapshots[position.step] = pred[:, 0].cpu()
        A = self.learned_matrix(model)
        if A is not None:
            out["matrix_frobenius_error"] = torch.linalg.norm(A.cpu() - self.A_true).item()
        return out

    def finish(self, model, run: RunContext) -> dict:
        with torch.no_grad():
            pred = self._solve(model, self.y0, self.t)[:, 0].cpu()
        y_true = self.y_true[:, 0].cpu()
        metrics = {"traj_mse": ((pred - y_true) ** 2).mean().item(),
                   "final_train_loss": next((r["loss"] for r in reversed(run.history())
                                             if r.get("split") == "train"), float("nan"))}
        A = self.learned_matrix(model)
        if A is not None:
            A = A.cpu()
            metrics["matrix_frobenius_error"] = torch.linalg.norm(A - self.A_true).item()
            metrics["learned_matrix"] = [[round(v, 5) for v in row] for row in A.tolist()]
            metrics["true_matrix"] = _SYSTEMS[self.config.variant][0]
        self._plot_snapshots(run, y_true)
        self._plot_phase(run, model, pred, y_true)
        self._plot_eval(run)
        return metrics

    # -- plots --------------------------------------------------------------------
    def _plot_snapshots(self, run, y_true):
        steps = sorted(self.snapshots)
        if not steps:
            return
        t = self.t.cpu().numpy()
        fig = figure(figsize=(3.2 * len(steps), 5.6))
        axes = fig.subplots(2, len(steps), squeeze=False)
        for j, step in enumerate(steps):
            pred = self.snapshots[step].numpy()
            top, bottom = axes[0, j], axes[1, j]
            top.plot(y_true[:, 0], y_true[:, 1], "g-", lw=1.2, label="true")
            top.plot(pred[:, 0], pred[:, 1], "b--", lw=1.2, label="learned")
            top.set_title(f"step {step}")
            lim = 1.3 * float(np.abs(y_true.numpy()).max())
            top.set_xlim(-lim, lim)
            top.set_ylim(-lim, lim)
            top.set_aspect("equal")
            bottom.set_ylim(-lim, lim)
            for k in (0, 1):
                bottom.plot(t, y_true[:, k], "g-", lw=1)
                bottom.plot(t, pred[:, k], "b--", lw=1)
            bottom.set_xlabel("t")
            if j == 0:
                top.set_ylabel("y2")
                bottom.set_ylabel("y1, y2")
                top.legend(loc="upper right", fontsize=8)
        fig.suptitle("true (green) vs learned (blue) trajectory during training")
        run.save_figure(fig, "trajectories")

    def _plot_phase(self, run, model, pred, y_true):
        lim = float(y_true.abs().max()) * 1.15
        g = torch.linspace(-lim, lim, 21)
        yy, xx = torch.meshgrid(g, g, indexing="ij")
        pts = torch.stack([xx.reshape(-1), yy.reshape(-1)], -1).to(self.device)
        with torch.no_grad():
            learned = model(torch.tensor(0.0), pts).cpu()
            true = _TrueField(self.A_true.to(self.device), self.cube)(0.0, pts).cpu()
        fig = figure(figsize=(10, 4.6))
        axes = fig.subplots(1, 2)
        for ax, field, title in ((axes[0], true, "true vector field"), (axes[1], learned, "learned vector field")):
            u, v = field[:, 0].reshape(21, 21).numpy(), field[:, 1].reshape(21, 21).numpy()
            # arrows of equal length show the direction; their shade, the speed (a
            # streamplot looks nicer but costs seconds per figure)
            speed = np.hypot(u, v)
            norm = np.where(speed > 0, speed, 1.0)
            ax.quiver(g.numpy(), g.numpy(), u / norm, v / norm, np.log1p(speed), cmap="Greys",
                      clim=(-0.5 * np.log1p(speed).max(), np.log1p(speed).max()), pivot="mid",
                      angles="xy", scale=30, width=0.004)
            ax.plot(y_true[:, 0], y_true[:, 1], "g-", lw=1.3, label="true trajectory")
            ax.plot(pred[:, 0], pred[:, 1], "b--", lw=1.3, label="learned trajectory")
            ax.set_xlim(-lim, lim)
            ax.set_ylim(-lim, lim)
            ax.set_aspect("equal")
            ax.set_title(title)
            ax.set_xlabel("y1")
        axes[0].set_ylabel("y2")
        axes[1].legend(loc="lower right", fontsize=8)
        run.save_figure(fig, "phase_portrait")

    def _plot_eval(self, run):
        records = [r for r in run.history() if r.get("split") == "eval"]
        if not records:
            return
        keys = [k for k in ("traj_mse", "matrix_frobenius_error") if k in records[0]]
        fig = figure(figsize=(5 * len(keys), 3.5))
        axes = fig.subplots(1, len(keys), squeeze=False)[0]
        for ax, key in zip(axes, keys):
            ax.semilogy([r["step"] for r in records], [r[key] for r in records], "o-", ms=3)
            ax.set_xlabel("step")
            ax.set_ylabel(key.replace("_", " "))
            ax.grid(alpha=0.3)
        run.save_figure(fig, "evaluation")

    def state_dict(self) -> dict:
        return {"snapshots": dict(self.snapshots)}

    def load_state_dict(self, state: dict) -> None:
        self.snapshots = dict(state["snapshots"])
