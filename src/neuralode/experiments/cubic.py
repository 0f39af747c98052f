"""``cubic``: ResNet vs ODE-Net regression of ``h(x) = x**3 + 0.1 x`` (the seed's first study).

Data: 10 evenly spaced points in ``[-2.5, 2.5]`` with ``N(0, 1)`` noise on ``h``. Models:

* ResNet (``neuralode.models.ResNet``): ``Linear(1, 20)``, 3 residual blocks
  ``h + tanh(W h + b)``, ``Linear(20, 1)``; full-batch gradient descent, step 0.01, 1000
  iterations;
* ODE-Net (``neuralode.models.ODENet``), the continuous version: ``Linear(1, 20)`` lifts the
  input, an ODE block ``dh/dt = tanh(W h + b)`` on ``[0, 1]`` (adaptive dopri5), then
  ``Linear(20, 1)``; gradient descent, step 0.005, 1500 iterations.

Scored by the out-of-sample MSE against ``h`` on a dense grid of ``[-2.5, 2.5]`` (the seed
reports 4.673 for the ResNet and 7.72 for the ODE-Net). Also trained: both models on 5
random training sets of 20 points in ``[-3, 3]`` (the spread of the fitted curves), and
step-size sweeps (ResNet 0.001, 0.01, 0.1; ODE-Net 0.0005, 0.001, 0.005; the seed saw an
overflow from 0.01). A model whose loss becomes non-finite or explodes, or whose solve
fails, is stopped and reported as diverged; the others carry on.

All these models are trained together by the one training loop: every step is one
gradient-descent iteration of every model still training. Their parameters are disjoint and
each has its own parameter group (its own step size), so summing their losses gives each
model exactly the update it would get alone.
"""

from __future__ import annotations

import dataclasses
import math
import zlib
from typing import Annotated, Literal

import torch
from torch import nn

from neuralode.models import ODENet, ResNet
from neuralode.nn import Autonomous

from .base import Experiment, Reference
from .config import ConfigError, NonNegFloat, NonNegInt, PosFloat, PosInt, Range, RunConfig, max_steps_field, solve_cap
from .runner import RunContext, figure

__all__ = ["Cubic", "CubicConfig"]


def target(x: torch.Tensor) -> torch.Tensor:
    return x**3 + 0.1 * x


@dataclasses.dataclass
class CubicConfig(RunConfig):
    """Configuration of ``cubic``.

    Attributes
    ----------
    n_train, x_max, noise_std : the main training set (``n_train`` evenly spaced points in
        ``[-x_max, x_max]``, Gaussian noise of ``noise_std`` on the targets).
    hidden : width of both models.
    resnet_layers : residual blocks of the ResNet.
    resnet_lr, resnet_iters, odenet_lr, odenet_iters : gradient-descent step and iterations.
    method, rtol, atol, gradient : the ODE block's solve.
    max_steps : the most steps one adaptive solve of the block may take (a diverging model stops with an
        error, instead of taking the solver's 100,000 steps).
    spread_sets, spread_n, spread_x_max : the random training sets for the spread figure
        (0 sets: skip).
    resnet_sweep, odenet_sweep : extra step sizes trained on the main set (empty: skip).
    diverge_loss : a loss above this (or non-finite) stops that model as diverged.
    grid_points : points of the dense evaluation grid.
    """

    n_train: Annotated[int, Range(2)] = 10
    x_max: PosFloat = 2.5
    noise_std: NonNegFloat = 1.0
    hidden: PosInt = 20
    resnet_layers: PosInt = 3
    resnet_lr: float = 0.01
    resnet_iters: PosInt = 1000
    odenet_lr: float = 0.005
    odenet_iters: PosInt = 1500
    method: str = "dopri5"
    rtol: float = 1e-3
    atol: float = 1e-4
    gradient: Literal["direct", "adjoint", "checkpoint"] = "direct"
    max_steps: PosInt = max_steps_field()
    spread_sets: NonNegInt = 5
    spread_n: Annotated[int, Range(2)] = 20
    spread_x_max: PosFloat = 3.0
    resnet_sweep: tuple[PosFloat, ...] = (0.001, 0.01, 0.1)
    odenet_sweep: tuple[PosFloat, ...] = (0.0005, 0.001, 0.005)
    diverge_loss: PosFloat = 1e6
    grid_points: Annotated[int, Range(2)] = 200
    log_every: PosInt = 10
    checkpoint_every: PosInt = 250


def resnet(hidden: int, layers: int) -> ResNet:
    """``Linear(1, H)``, ``layers`` blocks ``h + tanh(W h + b)`` (Euler steps of size 1), ``Linear(H, 1)``."""
    stem = nn.Linear(1, hidden)  # built in input-to-output order: the seed draws the same weights
    blocks = [nn.Sequential(nn.Linear(hidden, hidden), nn.Tanh()) for _ in range(layers)]
    return ResNet(stem, blocks, nn.Linear(hidden, 1))


def odenet(hidden: int, *, method: str, rtol: float, atol: float, gradient: str, max_steps: int = 2000) -> ODENet:
    """``Linear(1, H)``, an ODE block ``dh/dt = tanh(W h + b)`` on ``[0, 1]``, ``Linear(H, 1)``."""
    stem = nn.Linear(1, hidden)
    field = Autonomous(nn.Sequential(nn.Linear(hidden, hidden), nn.Tanh()))
    return ODENet(stem, field, nn.Linear(hidden, 1), t=(0.0, 1.0), method=method,
                  rtol=rtol, atol=atol, gradient=gradient, options=solve_cap(method, max_steps) or None)


@dataclasses.dataclass(frozen=True)
class _Member:
    """One model trained in this experiment: its kind, step size, data set and length."""

    name: str
    kind: str  # "resnet" | "odenet"
    lr: float
    data: str  # "main" | "set0" ...
    iters: int

    @property
    def key(self) -> str:
        """The name as a module key ('.' is not allowed there)."""
        return self.name.replace(".", "p")


class Cubic(Experiment):
    name = "cubic"
    description = "ResNet vs ODE-Net regression of x^3 + 0.1x from 10 noisy points (seed MSEs 4.673 / 7.72)"
    Config = CubicConfig
    references = {
        "resnet_mse": Reference(4.673, "ResNet out-of-sample MSE on a dense grid"),
        "odenet_mse": Reference(7.72, "ODE-Net out-of-sample MSE on a dense grid"),
    }

    @classmethod
    def resolve(cls, config: CubicConfig) -> CubicConfig:
        c = config
        if c.n_train < 2 or c.spread_n < 2 or c.grid_points < 2:
            raise ConfigError("n_train, spread_n and grid_points must be >= 2")
        if min(c.resnet_iters, c.odenet_iters, c.hidden, c.resnet_layers) < 1:
            raise ConfigError("resnet_iters, odenet_iters, hidden and resnet_layers must be >= 1")
        if min((c.resnet_lr, c.odenet_lr, *c.resnet_sweep, *c.odenet_sweep)) <= 0:
            raise ConfigError("step sizes (resnet_lr, odenet_lr, *_sweep) must be > 0")
        if c.checkpoint_every < 1 or c.log_every < 1 or c.spread_sets < 0:
            raise ConfigError("checkpoint_every and log_every must be >= 1, spread_sets >= 0")
        return c

    # -- members and data ---------------------------------------------------------
    def _members(self) -> list[_Member]:
        c = self.config
        out = []
        for kind, lr, sweep, iters in (("resnet", c.resnet_lr, c.resnet_sweep, c.resnet_iters),
                                       ("odenet", c.odenet_lr, c.odenet_sweep, c.odenet_iters)):
            for step_size in sorted({lr, *sweep}):
                out.append(_Member(f"{kind}_lr{step_size:g}", kind, step_size, "main", iters))
            for i in range(c.spread_sets):
                out.append(_Member(f"{kind}_set{i}", kind, lr, f"set{i}", iters))
        return out

    @property
    def num_steps(self) -> int:
        return max(self.config.resnet_iters, self.config.odenet_iters)

    def setup(self) -> None:
        c = self.config
        g = torch.Generator().manual_seed(c.seed)
        x = torch.linspace(-c.x_max, c.x_max, c.n_train).unsqueeze(1)
        self.data = {"main": (x, target(x) + c.noise_std * torch.randn(x.shape, generator=g))}
        for i in range(c.spread_sets):
            x = (torch.rand(c.spread_n, 1, generator=g) * 2 - 1) * c.spread_x_max
            self.data[f"set{i}"] = (x, target(x) + c.noise_std * torch.randn(x.shape, generator=g))
        self.data = {k: (x.to(self.device), y.to(self.device)) for k, (x, y) in self.data.items()}
        self.members = self._members()
        # name -> [step, reason] for models stopped because they diverged
        self.diverged: dict[str, list] = {}

    def build_model(self) -> nn.Module:
        c = self.config
        models = nn.ModuleDict()
        for m in self.members:
            # The initial weights depend on (seed, kind, data set) only: every step size of a
            # sweep starts from the same point, and adding or removing models leaves the
            # others unchanged.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(c.seed * 1_000_003 + zlib.crc32(f"{m.kind}/{m.data}".encode()))
                if m.kind == "resnet":
                    models[m.key] = resnet(c.hidden, c.resnet_layers)
                else:
                    models[m.key] = odenet(c.hidden, method=c.method, rtol=c.rtol, atol=c.atol, max_steps=c.max_steps,
                                           gradient=c.gradient)
        return models.to(self.device)

    def build_optimizer(self, model):
        # One parameter group per model: plain gradient descent with its own step size.
        groups = [{"params": list(model[m.key].parameters()), "lr": m.lr} for m in self.members]
        return torch.optim.SGD(groups)

    # -- training -----------------------------------------------------------------
    def loss(self, model, batch, position):
        total = torch.zeros((), device=self.device)
        logs = {}
        for m in self.members:
            if position.step >= m.iters or m.name in self.diverged:
                continue
            x, y = self.data[m.data]
            try:
                loss = ((model[m.key](x) - y) ** 2).mean()
            except (RuntimeError, ArithmeticError) as exc:  # e.g. the solve failed on huge weights
                self.diverged[m.name] = [position.step, f"solve failed: {exc}".split("\n")[0][:200]]
                continue
            value = loss.item()
            if not math.isfinite(value) or value > self.config.diverge_loss:
                self.diverged[m.name] = [position.step, f"loss {value:.3g} at step {position.step}"]
                continue
            logs[f"loss/{m.name}"] = value
            total = total + loss
        return total, logs

    # -- results ------------------------------------------------------------------
    def _grid(self, x_max: float) -> torch.Tensor:
        return torch.linspace(-x_max, x_max, self.config.grid_points, device=self.device).unsqueeze(1)

    def _predict(self, model, name: str, x: torch.Tensor) -> torch.Tensor | None:
        if name in self.diverged:
            return None
        with torch.no_grad():
            try:
                pred = model[name.replace(".", "p")](x)
            except (RuntimeError, ArithmeticError):
                return None
        return pred if torch.isfinite(pred).all() else None

    def _mse(self, model, name: str, x: torch.Tensor) -> float:
        pred = self._predict(model, name, x)
        return float("nan") if pred is None else ((pred - target(x)) ** 2).mean().item()

    def finish(self, model, run: RunContext) -> dict:
        c = self.config
        grid = self._grid(c.x_max)
        main = {"resnet": f"resnet_lr{c.resnet_lr:g}", "odenet": f"odenet_lr{c.odenet_lr:g}"}
        metrics: dict = {}
        for kind, name in main.items():
            metrics[f"{kind}_mse"] = self._mse(model, name, grid)
            x, y = self.data["main"]
            pred = self._predict(model, name, x)
            metrics[f"{kind}_train_mse"] = float("nan") if pred is None else ((pred - y) ** 2).mean().item()
        for kind in ("resnet", "odenet"):
            spread = [self._mse(model, f"{kind}_set{i}", self._grid(c.spread_x_max)) for i in range(c.spread_sets)]
            finite = [v for v in spread if math.isfinite(v)]
            if spread:
                metrics[f"{kind}_spread_mse_mean"] = sum(finite) / len(finite) if finite else float("nan")
                metrics[f"{kind}_spread_mse_std"] = _std(finite)
        for m in self.members:
            if m.data == "main":
                metrics[f"{m.name}_mse"] = self._mse(model, m.name, grid)
        metrics["diverged"] = {k: v[1] for k, v in sorted(self.diverged.items())} or "none"
        self._plot_fits(run, model, main, metrics)
        if c.spread_sets:
            self._plot_spread(run, model)
        self._plot_sweep(run)
        return metrics

    def _plot_fits(self, run, model, main, metrics):
        c = self.config
        x_plot = self._grid(c.x_max * 1.1)
        fig = figure(figsize=(6.5, 4.5))
        ax = fig.subplots()
        xs = x_plot.cpu()[:, 0]
        ax.plot(xs, target(xs), "k-", lw=1.5, label="h(x) = x³ + 0.1x")
        x, y = self.data["main"]
        ax.plot(x.cpu()[:, 0], y.cpu()[:, 0], "ko", ms=5, mfc="none", label="training data")
        for (kind, name), color in zip(main.items(), ("tab:blue", "tab:red")):
            pred = self._predict(model, name, x_plot)
            label = {"resnet": "ResNet", "odenet": "ODE-Net"}[kind]
            ref = self.references[f"{kind}_mse"].value
            if pred is None:
                ax.plot([], [], color=color, label=f"{label}: diverged")
                continue
            ax.plot(xs, pred.cpu()[:, 0], color=color, lw=1.5,
                    label=f"{label}: MSE {metrics[f'{kind}_mse']:.3g} (seed {ref})")
        ax.set_xlabel("x")
        ax.set_ylabel("y")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        ax.set_title("fits on the training data")
        run.save_figure(fig, "fits")

    def _plot_spread(self, run, model):
        c = self.config
        x_plot = self._grid(c.spread_x_max)
        xs = x_plot.cpu()[:, 0]
        fig = figure(figsize=(11, 4.2))
        axes = fig.subplots(1, 2, sharey=True)
        for ax, kind, label in zip(axes, ("resnet", "odenet"), ("ResNet", "ODE-Net")):
            ax.plot(xs, target(xs), "k-", lw=2, label="h(x)")
            for i in range(c.spread_sets):
                color = f"C{i}"
                x, y = self.data[f"set{i}"]
                ax.plot(x.cpu()[:, 0], y.cpu()[:, 0], "o", color=color, ms=3, alpha=0.6)
                pred = self._predict(model, f"{kind}_set{i}", x_plot)
                if pred is not None:
                    ax.plot(xs, pred.cpu()[:, 0], color=color, lw=1.2)
            ax.set_title(f"{label}: {c.spread_sets} random training sets of {c.spread_n} points")
            ax.set_xlabel("x")
            ax.grid(alpha=0.3)
        axes[0].set_ylabel("y")
        run.save_figure(fig, "spread")

    def _plot_sweep(self, run):
        history = [r for r in run.history() if r.get("split") == "train"]
        fig = figure(figsize=(11, 4.2))
        axes = fig.subplots(1, 2)
        for ax, kind, label in zip(axes, ("resnet", "odenet"), ("ResNet", "ODE-Net")):
            for m in (m for m in self.members if m.kind == kind and m.data == "main"):
                key = f"loss/{m.name}"
                pts = [(r["step"], r[key]) for r in history if key in r]
                tag = f"step {m.lr:g}"
                if m.name in self.diverged:
                    tag += f" (diverged at step {self.diverged[m.name][0]})"
                if pts:
                    ax.plot(*zip(*pts), lw=1.3, label=tag)
                else:
                    ax.plot([], [], label=tag)
            ax.set_yscale("log")
            ax.set_title(f"{label}: step-size sweep")
            ax.set_xlabel("iteration")
            ax.set_ylabel("training MSE")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        run.save_figure(fig, "sweep")

    def state_dict(self) -> dict:
        return {"diverged": dict(self.diverged)}

    def load_state_dict(self, state: dict) -> None:
        self.diverged = {k: list(v) for k, v in state["diverged"].items()}


def _std(values: list[float]) -> float:
    if len(values) < 2:
        return float("nan")
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
