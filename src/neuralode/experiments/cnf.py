"""``cnf``: maximum-likelihood density estimation on 2-D toy densities, CNF vs planar flow.

Densities (sampled in numpy, seeded; :func:`sample_density`): ``moons`` (two moons),
``circles`` (two concentric circles), ``gaussians`` (eight Gaussians on a circle) and
``checkerboard``. All are scaled to roughly ``[-4, 4]^2``.

Models, each trained by maximum likelihood (minimise the mean ``-log p(x)`` of fresh samples):

* ``cnf_M{M}``: the continuous normalising flow of Chen et al. (2018), Section 4, with the
  planar dynamics ``dz/dt = sum_m u_m(t) tanh(w_m(t)^T z + b_m(t))`` of width ``M``
  (:class:`neuralode.models.PlanarCNFDynamics`), or FFJORD's ConcatSquash MLP with
  ``dynamics=concatsquash``; exact trace, ``log p(x)`` by one solve from data to base.
* ``planar_K{K}``: the discrete planar flow of depth ``K`` (Rezende and Mohamed 2015,
  :class:`neuralode.models.PlanarFlow`). The flow has no closed-form inverse, so for density
  estimation we run it in the *normalising* direction, data ``x`` -> base ``z``:
  ``log p(x) = log N(f(x); 0, I) + log|det df/dx|``, which needs only the forward pass.
  Samples for the pictures come from the numerical inverse (:func:`planar_inverse`: each layer
  is inverted by bisection on the scalar ``w^T z``, which is monotone because ``w^T u_hat > -1``).

  Chen et al. compare the two by fitting *known* target energies with reverse KL (their
  Figure 4, ``M, K in {2, 8, 32}``); with samples only, as here, the maximum-likelihood
  direction is the natural one for both models.

The paper's widths and depths are ``2, 8, 32``; the CPU default is ``M = K = 8`` on one density
for a few hundred iterations (``--set densities=moons,circles,gaussians,checkerboard
widths=2,8,32 depths=2,8,32`` for the full grid). All models are trained together by the one
loop: each step is one Adam step of every model on its density's batch (parameters are
disjoint, so summing the losses gives each model the update it would get alone).

Metrics: test NLL per model (nats, on ``n_test`` held-out samples), the mean NFE of a CNF
training solve and wall time. Plots: ``densities.png`` (data and every model's density heat
map), ``samples.png`` (samples of every model), ``flow.png`` (samples of each density's first CNF transported from the base at ``t0`` to
the data at ``t1``), ``nll.png`` (the NLL table) and, where Pillow is installed, ``flow.gif``.
"""

from __future__ import annotations

import dataclasses
import math
import time
import zlib
from typing import Annotated, ClassVar, Literal

import numpy as np
import torch
from torch import nn

import neuralode
from neuralode.models import (
    CNF,
    ConcatSquashMLP,
    PlanarCNFDynamics,
    PlanarFlow,
    count_parameters,
)
from neuralode.models.cnf import standard_normal_log_prob

from .base import Experiment, Position, Reference
from .config import NON_EMPTY, ConfigError, PosFloat, PosInt, Range, RunConfig, max_steps_field, solve_cap
from .runner import RunContext, figure

__all__ = ["DENSITIES", "CNFConfig", "CNFExperiment", "planar_inverse", "sample_density"]

DENSITIES = ("moons", "circles", "gaussians", "checkerboard")


# --------------------------------------------------------------------------- data
def sample_density(name: str, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` samples of the 2-D toy density ``name``, float32 ``(n, 2)``, drawn with ``rng``.

    The constructions follow FFJORD's ``lib/toy_data.py`` (moons, circles, 8 Gaussians,
    checkerboard), written with numpy only so that the samples depend on the generator alone.
    """
    if name == "moons":
        half = n // 2
        a = rng.uniform(0.0, math.pi, n)
        x = np.where(np.arange(n) < half, np.cos(a), 1.0 - np.cos(a))
        y = np.where(np.arange(n) < half, np.sin(a), 0.5 - np.sin(a))
        pts = np.stack([x, y], 1) + 0.1 * rng.standard_normal((n, 2))
        pts = (pts - np.array([0.5, 0.25])) * 2.0
    elif name == "circles":
        radius = np.where(np.arange(n) < n // 2, 1.0, 0.5)
        a = rng.uniform(0.0, 2 * math.pi, n)
        pts = np.stack([radius * np.cos(a), radius * np.sin(a)], 1) + 0.08 * rng.standard_normal((n, 2))
        pts = pts * 3.0
    elif name == "gaussians":
        centres = np.array([(math.cos(k * math.pi / 4), math.sin(k * math.pi / 4)) for k in range(8)]) * 2.0
        idx = rng.integers(0, 8, n)
        pts = (centres[idx] + 0.5 * 0.5 * rng.standard_normal((n, 2))) * 1.414
    elif name == "checkerboard":
        x1 = rng.uniform(0.0, 1.0, n) * 4 - 2
        x2 = rng.uniform(0.0, 1.0, n) - rng.integers(0, 2, n) * 2.0
        x2 = x2 + np.floor(x1) % 2
        pts = np.stack([x1, x2], 1) * 2.0
    else:
        raise ValueError(f"unknown density {name!r}; choose one of {', '.join(DENSITIES)}")
    return pts.astype(np.float32)


def _rng(seed: int, *tags: str | int) -> np.random.Generator:
    words = [seed] + [zlib.crc32(t.encode()) if isinstance(t, str) else int(t) for t in tags]
    return np.random.default_rng(words)


# --------------------------------------------------------------------------- planar flow as a density
def planar_log_prob(flow: PlanarFlow, x: torch.Tensor) -> torch.Tensor:
    """``log p(x)`` of the planar flow run from data to base: ``log N(f(x)) + log|det df/dx|``."""
    z, log_det = flow(x)
    return standard_normal_log_prob(z) + log_det


@torch.no_grad()
def planar_inverse(flow: PlanarFlow, z: torch.Tensor, iters: int = 60) -> torch.Tensor:
    """``f^{-1}(z)`` of a :class:`PlanarFlow`, layer by layer from the last.

    Layer ``k`` is ``y = x + u tanh(w^T x + b)``; with ``a = w^T x`` it reads
    ``w^T y = a + (w^T u) tanh(a + b)``, strictly increasing in ``a`` because ``w^T u > -1``,
    and ``|a - w^T y| <= |w^T u|``. Bisection on that bracket finds ``a``; then
    ``x = y - u tanh(a + b)``.
    """
    u_hat = flow.u_hat().to(z.dtype)
    w, b = flow.w.to(z.dtype), flow.b.to(z.dtype)
    y = z
    for k in reversed(range(flow.depth)):
        wu = (w[k] * u_hat[k]).sum()
        target = y @ w[k]
        lo, hi = target - wu.abs() - 1e-6, target + wu.abs() + 1e-6
        for _ in range(iters):
            mid = 0.5 * (lo + hi)
            above = mid + wu * torch.tanh(mid + b[k]) > target
            hi, lo = torch.where(above, mid, hi), torch.where(above, lo, mid)
        a = 0.5 * (lo + hi)
        y = y - torch.tanh(a + b[k])[:, None] * u_hat[k]
    return y


# --------------------------------------------------------------------------- config
@dataclasses.dataclass
class CNFConfig(RunConfig):
    """Configuration of ``cnf``.

    Attributes
    ----------
    densities : tuple of {"moons", "circles", "gaussians", "checkerboard"}
    widths : CNF widths ``M`` (planar units of the dynamics); empty: no CNF.
    depths : planar-flow depths ``K``; empty: no planar flow.
    dynamics : {"planar", "concatsquash"}
        CNF dynamics: Chen et al.'s planar hypernetwork, or FFJORD's ConcatSquash MLP with
        two hidden layers of ``M`` units.
    hyper_hidden : hidden width of the planar dynamics' hypernetwork.
    iters, batch_size, lr : Adam steps, samples per step (fresh each step), step size.
    t1 : the data time (base at 0).
    method, rtol, atol, gradient : the CNF solves (training and evaluation).
    max_steps : the most steps one adaptive CNF solve may take (a diverging model stops with an error).
    n_test : held-out samples for the test NLL.
    grid_points, extent : heat-map grid (``grid_points^2`` points on ``[-extent, extent]^2``).
    n_samples, frames : samples and time frames of the flow pictures.
    gif : also write ``plots/flow.gif`` (needs Pillow; skipped with a note otherwise).
    """

    densities: Annotated[tuple[str, ...], NON_EMPTY] = ("moons",)
    widths: tuple[PosInt, ...] = (8,)
    depths: tuple[PosInt, ...] = (8,)
    dynamics: Literal["planar", "concatsquash"] = "planar"
    hyper_hidden: PosInt = 32
    iters: PosInt = 300
    batch_size: PosInt = 256
    lr: float = 5e-3
    t1: PosFloat = 1.0
    method: str = "dopri5"
    rtol: PosFloat = 1e-3
    atol: PosFloat = 1e-3
    gradient: Literal["direct", "adjoint", "checkpoint"] = "direct"
    max_steps: PosInt = max_steps_field()
    n_test: PosInt = 2000
    grid_points: Annotated[int, Range(2)] = 60
    extent: PosFloat = 4.0
    n_samples: PosInt = 1000
    frames: Annotated[int, Range(2)] = 6
    gif: bool = True
    log_every: PosInt = 10
    checkpoint_every: PosInt = 100


@dataclasses.dataclass(frozen=True)
class _Member:
    kind: str  # "cnf" | "planar"
    size: int
    density: str

    @property
    def name(self) -> str:
        return f"{self.kind}_{'M' if self.kind == 'cnf' else 'K'}{self.size}_{self.density}"


class CNFExperiment(Experiment):
    name = "cnf"
    description = "2-D densities by maximum likelihood: CNF (width M) vs planar flow (depth K); test NLL"
    Config = CNFConfig
    references: ClassVar[dict[str, Reference]] = {}

    @classmethod
    def resolve(cls, config: CNFConfig) -> CNFConfig:
        c = config
        bad = [d for d in c.densities if d not in DENSITIES]
        if bad or not c.densities:
            raise ConfigError(f"densities must be a non-empty list of {', '.join(DENSITIES)}; got {list(c.densities)}")
        if not c.widths and not c.depths:
            raise ConfigError("give at least one CNF width (widths=8) or planar depth (depths=8)")
        if min((*c.widths, *c.depths, c.iters, c.batch_size, c.n_test, c.hyper_hidden)) < 1:
            raise ConfigError("widths, depths, iters, batch_size, n_test and hyper_hidden must be >= 1")
        if c.grid_points < 2 or c.frames < 2 or c.n_samples < 1 or c.t1 <= 0 or c.lr <= 0:
            raise ConfigError("grid_points and frames must be >= 2, n_samples >= 1, t1 and lr > 0")
        return c

    def _members(self) -> list[_Member]:
        c = self.config
        return ([_Member("cnf", m, d) for d in c.densities for m in c.widths]
                + [_Member("planar", k, d) for d in c.densities for k in c.depths])

    @property
    def num_steps(self) -> int:
        return self.config.iters

    def setup(self) -> None:
        c = self.config
        self.members = self._members()
        self.test = {d: torch.from_numpy(sample_density(d, c.n_test, _rng(c.seed, "test", d))).to(self.device)
                     for d in c.densities}
        # Training time and NFE per model, summed over steps (restored on resume).
        self.totals: dict[str, list[float]] = {m.name: [0.0, 0.0, 0.0] for m in self.members}  # s, nfe, nfe_bwd

    def _cnf(self, width: int) -> CNF:
        c = self.config
        if c.dynamics == "planar":
            dyn = PlanarCNFDynamics(2, width=width, hidden=c.hyper_hidden)
        else:
            dyn = ConcatSquashMLP(2, (width, width), activation="tanh")
        return CNF(dyn, 2, t0=0.0, t1=c.t1, trace="exact", method=c.method, rtol=c.rtol, atol=c.atol,
                   gradient=c.gradient, options=solve_cap(c.method, c.max_steps) or None)

    def build_model(self) -> nn.Module:
        c = self.config
        models = nn.ModuleDict()
        for m in self.members:
            # Initial weights depend on (seed, member) only: adding models leaves the others unchanged.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(c.seed * 1_000_003 + zlib.crc32(m.name.encode()))
                models[m.name] = self._cnf(m.size) if m.kind == "cnf" else PlanarFlow(2, m.size)
        return models.to(self.device)

    def build_optimizer(self, model):
        return torch.optim.Adam(model.parameters(), lr=self.config.lr)

    def batch(self, position: Position):
        # A pure function of (seed, step, density): resuming anywhere gives the same batches.
        c = self.config
        return {d: torch.from_numpy(sample_density(d, c.batch_size, _rng(c.seed, "train", position.step, d)))
                .to(self.device) for d in c.densities}

    def _log_prob(self, model, m: _Member, x: torch.Tensor) -> torch.Tensor:
        net = model[m.name]
        return net.log_prob(x) if m.kind == "cnf" else planar_log_prob(net, x)

    def loss(self, model, batch, position):
        total = torch.zeros((), device=self.device)
        logs = {}
        for m in self.members:
            t0 = time.perf_counter()
            nll = -self._log_prob(model, m, batch[m.density]).mean()
            tot = self.totals[m.name]
            tot[0] += time.perf_counter() - t0
            logs[f"nll/{m.name}"] = nll.item()
            if m.kind == "cnf":
                nfe = model[m.name].last_stats.get("nfe", 0)
                tot[1] += nfe
                logs[f"nfe/{m.name}"] = nfe
            total = total + nll
        return total, logs

    @torch.no_grad()
    def evaluate(self, model, position, run):
        return {f"test_nll/{m.name}": -self._log_prob(model, m, self.test[m.density]).mean().item()
                for m in self.members}

    # -- results ------------------------------------------------------------------
    def finish(self, model, run: RunContext) -> dict:
        c = self.config
        metrics: dict = {}
        with torch.no_grad():
            for m in self.members:
                metrics[f"test_nll/{m.name}"] = -self._log_prob(model, m, self.test[m.density]).mean().item()
                metrics[f"params/{m.name}"] = count_parameters(model[m.name])
                metrics[f"train_s_per_iter/{m.name}"] = self.totals[m.name][0] / max(1, c.iters)
                if m.kind == "cnf":
                    metrics[f"nfe_per_iter/{m.name}"] = self.totals[m.name][1] / max(1, c.iters)
        self._plot_densities(run, model)
        self._plot_flow(run, model)
        self._plot_samples(run, model)
        self._plot_table(run, metrics)
        return metrics

    def _grid(self):
        c = self.config
        s = torch.linspace(-c.extent, c.extent, c.grid_points, device=self.device)
        xx, yy = torch.meshgrid(s, s, indexing="xy")
        return torch.stack([xx.reshape(-1), yy.reshape(-1)], 1)

    def _plot_densities(self, run, model):
        c = self.config
        grid = self._grid()
        cols = 1 + len(c.widths) + len(c.depths)
        rows = len(c.densities)
        fig = figure(figsize=(2.4 * cols, 2.4 * rows))
        axes = np.asarray(fig.subplots(rows, cols, squeeze=False))
        ext = [-c.extent, c.extent, -c.extent, c.extent]
        for r, d in enumerate(c.densities):
            data = self.test[d].cpu().numpy()
            axes[r, 0].hist2d(data[:, 0], data[:, 1], bins=c.grid_points, range=[ext[:2], ext[2:]], cmap="viridis")
            axes[r, 0].set_title(f"{d}: data", fontsize=8)
            row_members = [m for m in self.members if m.density == d]
            for j, m in enumerate(row_members, start=1):
                with torch.no_grad():
                    logp = self._log_prob(model, m, grid)
                dens = logp.exp().reshape(c.grid_points, c.grid_points).cpu().numpy()
                axes[r, j].imshow(np.nan_to_num(dens), origin="lower", extent=ext, cmap="viridis")
                axes[r, j].set_title(m.name.rsplit("_", 1)[0], fontsize=8)
        for ax in axes.flat:
            ax.set_xticks([])
            ax.set_yticks([])
        run.save_figure(fig, "densities")

    def _flow_frames(self, model) -> tuple[list[float], dict[str, np.ndarray]]:
        """Samples of each density's first CNF at ``frames`` times from base to data."""
        c = self.config
        times = np.linspace(0.0, c.t1, c.frames).tolist()
        z = torch.from_numpy(_rng(c.seed, "flow").standard_normal((c.n_samples, 2)).astype(np.float32)).to(self.device)
        paths = {}
        for d in c.densities:
            cnfs = [m for m in self.members if m.kind == "cnf" and m.density == d]
            if not cnfs:
                continue
            cnf = model[cnfs[0].name]
            t = torch.tensor(times, dtype=torch.float64, device=self.device)
            with torch.no_grad():
                sol = neuralode.solve(cnf.dynamics, z, t, method=c.method, rtol=c.rtol, atol=c.atol,
                                      options=solve_cap(c.method, c.max_steps))
            paths[cnfs[0].name] = sol.ys.cpu().numpy()  # (frames, N, 2)
        return times, paths

    def _plot_flow(self, run, model):
        c = self.config
        times, paths = self._flow_frames(model)
        if not paths:
            return
        fig = figure(figsize=(2.2 * c.frames, 2.3 * len(paths)))
        axes = np.asarray(fig.subplots(len(paths), c.frames, squeeze=False))
        for r, (name, ys) in enumerate(paths.items()):
            for k, t in enumerate(times):
                ax = axes[r, k]
                ax.scatter(ys[k, :, 0], ys[k, :, 1], s=1, c=ys[0, :, 0], cmap="coolwarm", alpha=0.7)
                ax.set_xlim(-c.extent, c.extent)
                ax.set_ylim(-c.extent, c.extent)
                ax.set_xticks([])
                ax.set_yticks([])
                ax.set_title(f"{name}  t={t:.2f}" if k == 0 else f"t={t:.2f}", fontsize=8)
        run.save_figure(fig, "flow")
        if c.gif and run.is_main:
            self._write_gif(run, times, paths)

    def _write_gif(self, run, times, paths):
        try:
            import PIL  # noqa: F401
            from matplotlib.animation import PillowWriter
            from matplotlib.backends.backend_agg import FigureCanvasAgg
        except ImportError:
            print("cnf: Pillow is not installed, so plots/flow.gif is skipped (pip install pillow)")
            return
        c = self.config
        fig = figure(figsize=(2.6 * len(paths), 2.8))
        FigureCanvasAgg(fig)
        axes = np.atleast_1d(fig.subplots(1, len(paths)))
        out = run.path("plots", "flow.gif")
        out.parent.mkdir(parents=True, exist_ok=True)
        # Interpolate linearly between the solved frames for a smoother animation.
        steps = 4 * (len(times) - 1) + 1
        writer = PillowWriter(fps=8)
        with writer.saving(fig, str(out), dpi=80):
            for s in range(steps):
                pos = s / 4
                k, frac = min(int(pos), len(times) - 2), pos - min(int(pos), len(times) - 2)
                for ax, (name, ys) in zip(axes, paths.items()):
                    ax.clear()
                    pts = (1 - frac) * ys[k] + frac * ys[k + 1]
                    ax.scatter(pts[:, 0], pts[:, 1], s=1, c=ys[0, :, 0], cmap="coolwarm", alpha=0.7)
                    ax.set_xlim(-c.extent, c.extent)
                    ax.set_ylim(-c.extent, c.extent)
                    ax.set_xticks([])
                    ax.set_yticks([])
                    ax.set_title(f"{name} t={(1 - frac) * times[k] + frac * times[k + 1]:.2f}", fontsize=7)
                writer.grab_frame()

    @torch.no_grad()
    def _plot_samples(self, run, model):
        """Samples of every model: CNFs solve base -> data; planar flows invert numerically."""
        c = self.config
        z = torch.from_numpy(_rng(c.seed, "samples").standard_normal((c.n_samples, 2)).astype(np.float32)).to(self.device)
        cols = 1 + len(c.widths) + len(c.depths)
        fig = figure(figsize=(2.4 * cols, 2.4 * len(c.densities)))
        axes = np.asarray(fig.subplots(len(c.densities), cols, squeeze=False))
        for r, d in enumerate(c.densities):
            data = self.test[d][:c.n_samples].cpu().numpy()
            axes[r, 0].scatter(data[:, 0], data[:, 1], s=1, color="k")
            axes[r, 0].set_title(f"{d}: data", fontsize=8)
            for j, m in enumerate((m for m in self.members if m.density == d), start=1):
                net = model[m.name]
                x = net.sample(z=z) if m.kind == "cnf" else planar_inverse(net, z)
                x = x.cpu().numpy()
                axes[r, j].scatter(x[:, 0], x[:, 1], s=1, color="tab:blue")
                axes[r, j].set_title(f"{m.name.rsplit('_', 1)[0]} samples", fontsize=8)
        for ax in axes.flat:
            ax.set_xlim(-c.extent, c.extent)
            ax.set_ylim(-c.extent, c.extent)
            ax.set_xticks([])
            ax.set_yticks([])
        run.save_figure(fig, "samples")

    def _plot_table(self, run, metrics):
        c = self.config
        rows = []
        for m in self.members:
            nfe = metrics.get(f"nfe_per_iter/{m.name}")
            rows.append([m.density, m.kind, f"{'M' if m.kind == 'cnf' else 'K'}={m.size}",
                         f"{metrics[f'params/{m.name}']}", f"{metrics[f'test_nll/{m.name}']:.3f}",
                         "-" if nfe is None else f"{nfe:.0f}"])
        fig = figure(figsize=(6.5, 0.4 + 0.28 * (len(rows) + 1)))
        ax = fig.subplots()
        ax.axis("off")
        table = ax.table(cellText=rows, colLabels=["density", "model", "size", "params", "test NLL", "NFE/iter"],
                         loc="center")
        table.auto_set_font_size(False)
        table.set_fontsize(8)
        ax.set_title(f"test NLL (nats) after {c.iters} iterations", fontsize=9)
        run.save_figure(fig, "nll")

    def state_dict(self) -> dict:
        return {"totals": {k: list(v) for k, v in self.totals.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.totals = {k: [float(x) for x in v] for k, v in state["totals"].items()}
