"""``ecg``: ResNet vs RK-Net vs ODE-Net on MIT-BIH heartbeats (5 AAMI classes).

The seed document's models (:func:`neuralode.models.sequence_classifier`, ``channels=32``):
three convolutions with ReLU (``187 -> 46`` samples), then six residual blocks (ResNet) or
one ODE block with time-dependent dynamics (ODE-Net: dopri5, rtol = atol = 1e-3, adjoint
gradients; RK-Net: the same block with fixed-step rk4, step 0.25, gradients by
backpropagation through the steps), then a linear layer. Cross-entropy, SGD with learning
rate 0.1 and momentum 0.9, batch 128, and each model's gradient norm clipped to
``grad_clip=1.0`` (without it the ResNet diverges at these settings; ``grad_clip=0`` turns it
off).

The CPU default trains on a class-stratified subset (``train_size=4000`` beats of the Kaggle
training file, the class proportions kept) for ``epochs=3`` and tests on a stratified
``test_size=4000`` of the test file; the seed's run is ::

    neuralode run ecg --set train_size=0 test_size=0 epochs=25

``--set model=resnet|rknet|odenet|all`` (default ``all``: the three are trained side by side
on the same batches, each with its own parameters and optimiser state, so each gets
exactly the updates it would get alone). ``--set split=patient`` pools both Kaggle files
and splits them by record (:func:`neuralode.data.inter_patient_split`, a quarter of the
records for testing), so no patient is on both sides.

Metrics per model: test cross-entropy, accuracy, per-class precision/recall/F1, macro F1,
confusion matrix (rows: true class, columns: prediction), forward/backward NFE per epoch,
training time per epoch, activation memory and parameter count. Plots: learning curves,
confusion matrices (ours beside the seed's), NFE per epoch.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import resource
import time
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from neuralode.data import HeartbeatData, find_data_dir, inter_patient_split, load_heartbeat
from neuralode.data._io import expand_user
from neuralode.models import count_parameters, sequence_classifier

from . import distributed
from .base import Experiment, Position, Reference, epoch_permutation
from .config import (ConfigError, DataError, Fraction, NonNegFloat, NonNegInt, PosFloat, PosInt, Range, RunConfig,
                     max_steps_field)
from .runner import RunContext, figure

__all__ = ["ClippedSGD", "ECG", "ECGConfig", "Members", "SEED_CONFUSION", "stratified_subset"]

CLASSES = ("N", "S", "V", "F", "Q")

#: Test confusion matrices of the seed document (rows: true N, S, V, F, Q; columns: predicted),
#: on the 21,892 beats of the Kaggle test file.
SEED_CONFUSION = {
    "resnet": [[18056, 12, 36, 5, 9], [209, 339, 5, 1, 2], [99, 8, 1313, 23, 5], [52, 0, 16, 94, 0],
               [47, 0, 10, 0, 1551]],
    "odenet": [[17989, 43, 74, 3, 9], [151, 389, 15, 0, 1], [59, 2, 1376, 10, 1], [36, 0, 26, 100, 0],
               [36, 0, 16, 0, 1556]],
}


def stratified_subset(labels: torch.Tensor, size: int, seed: int) -> torch.Tensor:
    """Sorted indices of exactly ``size`` rows with the class proportions of ``labels``.

    Each class gets ``size * share`` rows rounded by the largest-remainder rule (at least one
    for every class present, so rare classes are never dropped), drawn with
    ``numpy.random.default_rng(seed)``. ``size <= 0`` or ``>= len(labels)``: all rows."""
    n = int(labels.shape[0])
    if size <= 0 or size >= n:
        return torch.arange(n)
    y = labels.cpu().numpy()
    classes, counts = np.unique(y, return_counts=True)
    quota = counts / n * size
    take = np.maximum(np.floor(quota).astype(int), 1)
    order = np.argsort(-(quota - np.floor(quota)), kind="stable")
    i = 0
    while take.sum() < size:
        c = order[i % len(order)]
        if take[c] < counts[c]:
            take[c] += 1
        i += 1
    while take.sum() > size:  # the "at least one" floor overshot: trim the largest class
        take[np.argmax(take)] -= 1
    rng = np.random.default_rng([seed, 7])
    picked = [rng.permutation(np.flatnonzero(y == c))[:k] for c, k in zip(classes, take)]
    return torch.from_numpy(np.sort(np.concatenate(picked))).long()


class Members(nn.Module):
    """Several classifiers trained side by side: ``forward(x)`` returns ``{name: logits}``.

    One module (not a dict of them) so that the loop, DDP and checkpoints see one model."""

    def __init__(self, models: dict[str, nn.Module]):
        super().__init__()
        self.models = nn.ModuleDict(models)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {name: m(x) for name, m in self.models.items()}


class ClippedSGD(torch.optim.SGD):
    """SGD that first clips the gradient norm of every parameter group to ``max_norm``
    (``torch.nn.utils.clip_grad_norm_``; ``max_norm <= 0``: no clipping, plain SGD).

    Under DDP the gradients are already averaged when ``step`` runs, so every rank clips the
    same gradient by the same factor."""

    def __init__(self, params, *, max_norm: float = 0.0, **kwargs):
        super().__init__(params, **kwargs)
        self.max_norm = float(max_norm)

    @torch.no_grad()
    def step(self, closure=None):
        if self.max_norm > 0:
            for group in self.param_groups:
                torch.nn.utils.clip_grad_norm_([p for p in group["params"] if p.grad is not None], self.max_norm)
        return super().step(closure)


def _unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)  # DistributedDataParallel keeps it in .module


def saved_activation_bytes(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> int:
    """Bytes of the tensors autograd keeps for the backward pass of one batch.

    The memory that grows with depth (ResNet, RK-Net) or not at all (ODE-Net with the adjoint,
    which keeps only the block's input and output): a deterministic stand-in for peak memory
    on the CPU, where torch keeps no allocator statistics. Storages are counted once."""
    seen: dict[int, int] = {}
    # The saved tensors are kept here until the count is done (so that no storage is freed and
    # its address reused by another), and the graph gets None in their place (no backward pass
    # follows). A pack hook that hands the tensor itself back to the graph leaks it: the saved
    # tensor refers to the graph's node through its grad_fn and the node to the tensor, a cycle
    # through C++ that the garbage collector cannot see (0.85 GiB for every call on a TisODE at
    # channels 64, batch 128). The graph may keep the hooks too, hence the explicit clear().
    kept: list[torch.Tensor] = []

    def pack(t: torch.Tensor):
        try:
            storage = t.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
        except (RuntimeError, NotImplementedError):  # pragma: no cover - e.g. sparse
            pass
        kept.append(t)

    def unpack(_):  # pragma: no cover - the measurement never runs backward
        raise RuntimeError("saved_activation_bytes measures a forward pass; its graph cannot be differentiated")

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        F.cross_entropy(model(x), y)
    kept.clear()
    return int(sum(seen.values()))


@dataclasses.dataclass
class ECGConfig(RunConfig):
    """Configuration of ``ecg``.

    Attributes
    ----------
    model : {"all", "resnet", "rknet", "odenet"}
        Which networks to train (``all``: the three side by side on the same batches).
    data_dir : str
        Folder with ``mitbih_train.csv[.gz]``, ``mitbih_test.csv[.gz]`` and, for
        ``split=patient``, ``mitbih_{train,test}_records.txt``. Empty (default): found by the
        data rule of :mod:`neuralode.data.locate` (``$NEURALODE_DATA/mitbih``, the user cache,
        the checkout's ``../shared/data/mitbih``); the resolved folder is recorded.
    split : {"kaggle", "patient"}
        ``kaggle``: the Kaggle train/test files (intra-patient, the seed's setting);
        ``patient``: both files pooled and split by record (``test_fraction`` of the records).
    test_fraction : float
        Fraction of records held out by ``split=patient`` (split seed: ``seed``).
    train_size, test_size : int
        Class-stratified subsets of the training and test sets (0: all beats).
    epochs, batch_size, lr, momentum : training (SGD, the seed's 0.1 / 0.9 / batch 128).
    channels : int
        Width of the convolutions (32: ResNet 53,061 parameters, ODE/RK-Net 22,213).
    rtol, atol : float
        ODE-Net solver tolerances (dopri5).
    max_steps : int
        The most steps one ODE-Net solve may take (a diverging model stops with an error).
    rk_step : float
        RK-Net step size on ``[0, 1]`` (rk4).
    grad_clip : float
        Clip each model's gradient norm to this before every SGD step (0: off). The seed's
        lr 0.1 / momentum 0.9 make the ResNet diverge without it (docs/classification.md).
    eval_batch : int
        Batch size of the evaluation passes.
    eval_every : int
        Evaluate every this many steps; ``-1`` (default): at the end of every epoch.
    """

    model: Literal["all", "resnet", "rknet", "odenet"] = "all"
    data_dir: str = ""
    split: Literal["kaggle", "patient"] = "kaggle"
    test_fraction: Fraction = 0.25
    train_size: NonNegInt = 4000
    test_size: NonNegInt = 4000
    epochs: PosInt = 3
    batch_size: PosInt = 128
    lr: float = 0.1
    momentum: NonNegFloat = 0.9
    channels: PosInt = 32
    rtol: float = 1e-3
    atol: float = 1e-3
    max_steps: PosInt = max_steps_field()
    rk_step: PosFloat = 0.25
    grad_clip: NonNegFloat = 1.0
    eval_batch: PosInt = 512
    eval_every: Annotated[int, Range(-1)] = -1
    log_every: PosInt = 5
    checkpoint_every: PosInt = 50


@functools.lru_cache(maxsize=2)
def _load_split(data_dir: str, split: str, test_fraction: float, seed: int) -> tuple[HeartbeatData, HeartbeatData]:
    root = expand_user(data_dir, "data_dir")

    def find(stem: str) -> Path:
        for name in (f"{stem}.csv.gz", f"{stem}.csv"):
            if (root / name).exists():
                return root / name
        raise ConfigError(
            f"ecg: no {stem}.csv(.gz) in data_dir={data_dir!r}; set data_dir to the folder with the "
            f"Kaggle MIT-BIH files (docs/data.md)"
        )

    def records(stem: str) -> Path | None:
        path = root / f"{stem}_records.txt"
        if path.exists():
            return path
        if split == "patient":
            raise ConfigError(f"ecg: split=patient needs {path} (one record id per row)")
        return None

    train = load_heartbeat(find("mitbih_train"), records("mitbih_train"))
    test = load_heartbeat(find("mitbih_test"), records("mitbih_test"))
    if split == "kaggle":
        return train, test
    pooled = HeartbeatData(torch.cat([train.x, test.x]), torch.cat([train.y, test.y]),
                           torch.cat([train.records, test.records]))
    i_train, i_test = inter_patient_split(pooled.records, test_fraction=test_fraction, seed=seed)
    return pooled.subset(i_train), pooled.subset(i_test)


class Classification(Experiment):
    """The training and evaluation shared by ``ecg`` and ``mnist``: members trained side by
    side, sharded batches, per-model metrics, NFE and time bookkeeping, plots.

    Subclasses provide ``_data()`` (train and test tensors), ``builder`` (the
    :mod:`neuralode.models` builder of their networks), ``kinds`` and may override
    ``_transform(x, position)`` (augmentation) and ``_lr(epoch)``."""

    kinds: tuple[str, ...] = ()
    class_names: tuple[str, ...] = ()
    builder = None  # e.g. staticmethod(sequence_classifier)

    def _build(self, kind: str) -> nn.Module:
        """One member network: the ODE-Net gets the config's tolerances, the RK-Net its step."""
        c = self.config
        if kind == "odenet":
            return self.builder(kind, channels=c.channels, rtol=c.rtol, atol=c.atol,
                                options={"max_num_steps": c.max_steps})
        if kind == "rknet":
            return self.builder(kind, channels=c.channels, step_size=c.rk_step)
        return self.builder(kind, channels=c.channels)

    @classmethod
    def _resolve_eval_every(cls, config, steps_per_epoch: int):
        if config.eval_every == -1:
            config = dataclasses.replace(config, eval_every=steps_per_epoch)
        if config.eval_every < 0:
            raise ConfigError("eval_every must be >= 0, or -1 for the end of every epoch")
        if config.epochs < 1 or config.batch_size < 1 or config.checkpoint_every < 1:
            raise ConfigError("epochs, batch_size and checkpoint_every must be >= 1")
        return config

    @property
    def member_names(self) -> list[str]:
        return list(self.kinds) if self.config.model == "all" else [self.config.model]

    # -- data -----------------------------------------------------------------------
    @property
    def steps_per_epoch(self) -> int:
        return max(1, self.n_train // self.config.batch_size)  # drop_last: every batch is full

    @property
    def num_steps(self) -> int:
        return self.config.epochs * self.steps_per_epoch

    def setup(self) -> None:
        self.train_x, self.train_y, self.test_x, self.test_y = self._data()
        self.n_train = int(self.train_y.shape[0])
        self.epoch_stats: dict[str, dict] = {}  # str(epoch) -> per-member NFE and times
        self._pending = None  # (epoch, names) whose backward NFE is not yet harvested
        self._clock = None

    def batch(self, position: Position):
        c = self.config
        order = epoch_permutation(c.seed, position.epoch, self.n_train)
        idx = distributed.shard(order[position.index * c.batch_size:(position.index + 1) * c.batch_size])
        idx = torch.as_tensor(idx)
        x = self._transform(self.train_x[idx], position)
        return x.to(self.device), self.train_y[idx].to(self.device)

    def _transform(self, x: torch.Tensor, position: Position) -> torch.Tensor:
        return x

    def _lr(self, epoch: int) -> float:
        return self.config.lr

    # -- model ----------------------------------------------------------------------
    def build_model(self) -> nn.Module:
        self.model = Members({k: self._build(k) for k in self.member_names}).to(self.device)
        return self.model

    def build_optimizer(self, model):
        c = self.config
        # One parameter group per member, so that clipping (``grad_clip``, ecg) acts on each
        # model's own gradient norm and members stay independent of each other.
        groups = [{"params": list(m.parameters())} for m in _unwrap(model).models.values()]
        self.optimizer = ClippedSGD(groups, lr=c.lr, momentum=c.momentum, max_norm=getattr(c, "grad_clip", 0.0))
        return self.optimizer

    def _stats(self, epoch: int) -> dict:
        return self.epoch_stats.setdefault(str(epoch), {
            "steps": 0, "train_s": 0.0,
            **{f"{k}_{s}": 0 for k in self.member_names for s in ("nfe_forward", "nfe_backward")}})

    def _harvest(self) -> None:
        """Add the backward NFE of the last training step (known only after backward())."""
        if self._pending is None:
            return
        stats = self._stats(self._pending)
        for name, m in self.model.models.items():
            nfe = getattr(m, "nfe_backward", None)
            if nfe is not None:
                stats[f"{name}_nfe_backward"] += int(nfe)
        self._pending = None

    def _begin_step(self, position: Position) -> float:
        """The bookkeeping before a training step's forward passes: the time since the last
        step is training time, the last step's backward NFE are harvested, the learning rate
        of ``position.epoch`` is set. Returns the clock reading for :meth:`_end_step`."""
        now = time.perf_counter()
        if self._clock is not None and self._clock[0] == position.epoch:
            self._stats(position.epoch)["train_s"] += now - self._clock[1]
        self._harvest()
        lr = self._lr(position.epoch)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return now

    def _member_ce(self, name: str, member: nn.Module, logits: torch.Tensor, y: torch.Tensor,
                   position: Position, extra: dict, several: bool) -> torch.Tensor:
        """One member's cross-entropy (this rank's share of the global batch mean); logs it as
        ``NAME_loss`` when there are ``several`` members, and its forward NFE."""
        ce = distributed.global_mean(F.cross_entropy(logits, y, reduction="sum"), self.config.batch_size)
        if several:
            extra[f"{name}_loss"] = ce
        nfe = getattr(member, "nfe_forward", None)
        if nfe is not None:
            self._stats(position.epoch)[f"{name}_nfe_forward"] += int(nfe)
            extra[f"{name}_nfe_forward"] = int(nfe)
        return ce

    def _end_step(self, position: Position, now: float) -> None:
        self._stats(position.epoch)["steps"] += 1
        self._pending = position.epoch
        self._clock = (position.epoch, now)

    def loss(self, model, batch, position):
        now = self._begin_step(position)
        x, y = batch
        members = _unwrap(model).models
        logits = model(x)
        total, extra = 0.0, {}
        for name, out in logits.items():
            total = total + self._member_ce(name, members[name], out, y, position, extra, len(logits) > 1)
        self._end_step(position, now)
        return total, extra

    # -- evaluation -----------------------------------------------------------------
    def _eval_counts(self, model: nn.Module) -> dict[str, tuple[torch.Tensor, float]]:
        """Per member: the confusion matrix and the summed cross-entropy over the test set
        (each rank evaluates its contiguous shard; sums are all-reduced)."""
        n = int(self.test_y.shape[0])
        idx = torch.as_tensor(distributed.shard(np.arange(n)))
        k = len(self.class_names)
        members = _unwrap(model).models
        conf = {m: torch.zeros(k, k, dtype=torch.float64) for m in members}
        ce = {m: torch.zeros((), dtype=torch.float64) for m in members}
        with torch.no_grad():
            for start in range(0, len(idx), self.config.eval_batch):
                sel = idx[start:start + self.config.eval_batch]
                x = self._eval_input(self.test_x[sel]).to(self.device)
                y = self.test_y[sel].to(self.device)
                for name, m in members.items():
                    out = m(x)
                    ce[name] += F.cross_entropy(out, y, reduction="sum").double().cpu()
                    pred = out.argmax(1)
                    conf[name] += torch.bincount((y * k + pred).cpu(), minlength=k * k).view(k, k).double()
        out = {}
        for name in members:
            packed = distributed.all_reduce_sum(torch.cat([conf[name].flatten(), ce[name].view(1)]))
            out[name] = (packed[:-1].view(k, k).long(), float(packed[-1]) / n)
        return out

    def _eval_input(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def evaluate(self, model, position, run):
        self._harvest()
        t0 = time.perf_counter()
        result = {}
        for name, (conf, ce) in self._eval_counts(model).items():
            result[f"{name}_test_ce"] = ce
            result[f"{name}_accuracy"] = float(conf.diagonal().sum() / conf.sum())
        if self._clock is not None:  # evaluation time is not training time
            self._clock = (self._clock[0], self._clock[1] + time.perf_counter() - t0)
        return result

    @staticmethod
    def per_class(conf: torch.Tensor) -> dict[str, list[float]]:
        conf = conf.double()
        tp = conf.diagonal()
        precision = torch.where(conf.sum(0) > 0, tp / conf.sum(0).clamp(min=1), torch.zeros_like(tp))
        recall = torch.where(conf.sum(1) > 0, tp / conf.sum(1).clamp(min=1), torch.zeros_like(tp))
        f1 = torch.where(precision + recall > 0, 2 * precision * recall / (precision + recall).clamp(min=1e-12),
                         torch.zeros_like(tp))
        return {"precision": precision.tolist(), "recall": recall.tolist(), "f1": f1.tolist()}

    def _memory(self, name: str, member: nn.Module) -> dict:
        x = self._eval_input(self.test_x[: self.config.batch_size]).to(self.device)
        y = self.test_y[: self.config.batch_size].to(self.device)
        out = {f"{name}_activation_mib": saved_activation_bytes(member, x, y) / 2**20}
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            base = torch.cuda.memory_allocated(self.device)
            F.cross_entropy(member(x), y).backward()
            member.zero_grad(set_to_none=True)
            out[f"{name}_peak_cuda_mib"] = (torch.cuda.max_memory_allocated(self.device) - base) / 2**20
        return out

    def finish(self, model, run: RunContext) -> dict:
        self._harvest()
        metrics: dict = {}
        results = self._eval_counts(model)
        epochs = sorted(self.epoch_stats, key=int)
        for name, (conf, ce) in results.items():
            member = model.models[name]
            pc = self.per_class(conf)
            metrics[f"{name}_test_ce"] = ce
            metrics[f"{name}_accuracy"] = float(conf.diagonal().sum() / conf.sum())
            metrics[f"{name}_macro_f1"] = float(np.mean(pc["f1"]))
            metrics[f"{name}_parameters"] = count_parameters(member)
            for key, values in pc.items():
                metrics[f"{name}_{key}"] = [round(v, 4) for v in values]
            metrics[f"{name}_confusion"] = conf.tolist()
            steps = [max(1, self.epoch_stats[e]["steps"]) for e in epochs]
            if getattr(member, "nfe_forward", None) is not None:
                metrics[f"{name}_nfe_forward_per_epoch"] = [
                    round(self.epoch_stats[e][f"{name}_nfe_forward"] / s, 2) for e, s in zip(epochs, steps)]
                if any(self.epoch_stats[e][f"{name}_nfe_backward"] for e in epochs):
                    metrics[f"{name}_nfe_backward_per_epoch"] = [
                        round(self.epoch_stats[e][f"{name}_nfe_backward"] / s, 2) for e, s in zip(epochs, steps)]
            metrics.update(self._memory(name, member))
        metrics["train_s_per_epoch"] = [round(self.epoch_stats[e]["train_s"], 2) for e in epochs]
        metrics["train_samples_per_s"] = _throughput(self.epoch_stats, epochs, self.config.batch_size)
        metrics["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        metrics["train_examples"] = self.n_train
        metrics["test_examples"] = int(self.test_y.shape[0])
        if run.world_size > 1:
            metrics["world_size"] = run.world_size
            metrics["rank_parameter_max_diff"] = distributed.parameter_max_difference(model)
        if run.is_main:
            self._plot_curves(run)
            self._plot_confusion(run, results)
            self._plot_nfe(run, metrics)
        return metrics

    # -- plots ----------------------------------------------------------------------
    def _plot_curves(self, run):
        evals = [r for r in run.history() if r.get("split") == "eval"]
        train = [r for r in run.history() if r.get("split") == "train"]
        if not evals:
            return
        per_epoch = self.steps_per_epoch
        fig = figure(figsize=(11, 3.6))
        ax_loss, ax_ce, ax_acc = fig.subplots(1, 3)
        for name in self.member_names:
            key = f"{name}_loss" if len(self.member_names) > 1 else "loss"
            pts = [(r["step"] / per_epoch, r[key]) for r in train if key in r]
            if pts:
                ax_loss.plot(*zip(*pts), lw=1, label=name)
            ep = [r["step"] / per_epoch for r in evals]
            ax_ce.plot(ep, [r[f"{name}_test_ce"] for r in evals], "o-", ms=3, label=name)
            ax_acc.plot(ep, [100 * r[f"{name}_accuracy"] for r in evals], "o-", ms=3, label=name)
        for ax, title in ((ax_loss, "training loss"), (ax_ce, "test cross-entropy"), (ax_acc, "test accuracy (%)")):
            ax.set_xlabel("epoch")
            ax.set_title(title)
            ax.grid(alpha=0.3)
        ax_acc.legend(fontsize=8)
        run.save_figure(fig, "learning_curves")

    def _plot_confusion(self, run, results):
        panels = []
        for name, (conf, _) in results.items():
            panels.append((f"{name} (ours)", conf.double()))
            if name in self.seed_confusion:
                panels.append((f"{name} (seed)", torch.tensor(self.seed_confusion[name], dtype=torch.float64)))
        fig = figure(figsize=(3.3 * len(panels), 3.4))
        axes = fig.subplots(1, len(panels), squeeze=False)[0]
        k = len(self.class_names)
        for ax, (title, conf) in zip(axes, panels):
            rate = conf / conf.sum(1, keepdim=True).clamp(min=1)  # row-normalised: recall per class
            ax.imshow(rate.numpy(), cmap="Blues", vmin=0, vmax=1)
            for i in range(k):
                for j in range(k):
                    ax.text(j, i, f"{int(conf[i, j])}", ha="center", va="center", fontsize=6 if k > 5 else 7,
                            color="white" if rate[i, j] > 0.5 else "black")
            ax.set_xticks(range(k), self.class_names, fontsize=7)
            ax.set_yticks(range(k), self.class_names, fontsize=7)
            ax.set_xlabel("predicted")
            ax.set_title(title, fontsize=9)
        axes[0].set_ylabel("true")
        fig.suptitle("test confusion matrices (counts; shade: fraction of the true class)", fontsize=9)
        run.save_figure(fig, "confusion")

    def _plot_nfe(self, run, metrics):
        names = [n for n in self.member_names if f"{n}_nfe_forward_per_epoch" in metrics]
        if not names:
            return
        fig = figure(figsize=(5, 3.4))
        ax = fig.subplots()
        for name in names:
            f = metrics[f"{name}_nfe_forward_per_epoch"]
            ax.plot(range(1, len(f) + 1), f, "o-", ms=3, label=f"{name} forward")
            b = metrics.get(f"{name}_nfe_backward_per_epoch")
            if b:
                ax.plot(range(1, len(b) + 1), b, "s--", ms=3, label=f"{name} backward")
        ax.set_xlabel("epoch")
        ax.set_ylabel("NFE per training step (mean)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        run.save_figure(fig, "nfe")

    seed_confusion: dict = {}

    # -- resume ---------------------------------------------------------------------
    def state_dict(self) -> dict:
        self._harvest()
        return {"epoch_stats": {e: dict(s) for e, s in self.epoch_stats.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.epoch_stats = {e: dict(s) for e, s in state["epoch_stats"].items()}


def _throughput(stats: dict, epochs: list[str], batch: int) -> float:
    steps = sum(stats[e]["steps"] for e in epochs)
    seconds = sum(stats[e]["train_s"] for e in epochs)
    # train_s covers step k from its loss() to the next loss(): one step per epoch is not timed.
    timed = steps - len(epochs)
    return round(timed * batch / seconds, 1) if seconds > 0 and timed > 0 else math.nan


class ECG(Classification):
    name = "ecg"
    description = "ResNet vs RK-Net vs ODE-Net on MIT-BIH heartbeats (seed accuracy 97.5% / 97.8%)"
    Config = ECGConfig
    kinds = ("resnet", "rknet", "odenet")
    class_names = CLASSES
    builder = staticmethod(sequence_classifier)
    seed_confusion = SEED_CONFUSION
    references = {
        "resnet_test_ce": Reference(0.1, "ResNet test cross-entropy"),
        "odenet_test_ce": Reference(0.09, "ODE-Net test cross-entropy"),
        "resnet_accuracy": Reference(0.975, "ResNet test accuracy"),
        "odenet_accuracy": Reference(0.978, "ODE-Net test accuracy"),
    }

    @classmethod
    def resolve(cls, config: ECGConfig) -> ECGConfig:
        if not 0 < config.test_fraction < 1:
            raise ConfigError("test_fraction must be between 0 and 1")
        try:
            config = dataclasses.replace(config, data_dir=str(find_data_dir("mitbih", config.data_dir)))
        except FileNotFoundError as exc:
            raise ConfigError(f"ecg: {exc}") from None
        try:
            _load_split(config.data_dir, config.split, config.test_fraction, config.seed)
        except (OSError, ValueError, EOFError) as exc:
            if isinstance(exc, ConfigError):
                raise
            raise DataError(f"ecg: cannot load its data: {exc}") from None
        train, _ = _load_split(config.data_dir, config.split, config.test_fraction, config.seed)
        n = len(train) if config.train_size <= 0 else min(config.train_size, len(train))
        if n < config.batch_size:
            raise ConfigError(f"train_size={n} is smaller than batch_size={config.batch_size}")
        return cls._resolve_eval_every(config, n // config.batch_size)

    def _data(self):
        c = self.config
        train, test = _load_split(c.data_dir, c.split, c.test_fraction, c.seed)
        train = train.subset(stratified_subset(train.y, c.train_size, c.seed))
        test = test.subset(stratified_subset(test.y, c.test_size, c.seed))
        self.train_records = None if train.records is None else sorted(set(train.records.tolist()))
        self.test_records = None if test.records is None else sorted(set(test.records.tolist()))
        return train.x, train.y, test.x, test.y

    def finish(self, model, run):
        metrics = super().finish(model, run)
        metrics["split"] = self.config.split
        if self.config.split == "patient":
            metrics["train_records"] = self.train_records
            metrics["test_records"] = self.test_records
        return metrics
