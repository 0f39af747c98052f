"""``tolerance``: error control of an ODE-Net, as in Figure 3 of Chen et al. (2018).

A small ODE-Net (``neuralode.models.ODENet``: ``Linear(1, H)``, an ODE block
``dh/dt = ConcatLinear(tanh(ConcatLinear(t, h)))`` on ``[0, t_end]``, ``Linear(H, 1)``) is
trained briefly on the regression ``y = sin(3x) + 0.3 x^2`` (Adam, dopri5 at ``rtol=1e-3``,
direct backprop; the forward NFE is logged at every step). Then, on a fixed batch, the trained
block is solved in float64 with dopri5 at every tolerance ``rtol = atol = tol`` of
``tolerances`` (default ``1e-1 ... 1e-7``) and differentiated with the adjoint method; we record

* forward NFE and backward (adjoint) NFE,
* wall time of the forward solve and of forward + backward (median of ``repeats``),
* numerical error: the largest absolute error of the block's output ``h(t_end)`` and the
  relative error of the loss gradient, both against a reference solved at ``reference_tol``.

Plots (``error_control.png``): NFE and error against the tolerance, wall time against NFE,
backward against forward NFE, and forward NFE during training (the paper's panel d).
"""

from __future__ import annotations

import copy
import dataclasses
import statistics
import time
from typing import Annotated

import torch
from torch import nn

import neuralode
from neuralode.models import ODENet
from neuralode.nn import ConcatLinear, TimeSequential

from .base import Experiment
from .config import NON_EMPTY, ConfigError, NonNegInt, PosFloat, PosInt, RunConfig, max_steps_field
from .runner import RunContext, figure

__all__ = ["Tolerance", "ToleranceConfig"]


def target(x: torch.Tensor) -> torch.Tensor:
    return torch.sin(3 * x) + 0.3 * x**2


@dataclasses.dataclass
class ToleranceConfig(RunConfig):
    """Configuration of ``tolerance``.

    Attributes
    ----------
    hidden : width of the ODE state.
    t_end : the block integrates over ``[0, t_end]`` (longer: more steps per solve).
    steps, lr, batch_size, train_rtol : the brief training (Adam, dopri5 at
        ``rtol = 10 atol = train_rtol``, direct backprop; a fresh batch of ``batch_size``
        points in ``[-2, 2]`` each step). ``steps=0`` sweeps the random initial network.
    max_steps : the most steps one training solve may take (a diverging model stops with an error,
        instead of taking the solver's 100,000 steps); the sweep's solves are not capped.
    tolerances : the sweep (``rtol = atol = tol``), loosest first.
    reference_tol : tolerance of the reference solve (float64).
    sweep_batch : points of the fixed sweep batch (evenly spaced in ``[-2, 2]``).
    repeats : timings are the median of this many runs.
    """

    hidden: PosInt = 32
    t_end: PosFloat = 4.0
    steps: NonNegInt = 200
    lr: float = 0.01
    batch_size: PosInt = 128
    train_rtol: PosFloat = 1e-3
    max_steps: PosInt = max_steps_field()
    tolerances: Annotated[tuple[PosFloat, ...], NON_EMPTY] = (1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6, 1e-7)
    reference_tol: PosFloat = 1e-10
    sweep_batch: PosInt = 128
    repeats: PosInt = 3
    log_every: PosInt = 10
    checkpoint_every: PosInt = 100


class Tolerance(Experiment):
    name = "tolerance"
    description = "NFE, wall time and error of an ODE-Net's solve against the tolerance (Chen et al. 2018, Fig. 3)"
    Config = ToleranceConfig

    @classmethod
    def resolve(cls, config: ToleranceConfig) -> ToleranceConfig:
        c = config
        if not c.tolerances or min(c.tolerances) <= 0 or c.reference_tol <= 0:
            raise ConfigError("tolerances must be a non-empty list of positive numbers; reference_tol > 0")
        if c.reference_tol >= min(c.tolerances):
            raise ConfigError(f"reference_tol={c.reference_tol:g} must be tighter than every tolerance "
                              f"(smallest {min(c.tolerances):g})")
        if c.steps < 0 or min(c.hidden, c.batch_size, c.sweep_batch, c.repeats) < 1 or c.t_end <= 0:
            raise ConfigError("steps must be >= 0; hidden, batch_size, sweep_batch, repeats >= 1; t_end > 0")
        if c.log_every < 1 or c.checkpoint_every < 1 or c.lr <= 0 or c.train_rtol <= 0:
            raise ConfigError("log_every, checkpoint_every >= 1 and lr, train_rtol > 0")
        return dataclasses.replace(c, tolerances=tuple(sorted(c.tolerances, reverse=True)))

    @property
    def num_steps(self) -> int:
        return self.config.steps

    def build_model(self) -> nn.Module:
        c = self.config
        h = c.hidden
        field = TimeSequential(ConcatLinear(h, h), nn.Tanh(), ConcatLinear(h, h))
        return ODENet(nn.Linear(1, h), field, nn.Linear(h, 1), t=(0.0, c.t_end), method="dopri5",
                      rtol=c.train_rtol, atol=c.train_rtol / 10, gradient="direct",
                      options={"max_num_steps": c.max_steps}).to(self.device)

    def build_optimizer(self, model):
        return torch.optim.Adam(model.parameters(), lr=self.config.lr)

    def batch(self, position):
        g = torch.Generator().manual_seed(self.config.seed * 1_000_003 + position.step)
        x = torch.rand(self.config.batch_size, 1, generator=g) * 4 - 2
        return x.to(self.device), target(x).to(self.device)

    def loss(self, model, batch, position):
        x, y = batch
        loss = ((model(x) - y) ** 2).mean()
        return loss, {"nfe_forward": model.block.nfe_forward}

    # -- the sweep ------------------------------------------------------------------
    def _solve(self, field, h0, y, tol, gradient):
        """Solve the block from ``h0``; return (h(t_end), loss gradient w.r.t. the field's
        parameters, forward NFE, backward NFE)."""
        params = tuple(field.parameters())
        t = torch.tensor([0.0, self.config.t_end], dtype=torch.float64, device=h0.device)
        sol = neuralode.solve(field, h0, t, method="dopri5", rtol=tol, atol=tol, gradient=gradient,
                              adjoint_params=params)
        out = sol.ys[-1]
        loss = (out**2).mean() if y is None else ((self._head(out) - y) ** 2).mean()
        grads = torch.autograd.grad(loss, params)
        flat = torch.cat([g.reshape(-1) for g in grads])
        return out.detach(), flat, int(sol.stats["nfe"]), int(sol.stats.get("nfe_backward", 0))

    def _timed(self, fn, repeats):
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    def finish(self, model, run: RunContext) -> dict:
        c = self.config
        net = copy.deepcopy(model).double().eval()
        field = net.block.func
        self._head = net.head
        x = torch.linspace(-2, 2, c.sweep_batch, dtype=torch.float64, device=self.device).unsqueeze(1)
        y = target(x)
        with torch.no_grad():
            h0 = net.stem(x)
        ref_out, ref_grad, ref_nfe, _ = self._solve(field, h0, y, c.reference_tol, "direct")
        t = torch.tensor([0.0, c.t_end], dtype=torch.float64, device=self.device)
        rows = []
        for tol in c.tolerances:
            out, grad, nfe_f, nfe_b = self._solve(field, h0, y, tol, "adjoint")

            def forward_only(tol=tol):
                with torch.no_grad():
                    neuralode.solve(field, h0, t, method="dopri5", rtol=tol, atol=tol)

            def forward_backward(tol=tol):
                self._solve(field, h0, y, tol, "adjoint")

            rows.append({
                "tol": tol,
                "nfe_forward": nfe_f,
                "nfe_backward": nfe_b,
                "time_forward_s": self._timed(forward_only, c.repeats),
                "time_total_s": self._timed(forward_backward, c.repeats),
                "output_error": (out - ref_out).abs().max().item(),
                "gradient_error": ((grad - ref_grad).norm() / ref_grad.norm()).item(),
            })
        self.rows = rows
        run.write_json("sweep.json", {"reference_tol": c.reference_tol, "reference_nfe": ref_nfe, "rows": rows})
        metrics: dict = {"reference_nfe": ref_nfe}
        for r in rows:
            tag = f"tol{r['tol']:.0e}"
            for key in ("nfe_forward", "nfe_backward", "output_error", "gradient_error", "time_total_s"):
                metrics[f"{tag}_{key}"] = r[key]
        self._plot(run, rows)
        return metrics

    def _plot(self, run, rows):
        tols = [r["tol"] for r in rows]
        fig = figure(figsize=(11, 7.5), layout="constrained")
        axes = fig.subplots(2, 2)
        ax = axes[0, 0]
        ax.loglog(tols, [r["nfe_forward"] for r in rows], "o-", label="forward NFE")
        ax.loglog(tols, [r["nfe_backward"] for r in rows], "s-", label="backward NFE (adjoint)")
        ax.set_xlabel("tolerance (rtol = atol)")
        ax.set_ylabel("NFE")
        ax.invert_xaxis()
        ax2 = ax.twinx()
        ax2.loglog(tols, [max(r["output_error"], 1e-17) for r in rows], "^--", color="tab:red", label="output error")
        ax2.loglog(tols, [max(r["gradient_error"], 1e-17) for r in rows], "v--", color="tab:purple",
                   label="gradient rel. error")
        ax2.set_ylabel("error vs reference")
        lines = ax.get_legend_handles_labels()
        lines2 = ax2.get_legend_handles_labels()
        ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], fontsize=7, loc="upper left")
        ax.set_title("NFE and error against tolerance")
        ax.grid(alpha=0.3, which="both")

        ax = axes[0, 1]
        ax.plot([r["nfe_forward"] for r in rows], [r["time_forward_s"] * 1e3 for r in rows], "o-", label="forward")
        ax.plot([r["nfe_forward"] for r in rows], [r["time_total_s"] * 1e3 for r in rows], "s-",
                label="forward + adjoint backward")
        for r in rows:
            ax.annotate(f"{r['tol']:.0e}", (r["nfe_forward"], r["time_total_s"] * 1e3), fontsize=6,
                        xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel("forward NFE")
        ax.set_ylabel("wall time [ms]")
        ax.set_title("wall time against NFE")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)

        ax = axes[1, 0]
        nf = [r["nfe_forward"] for r in rows]
        nb = [r["nfe_backward"] for r in rows]
        ax.plot(nf, nb, "o-")
        lim = max(nf + nb) * 1.05
        ax.plot([0, lim], [0, lim], "k:", lw=0.8, label="backward = forward")
        ax.set_xlabel("forward NFE")
        ax.set_ylabel("backward NFE (adjoint)")
        ax.set_title("backward against forward NFE")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)

        ax = axes[1, 1]
        pts = [(r["step"], r["nfe_forward"]) for r in run.history()
               if r.get("split") == "train" and r.get("nfe_forward") is not None]
        if pts:
            ax.plot(*zip(*pts), lw=1.2)
        ax.set_xlabel("training step")
        ax.set_ylabel(f"forward NFE (rtol {self.config.train_rtol:g})")
        ax.set_title("forward NFE during training")
        ax.grid(alpha=0.3)
        run.save_figure(fig, "error_control")
