"""``memory``: memory of a training step against depth (ResNet) and steps (ODE-Net).

The claim of Chen et al. (2018): backpropagating through a ResNet of ``L`` blocks, or through
the ``N`` steps of an ODE solver, keeps ``O(L)`` (``O(N)``) activations, while the adjoint
method needs ``O(1)`` memory in the number of steps. Here:

* ResNet (``neuralode.models.ResNet``): ``Linear(d, w)``, ``L`` blocks ``h + tanh(W h + b)``,
  ``Linear(w, d)``, for ``L`` in ``depths``;
* ODE-Net (``neuralode.models.ODENet``): the same stem and head around an ODE block
  ``dh/dt = tanh(W h + b)`` on ``[0, 1]`` solved with fixed-step ``method`` (rk4: 4
  evaluations per step) in ``N`` steps for ``N`` in ``ode_steps``, differentiated with each
  of ``gradient="direct"``, ``"checkpoint"`` and ``"adjoint"``.

Each optimiser step of the run measures one case: one forward pass, the loss (mean square of
the output) and its gradient with ``torch.autograd.grad``. The loop's own update is skipped
(the loss handed back is detached); the run is a measurement, not a training.

How memory is measured
----------------------
Bytes of tensors *saved for backward*, counted with
``torch.autograd.graph.saved_tensors_hooks``: every tensor autograd saves is wrapped in a
small object that adds the bytes of its storage to a live total when created and subtracts
them when autograd frees it (after the node's backward). Storages are counted once however
often they are saved, and the model's parameters are not counted (they exist anyway). The
report gives the peak of the live total over forward + backward (``peak``) and the total
held at the end of the forward pass (``held``: memory the graph pins until backward).

Why this and not process memory: it is deterministic (the same numbers on every run and
machine, independent of other processes, allocator caching and thread pools), it isolates
exactly what the O(L)-vs-O(1) claim is about, and it works on the CPU, where torch keeps no
allocator statistics (``torch.profiler``'s memory events were incomplete and slow here).
``benchmarks/memory.py`` measures the whole process's peak resident memory instead.
What it does not see: the forward's transient temporaries (freed at once, the same for every
strategy) and tensors a strategy keeps in its own context rather than through
``save_for_backward``: the checkpoint strategy's stored states (at most ``2 sqrt(N) + 2``
states, reported separately as ``checkpoint_states_bytes`` from the state size) and the
adjoint's final state (one state).
"""

from __future__ import annotations

import dataclasses
import math
import time

import torch
from torch import nn

from neuralode.models import ODENet, ResNet
from neuralode.nn import Autonomous

from .base import Experiment
from .config import ConfigError, PosInt, RunConfig
from .runner import RunContext, figure

__all__ = ["Memory", "MemoryConfig", "SavedTensorMeter"]

STRATEGIES = ("direct", "checkpoint", "adjoint")


class SavedTensorMeter:
    """Count the bytes of tensors autograd saves for backward while the meter is active.

    Use as ``with SavedTensorMeter(exclude=params) as meter: ...``; then ``meter.peak`` is
    the largest live total and ``meter.live`` the current one (bytes). Storages are keyed by
    their data pointer and counted once while any saved reference to them lives.
    """

    def __init__(self, exclude=()):
        self._exclude = {p.untyped_storage().data_ptr() for p in exclude}
        self._refs: dict[int, list[int]] = {}
        self.live = 0
        self.peak = 0
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    def _pack(self, tensor: torch.Tensor):
        try:
            storage = tensor.untyped_storage()
            key, nbytes = storage.data_ptr(), storage.nbytes()
        except (RuntimeError, NotImplementedError):  # no storage (e.g. some wrapper tensors)
            return tensor
        if key in self._exclude or nbytes == 0:
            return tensor
        return _Saved(self, tensor, key, nbytes)

    @staticmethod
    def _unpack(packed):
        return packed.tensor if isinstance(packed, _Saved) else packed

    def _add(self, key: int, nbytes: int) -> None:
        entry = self._refs.get(key)
        if entry is None:
            self._refs[key] = [1, nbytes]
            self.live += nbytes
            self.peak = max(self.peak, self.live)
        else:
            entry[0] += 1

    def _remove(self, key: int) -> None:
        entry = self._refs[key]
        entry[0] -= 1
        if entry[0] == 0:
            del self._refs[key]
            self.live -= entry[1]

    def __enter__(self):
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        return self._hooks.__exit__(*exc)


class _Saved:
    """A saved tensor plus its place in the meter's count (removed when autograd drops it)."""

    __slots__ = ("key", "meter", "tensor")

    def __init__(self, meter: SavedTensorMeter, tensor: torch.Tensor, key: int, nbytes: int):
        self.tensor, self.meter, self.key = tensor, meter, key
        meter._add(key, nbytes)

    def __del__(self):
        self.meter._remove(self.key)


@dataclasses.dataclass
class MemoryConfig(RunConfig):
    """Configuration of ``memory``.

    Attributes
    ----------
    features, width, batch : input/output size, hidden width and batch size.
    depths : ResNet depths ``L`` to measure.
    ode_steps : numbers of solver steps ``N`` for the ODE-Net (``step_size = 1 / N``).
    method : fixed-step method of the ODE block (``euler`` makes ``N`` steps cost what ``N``
        residual blocks cost; rk4 evaluates 4 times per step).
    strategies : gradient strategies of the ODE-Net.
    """

    features: PosInt = 8
    width: PosInt = 64
    batch: PosInt = 256
    depths: tuple[PosInt, ...] = (1, 2, 4, 8, 16, 32, 64, 128)
    ode_steps: tuple[PosInt, ...] = (1, 2, 4, 8, 16, 32, 64, 128)
    method: str = "rk4"
    strategies: tuple[str, ...] = STRATEGIES
    log_every: PosInt = 1
    checkpoint_every: PosInt = 4


@dataclasses.dataclass(frozen=True)
class _Case:
    model: str  # "resnet" or a gradient strategy
    size: int  # L or N

    @property
    def key(self) -> str:
        return f"{self.model}_{self.size}"


class Memory(Experiment):
    name = "memory"
    description = "memory held for backward vs depth: ResNet O(L), ODE-Net direct/checkpoint vs adjoint O(1)"
    Config = MemoryConfig
    loss_plot = False  # every step measures another case: its "loss" is no training curve

    @classmethod
    def resolve(cls, config: MemoryConfig) -> MemoryConfig:
        c = config
        if min((c.features, c.width, c.batch, *c.depths, *c.ode_steps), default=1) < 1:
            raise ConfigError("features, width, batch, depths and ode_steps must be >= 1")
        unknown = [s for s in c.strategies if s not in STRATEGIES]
        if unknown:
            raise ConfigError(f"unknown strategies {unknown}; choose from {', '.join(STRATEGIES)}")
        if not (c.depths or (c.ode_steps and c.strategies)):
            raise ConfigError("nothing to measure: give depths or ode_steps and strategies")
        if c.log_every < 1 or c.checkpoint_every < 1:
            raise ConfigError("log_every and checkpoint_every must be >= 1")
        return c

    def setup(self) -> None:
        c = self.config
        self.cases = [_Case("resnet", L) for L in c.depths]
        self.cases += [_Case(s, n) for s in c.strategies for n in c.ode_steps]
        g = torch.Generator().manual_seed(c.seed)
        self.x = torch.randn(c.batch, c.features, generator=g).to(self.device)
        self.results: dict[str, dict] = {}

    @property
    def num_steps(self) -> int:
        return len(self.cases)

    def build_model(self) -> nn.Module:
        c = self.config
        w = c.width
        models = nn.ModuleDict()
        for L in c.depths:
            blocks = [nn.Sequential(nn.Linear(w, w), nn.Tanh()) for _ in range(L)]
            models[f"resnet_{L}"] = ResNet(nn.Linear(c.features, w), blocks, nn.Linear(w, c.features))
        if c.ode_steps and c.strategies:
            # One ODE-Net; the strategy and the step count are chosen per case (the first case's step here).
            models["odenet"] = ODENet(nn.Linear(c.features, w), Autonomous(nn.Sequential(nn.Linear(w, w), nn.Tanh())),
                                      nn.Linear(w, c.features), method=c.method, gradient="direct",
                                      options={"step_size": 1.0 / c.ode_steps[0]})
        return models.to(self.device)

    def build_optimizer(self, model):
        return torch.optim.SGD(model.parameters(), lr=0.0)  # never stepped: see the module docstring

    def loss(self, model, batch, position):
        case = self.cases[position.step]
        if case.model == "resnet":
            net = model[case.key]
        else:
            net = model["odenet"]
            net.block.gradient = case.model
            net.block.options = {"step_size": 1.0 / case.size}
        params = [p for p in net.parameters() if p.requires_grad]
        t0 = time.perf_counter()
        with SavedTensorMeter(exclude=params) as meter:
            loss = (net(self.x) ** 2).mean()
            held = meter.live
            torch.autograd.grad(loss, params)
        seconds = time.perf_counter() - t0
        result = {"peak_bytes": meter.peak, "held_bytes": held, "seconds": seconds}
        if case.model != "resnet":
            result["nfe_forward"] = net.block.nfe_forward
            result["nfe_backward"] = net.block.nfe_backward or 0
        self.results[case.key] = result
        logs = {f"{k}/{case.key}": v for k, v in result.items()}
        return loss.detach(), logs

    def _state_bytes(self) -> int:
        c = self.config
        return c.batch * c.width * self.x.element_size()

    def finish(self, model, run: RunContext) -> dict:
        c = self.config
        metrics: dict = {"state_bytes": self._state_bytes()}
        for case in self.cases:
            r = self.results.get(case.key)
            if r is None:
                continue
            metrics[f"{case.key}_peak_bytes"] = r["peak_bytes"]
            metrics[f"{case.key}_held_bytes"] = r["held_bytes"]
            if case.model == "checkpoint":
                metrics[f"{case.key}_checkpoint_states_bytes"] = (2 * math.isqrt(case.size) + 2) * self._state_bytes()
        # Growth exponent of the peak between the smallest and largest size (1: linear, 0: constant).
        for name, sizes in (("resnet", c.depths), *((s, c.ode_steps) for s in c.strategies)):
            lo, hi = (min(sizes), max(sizes)) if sizes else (0, 0)
            a, b = self.results.get(f"{name}_{lo}"), self.results.get(f"{name}_{hi}")
            if a and b and hi > lo and a["peak_bytes"] > 0:
                metrics[f"{name}_growth_exponent"] = math.log(b["peak_bytes"] / a["peak_bytes"]) / math.log(hi / lo)
        self._plot(run)
        return metrics

    def _plot(self, run):
        c = self.config
        fig = figure(figsize=(11, 4.2), layout="constrained")
        axes = fig.subplots(1, 2)
        styles = {"resnet": ("k", "o", "ResNet, L blocks"),
                  "direct": ("tab:red", "s", f"ODE-Net direct, N {c.method} steps"),
                  "checkpoint": ("tab:orange", "^", "ODE-Net checkpoint"),
                  "adjoint": ("tab:blue", "D", "ODE-Net adjoint")}
        mib = 1024**2
        for ax, key, title in ((axes[0], "peak_bytes", "peak memory saved for backward (forward + backward)"),
                               (axes[1], "held_bytes", "held by the graph at the end of the forward pass")):
            for name in ("resnet", *c.strategies):
                sizes = c.depths if name == "resnet" else c.ode_steps
                pts = [(n, self.results[f"{name}_{n}"][key] / mib) for n in sizes if f"{name}_{n}" in self.results]
                pts = [(n, v) for n, v in pts if v > 0]
                color, marker, label = styles[name]
                if pts:
                    ax.plot(*zip(*pts), marker=marker, color=color, label=label, lw=1.3, ms=4)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("depth L / solver steps N")
            ax.set_ylabel("MiB")
            ax.set_title(title, fontsize=9)
            ax.grid(alpha=0.3, which="both")
            ax.legend(fontsize=7)
        fig.suptitle(f"saved-tensor bytes, batch {c.batch}, width {c.width} (float32 state {self._state_bytes() / 1024:.0f} KiB)",
                     fontsize=10)
        run.save_figure(fig, "memory")

    def state_dict(self) -> dict:
        return {"results": {k: dict(v) for k, v in self.results.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.results = {k: dict(v) for k, v in state["results"].items()}
