"""``poisson``: a physics-informed network whose hidden layer is an ODE block.

Solve ``Laplacian(phi) = rho`` on the unit square ``[0, 1]^2`` with ``phi = 0`` on the
boundary. The network maps ``(x, y)`` to ``phi``: ``Linear(2, H)`` lifts the point, an ODE
block ``dh/dt = tanh(ConcatLinear(t, h))`` on ``[0, 1]`` (fixed-step rk4 by default), then
``Linear(H, 1)``. The loss is the mean squared PDE residual on random interior collocation
points plus the mean squared value on random boundary points; the Laplacian comes from
autograd through the solve (``gradient="direct"``: the adjoint and checkpoint strategies
do not support the double backward this needs, and the times are fixed, never differentiated).

Sources (``--set source=...``):

``seed`` (default)
    ``rho = 2 pi sin(x) sin(y)`` as in the seed document, which reports PDE loss 0.0768 and
    boundary loss 0.1029 after 60 steps at lr 0.1. No closed form: the reference is the
    5-point finite-difference solution on a fine grid (:func:`finite_difference_solution`).
``sine``
    ``rho = -2 pi^2 sin(pi x) sin(pi y)``, whose exact solution is ``sin(pi x) sin(pi y)``.

An MLP PINN of about the same parameter count (2-32-32-1, tanh) trains beside it on the
same collocation points with its own Adam state. Metrics: final PDE and boundary losses,
relative L2 and max error against the reference on a grid. Plots: the solutions, the error
maps and the loss curves.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import numpy as np
import torch
from torch import nn

from neuralode.models import MLP
from neuralode.nn import ConcatLinear, ODEBlock, TimeSequential

from .base import Experiment, Reference
from .config import ConfigError, NonNegFloat, NonNegInt, PosInt, RunConfig, max_steps_field, solve_cap
from .runner import RunContext, figure

__all__ = ["Poisson", "PoissonConfig", "PoissonODENet", "finite_difference_solution", "laplacian"]

_MODELS = ("odenet", "mlp")
_LABELS = {"odenet": "ODE-block PINN", "mlp": "MLP PINN"}


def source_term(source: str, xy: torch.Tensor | np.ndarray):
    """``rho(x, y)`` of the named source for points ``xy`` of shape ``(N, 2)`` (torch or numpy)."""
    lib = torch if isinstance(xy, torch.Tensor) else np
    x, y = xy[:, 0], xy[:, 1]
    if source == "seed":
        return 2 * math.pi * lib.sin(x) * lib.sin(y)
    if source == "sine":
        return -2 * math.pi**2 * lib.sin(math.pi * x) * lib.sin(math.pi * y)
    raise ValueError(f"unknown source {source!r}; use 'seed' or 'sine'")


def exact_sine_solution(xy: np.ndarray) -> np.ndarray:
    """``sin(pi x) sin(pi y)``: the exact solution for ``source="sine"``."""
    return np.sin(np.pi * xy[:, 0]) * np.sin(np.pi * xy[:, 1])


def finite_difference_solution(rho: np.ndarray) -> np.ndarray:
    """Solve the 5-point discrete Poisson problem on the unit square with zero boundary values.

    Parameters
    ----------
    rho : ndarray, shape (n, n)
        The source at the interior grid points ``(i h, j h)``, ``i, j = 1..n``,
        ``h = 1 / (n + 1)``; axis 0 is x, axis 1 is y.

    Returns
    -------
    ndarray, shape (n, n)
        ``u`` with ``(u[i-1,j] + u[i+1,j] + u[i,j-1] + u[i,j+1] - 4 u[i,j]) / h^2 = rho[i,j]``
        (``u = 0`` outside), second-order accurate in ``h``.

    Notes
    -----
    The 1-D Dirichlet second-difference matrix ``T`` has the orthonormal sine eigenvectors
    ``S[k, i] = sqrt(2h) sin(k i pi h)`` with eigenvalues ``(2 cos(k pi h) - 2) / h^2``, and
    the 2-D operator is ``T (x) I + I (x) T``. Diagonalising both axes gives the exact discrete
    solution with dense numpy products in ``O(n^3)``: no sparse solver (scipy stays a test-only
    dependency), and for the grids used here (n ~ 100) it takes milliseconds.
    """
    rho = np.asarray(rho, dtype=np.float64)
    n = rho.shape[0]
    if rho.shape != (n, n):
        raise ValueError(f"rho must be square (n, n), got shape {rho.shape}")
    h = 1.0 / (n + 1)
    k = np.arange(1, n + 1)
    s = np.sqrt(2 * h) * np.sin(np.pi * h * np.outer(k, k))  # symmetric and orthogonal
    lam = (2 * np.cos(np.pi * h * k) - 2) / h**2
    coeff = s @ rho @ s
    return s @ (coeff / (lam[:, None] + lam[None, :])) @ s


def interior_grid(n: int) -> np.ndarray:
    """The ``n x n`` interior points ``(i h, j h)`` of the finite-difference grid, ``(n*n, 2)``,
    ordered with x varying slowest (``reshape(n, n)`` gives axis 0 = x)."""
    g = np.arange(1, n + 1) / (n + 1)
    xx, yy = np.meshgrid(g, g, indexing="ij")
    return np.stack([xx.ravel(), yy.ravel()], axis=1)


def laplacian(model: nn.Module, xy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(phi, Laplacian(phi))`` at ``xy`` (N, 2) by autograd, keeping the graph for training.

    Both come out with shape ``(N,)``. Each second derivative is a vector-Jacobian product of
    the gradient (``create_graph=True``), so the loss can be differentiated once more.
    """
    xy = xy.detach().requires_grad_(True)
    phi = model(xy).reshape(-1)
    (grad,) = torch.autograd.grad(phi.sum(), xy, create_graph=True)
    lap = torch.zeros_like(phi)
    for i in range(xy.shape[1]):
        (second,) = torch.autograd.grad(grad[:, i].sum(), xy, create_graph=True)
        lap = lap + second[:, i]
    return phi, lap


class PoissonODENet(nn.Module):
    """``Linear(2, H)``, an ODE block ``dh/dt = tanh(ConcatLinear(H, H)(t, h))`` on ``[0, 1]``, ``Linear(H, 1)``."""

    def __init__(self, hidden: int, *, method: str, step_size: float, rtol: float, atol: float,
                 max_steps: int = 2000):
        super().__init__()
        self.stem = nn.Linear(2, hidden)
        options = {"step_size": step_size} if step_size > 0 else (solve_cap(method, max_steps) or None)
        # gradient="direct": second derivatives need a differentiable backward pass.
        self.block = ODEBlock(TimeSequential(ConcatLinear(hidden, hidden), nn.Tanh()), t=(0.0, 1.0),
                              method=method, rtol=rtol, atol=atol, options=options, gradient="direct")
        self.head = nn.Linear(hidden, 1)

    def forward(self, xy: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(torch.tanh(self.stem(xy))))


@dataclasses.dataclass
class PoissonConfig(RunConfig):
    """Configuration of ``poisson``.

    Attributes
    ----------
    source : "seed" | "sine"
        ``2 pi sin(x) sin(y)`` (the seed's, finite-difference reference) or
        ``-2 pi^2 sin(pi x) sin(pi y)`` (exact solution ``sin(pi x) sin(pi y)``).
    steps, lr : Adam steps and learning rate (both models).
    hidden : width of the ODE block's state; the MLP PINN has two hidden layers of
        ``mlp_hidden`` (32 and 32 give 1217 vs 1185 parameters).
    n_interior, n_boundary : collocation points drawn afresh every step (a pure function of
        ``(seed, step)``, so resume is exact).
    boundary_weight : weight of the boundary term in the loss (the reported boundary loss is
        unweighted). With weight 1 both PINNs left boundary values of ~0.03 (a third of the
        solution's size), so the default is 10.
    method, step_size, rtol, atol : the ODE block's solve (``step_size`` for fixed-step
        methods; 0 for adaptive ones, which then use ``rtol``/``atol``).
    max_steps : the most steps one adaptive solve of the block may take (a diverging model stops with an
        error, instead of taking the solver's 100,000 steps).
    grid : interior points per axis of the evaluation grid (and of the reference); the
        seed source's finite-difference reference uses ``fd_refine`` times finer a grid,
        sampled at the evaluation points.
    """

    source: Literal["seed", "sine"] = "seed"
    steps: PosInt = 500
    lr: float = 0.01
    hidden: PosInt = 32
    mlp_hidden: PosInt = 32
    n_interior: PosInt = 256
    n_boundary: PosInt = 128
    boundary_weight: NonNegFloat = 10.0
    method: str = "rk4"
    step_size: NonNegFloat = 0.25
    rtol: float = 1e-3
    atol: float = 1e-4
    max_steps: PosInt = max_steps_field()
    grid: PosInt = 47
    fd_refine: PosInt = 4
    log_every: PosInt = 10
    eval_every: NonNegInt = 50
    checkpoint_every: PosInt = 100


class Poisson(Experiment):
    name = "poisson"
    description = "PINN with an ODE-block hidden layer for Laplacian(phi) = rho on [0,1]^2 (seed losses 0.0768 / 0.1029)"
    Config = PoissonConfig
    references = {
        "odenet_pde_loss": Reference(0.0768, "PDE loss (mean squared residual) after 60 steps at lr 0.1, source=seed"),
        "odenet_boundary_loss": Reference(0.1029, "boundary loss after 60 steps at lr 0.1, source=seed"),
    }

    @classmethod
    def resolve(cls, config: PoissonConfig) -> PoissonConfig:
        c = config
        if min(c.steps, c.hidden, c.mlp_hidden, c.n_interior, c.n_boundary, c.grid, c.fd_refine) < 1:
            raise ConfigError("steps, hidden, mlp_hidden, n_interior, n_boundary, grid and fd_refine must be >= 1")
        if c.lr <= 0 or c.boundary_weight < 0 or c.step_size < 0:
            raise ConfigError("lr must be > 0, boundary_weight and step_size >= 0")
        if c.log_every < 1 or c.checkpoint_every < 1:
            raise ConfigError("log_every and checkpoint_every must be >= 1")
        from ..methods import REGISTRY

        spec = REGISTRY.get(c.method)
        if spec is not None and not spec.adaptive and c.step_size == 0:
            raise ConfigError(f"--set step_size=0: method={c.method} steps on a fixed grid and needs step_size > 0 "
                              f"(0 is for adaptive methods such as dopri5)")
        return c

    @property
    def num_steps(self) -> int:
        return self.config.steps

    def setup(self) -> None:
        c = self.config
        n = c.grid
        pts = interior_grid(n)
        if c.source == "sine":
            ref = exact_sine_solution(pts)
        else:
            # Reference on a grid fd_refine times finer whose points include the evaluation
            # grid's: with h_fine = 1 / (r (n + 1)), point i of the coarse grid is r*i of the fine.
            r = c.fd_refine
            nf = r * (n + 1) - 1
            fine = finite_difference_solution(source_term("seed", interior_grid(nf)).reshape(nf, nf))
            ref = fine[r - 1::r, r - 1::r].ravel()
        self.eval_xy = torch.tensor(pts, dtype=torch.float32, device=self.device)
        self.reference = ref  # numpy float64, (grid*grid,)

    def build_model(self) -> nn.Module:
        c = self.config
        return nn.ModuleDict({
            "odenet": PoissonODENet(c.hidden, method=c.method, step_size=c.step_size, rtol=c.rtol, atol=c.atol,
                                    max_steps=c.max_steps),
            "mlp": MLP(2, [c.mlp_hidden, c.mlp_hidden], 1, activation=nn.Tanh),
        }).to(self.device)

    def build_optimizer(self, model):
        # Adam's state is per parameter and the models share none, so one optimiser over the
        # summed loss updates each exactly as if it trained alone.
        return torch.optim.Adam(model.parameters(), lr=self.config.lr)

    def batch(self, position):
        c = self.config
        g = torch.Generator().manual_seed(c.seed * 1_000_003 + position.step)
        interior = torch.rand(c.n_interior, 2, generator=g)
        u = torch.rand(c.n_boundary, generator=g)
        side = torch.randint(0, 4, (c.n_boundary,), generator=g)
        zeros, ones = torch.zeros_like(u), torch.ones_like(u)
        bx = torch.where(side == 0, zeros, torch.where(side == 1, ones, u))
        by = torch.where(side == 2, zeros, torch.where(side == 3, ones, u))
        boundary = torch.stack([bx, by], dim=1)
        return interior.to(self.device), boundary.to(self.device)

    def _losses(self, net, interior, boundary):
        _, lap = laplacian(net, interior)
        pde = ((lap - source_term(self.config.source, interior)) ** 2).mean()
        bc = (net(boundary) ** 2).mean()
        return pde, bc

    def loss(self, model, batch, position):
        interior, boundary = batch
        total = torch.zeros((), device=self.device)
        logs = {}
        for key in _MODELS:
            pde, bc = self._losses(model[key], interior, boundary)
            total = total + pde + self.config.boundary_weight * bc
            logs[f"pde/{key}"] = pde.item()
            logs[f"boundary/{key}"] = bc.item()
        logs["nfe/odenet"] = model["odenet"].block.nfe_forward
        return total, logs

    def _predict(self, net) -> np.ndarray:
        with torch.no_grad():
            return net(self.eval_xy).reshape(-1).double().cpu().numpy()

    def _errors(self, net) -> tuple[float, float]:
        diff = self._predict(net) - self.reference
        return (float(np.linalg.norm(diff) / np.linalg.norm(self.reference)), float(np.abs(diff).max()))

    def evaluate(self, model, position, run):
        out = {}
        for key in _MODELS:
            out[f"l2_error/{key}"] = self._errors(model[key])[0]
        return out

    def finish(self, model, run: RunContext) -> dict:
        c = self.config
        # Final losses on a fixed evaluation batch (the one of step `steps`, never trained on).
        from .base import Position

        interior, boundary = self.batch(Position(c.steps, 0, c.steps))
        metrics: dict = {"source": c.source}
        for key in _MODELS:
            net = model[key]
            pde, bc = self._losses(net, interior, boundary)
            l2, mx = self._errors(net)
            metrics[f"{key}_pde_loss"] = pde.item()
            metrics[f"{key}_boundary_loss"] = bc.item()
            metrics[f"{key}_l2_error"] = l2
            metrics[f"{key}_max_error"] = mx
            metrics[f"{key}_params"] = sum(p.numel() for p in net.parameters())
        metrics["odenet_nfe_forward"] = model["odenet"].block.nfe_forward
        if c.source == "sine":
            # Discretisation error of the 5-point scheme on the evaluation grid, for scale.
            pts = interior_grid(c.grid)
            fd = finite_difference_solution(source_term("sine", pts).reshape(c.grid, c.grid)).ravel()
            metrics["fd_l2_error"] = float(np.linalg.norm(fd - self.reference) / np.linalg.norm(self.reference))
        self._plot_solution(run, model, metrics)
        self._plot_losses(run)
        return metrics

    def _plot_solution(self, run, model, metrics):
        n = self.config.grid
        ref = self.reference.reshape(n, n)
        preds = {key: self._predict(model[key]).reshape(n, n) for key in _MODELS}
        extent = (0, 1, 0, 1)
        fig = figure(figsize=(11, 6.6), layout="constrained")
        axes = fig.subplots(2, 3)
        ref_name = "exact sin(πx) sin(πy)" if self.config.source == "sine" else "finite differences"
        vmin, vmax = ref.min(), ref.max()
        panels = [("reference: " + ref_name, ref), *((_LABELS[k], preds[k]) for k in _MODELS)]
        for ax, (title, img) in zip(axes[0], panels):
            im = ax.imshow(img.T, origin="lower", extent=extent, vmin=vmin, vmax=vmax, cmap="viridis")
            ax.set_title(title, fontsize=9)
            fig.colorbar(im, ax=ax, fraction=0.046)
        errs = {k: np.abs(preds[k] - ref) for k in _MODELS}
        emax = max(e.max() for e in errs.values())
        for ax, key in zip(axes[1, 1:], _MODELS):
            im = ax.imshow(errs[key].T, origin="lower", extent=extent, vmin=0, vmax=emax, cmap="magma")
            ax.set_title(f"|error| {_LABELS[key]}: rel. L2 {metrics[f'{key}_l2_error']:.3g}", fontsize=9)
            fig.colorbar(im, ax=ax, fraction=0.046)
        ax = axes[1, 0]
        mid = n // 2
        xs = np.arange(1, n + 1) / (n + 1)
        ax.plot(xs, ref[:, mid], "k-", lw=2, label="reference")
        for key, color in zip(_MODELS, ("tab:red", "tab:blue")):
            ax.plot(xs, preds[key][:, mid], "--", color=color, label=_LABELS[key])
        ax.set_title(f"slice y = {xs[mid]:.2f}", fontsize=9)
        ax.set_xlabel("x")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        fig.suptitle(f"Poisson, source={self.config.source}: Laplacian(φ) = ρ, φ = 0 on the boundary")
        run.save_figure(fig, "solution")

    def _plot_losses(self, run):
        history = run.history()
        train = [r for r in history if r.get("split") == "train"]
        evals = [r for r in history if r.get("split") == "eval"]
        fig = figure(figsize=(11, 3.8), layout="constrained")
        axes = fig.subplots(1, 2)
        for key, color in zip(_MODELS, ("tab:red", "tab:blue")):
            for part, style in (("pde", "-"), ("boundary", ":")):
                pts = [(r["step"], r[f"{part}/{key}"]) for r in train if f"{part}/{key}" in r]
                if pts:
                    axes[0].plot(*zip(*pts), style, color=color, lw=1.2, label=f"{_LABELS[key]}: {part}")
            pts = [(r["step"], r[f"l2_error/{key}"]) for r in evals if f"l2_error/{key}" in r]
            if pts:
                axes[1].plot(*zip(*pts), "o-", color=color, ms=3, label=_LABELS[key])
        if self.config.source == "seed":
            axes[0].axhline(self.references["odenet_pde_loss"].value, color="gray", lw=0.8, ls="--",
                            label="seed PDE loss (60 steps)")
        axes[0].set_ylabel("training loss")
        axes[1].set_ylabel("relative L2 error vs reference")
        for ax in axes:
            ax.set_yscale("log")
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        run.save_figure(fig, "losses")
