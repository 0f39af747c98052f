"""``robustness``: Yan, Du, Tan and Feng (ICLR 2020), "On robustness of neural ordinary
differential equations", on MNIST.

Three networks of comparable size (:func:`neuralode.models.robust_classifier`, the layout of the
authors' code): a CNN with one residual block (141,130 parameters), an ODE-Net with a
time-dependent field (142,410; forward Euler, step 0.1 on ``[0, 1]``) and TisODE, a
*time-invariant* field (141,130; Euler step 0.05) trained with the steady-state regulariser
``0.01 * mean |int_{0.9}^{1.5} |f(z(t))| dt|`` (:class:`neuralode.models.TisODENet`). Each is
trained twice, on clean images and with Gaussian-noise augmentation (each training image, with
probability 1/2, gets noise of a standard deviation drawn from {50, 75, 100} on the 0-255 scale,
then clipped to [0, 1]), so six members train side by side on the same batches.

Evaluation, per member: test accuracy on clean images, under Gaussian noise of standard deviation
50, 75 and 100 (on the 0-255 scale), and under the white-box attacks FGSM (epsilon 0.15, 0.3, 0.5)
and PGD (epsilon 0.2 and 0.3, 10 steps of 0.04 and 0.06; no random start), pixels in [0, 1] and
every attack projected onto the epsilon-ball and [0, 1]. The attacks are ours
(:func:`fgsm`, :func:`pgd`: signed gradient of the cross-entropy); the authors' code takes the
same signed steps on a Carlini-Wagner loss and attacks 1,000 random test images.

The authors' training (their code release): Adam, lr 1e-3, weight decay 5e-4, batch 128, 100
epochs, learning rate times 0.2 at epochs 30, 60 and 90; the steady-state term switched on from
epoch 5; 64 feature maps. ::

    neuralode run robustness --set channels=64 batch_size=128 lr=1e-3 train_size=0 test_size=0 attack_size=1000 epochs=100 steady_from_epoch=5

The CPU default is a subset with small networks, chosen so that the six members learn in about
four minutes of one CPU thread: ``channels=16`` (the authors' layout with 16 feature maps; a
training step takes about a sixth of the time), one epoch of a class-stratified ``train_size=19200``
at ``batch_size=32`` and ``lr=1e-2`` (600 Adam steps; at the authors' lr 1e-3 these networks
were still below 50% after 400 steps), Gaussian noise on ``test_size=1000`` test images and
FGSM/PGD on ``attack_size=100`` of them. Its members reach 80-90% clean accuracy
(docs/classification.md has the measured table), far from the authors' ~99%: a comparison of weak
models, not a reproduction. Results: ``robustness.json`` (the table), the summary metrics
``MEMBER_CONDITION`` (e.g. ``odenet_noise_fgsm0.3``) and ``plots/robustness.png``.

References
----------
.. [1] H. Yan, J. Du, V. Y. F. Tan, J. Feng, "On Robustness of Neural Ordinary Differential
   Equations", ICLR 2020. https://arxiv.org/abs/1910.05513 ; code: https://github.com/HanshuYAN/TisODE
.. [2] I. Goodfellow, J. Shlens, C. Szegedy, "Explaining and harnessing adversarial examples",
   ICLR 2015 (FGSM).
.. [3] A. Madry, A. Makelov, L. Schmidt, D. Tsipras, A. Vladu, "Towards deep learning models
   resistant to adversarial attacks", ICLR 2018 (PGD).
"""

from __future__ import annotations

import dataclasses
from typing import Annotated, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from neuralode.models import robust_classifier

from . import distributed
from .base import Position, Reference
from .config import ConfigError, NonNegFloat, NonNegInt, PosFloat, PosInt, Range, RunConfig
from .ecg import Classification, Members, _unwrap
from .mnist import locate_mnist, mnist_subsets
from .runner import figure

__all__ = ["Robustness", "RobustnessConfig", "add_gaussian_noise", "fgsm", "pgd"]

KINDS = ("cnn", "odenet", "tisode")
TRAININGS = ("clean", "noise")

#: FGSM accuracies in the authors' code release (``sharing_MNIST_FGSM.txt``): the three
#: Gaussian-augmented models of each kind, 1,000 random test images, their attack. The log has no
#: PGD figures and none for TisODE at epsilon 0.15 (those attacks were switched off in that run).
AUTHORS_FGSM = {
    "cnn_noise": {0.15: (0.855, 0.855, 0.857), 0.3: (0.545, 0.524, 0.544), 0.5: (0.168, 0.161, 0.143)},
    "odenet_noise": {0.15: (0.941, 0.933, 0.938), 0.3: (0.723, 0.708, 0.703), 0.5: (0.194, 0.212, 0.188)},
    "tisode_noise": {0.3: (0.749, 0.786, 0.781), 0.5: (0.375, 0.359, 0.278)},
}
_AUTHORS = "Yan et al. (2020) code release, sharing_MNIST_FGSM.txt (mean of 3 models)"


def fgsm(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float) -> torch.Tensor:
    """Fast gradient sign method: ``clip(x + eps * sign(grad_x CE(model(x), y)), 0, 1)``.

    Parameters
    ----------
    model : nn.Module
        Maps ``(N, C, H, W)`` images in [0, 1] to logits; left in whatever mode it is in.
    x : Tensor, shape (N, C, H, W)
        Clean images in [0, 1].
    y : Tensor, shape (N,)
        True labels.
    eps : float
        L-infinity budget.

    Returns
    -------
    Tensor
        Adversarial images, detached, with ``|x_adv - x| <= eps`` and values in [0, 1].
    """
    return pgd(model, x, y, eps, step=eps, steps=1)


def pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, step: float, steps: int) -> torch.Tensor:
    """Projected gradient descent on the cross-entropy in the L-infinity ball (Madry et al. 2018).

    ``steps`` times: ``x_adv <- P(x_adv + step * sign(grad))`` where ``P`` clips to
    ``[x - eps, x + eps]`` and to [0, 1]. Starts at ``x`` (no random start, as the authors' attack).
    Only the input is differentiated; parameter gradients are left untouched.
    """
    if not eps >= 0 or not step >= 0 or steps < 1:
        raise ValueError(f"need eps >= 0, step >= 0 and steps >= 1, got {eps}, {step}, {steps}")
    x = x.detach()
    low, high = (x - eps).clamp(min=0.0), (x + eps).clamp(max=1.0)
    x_adv = x.clone()
    with torch.enable_grad():
        for _ in range(steps):
            x_adv.requires_grad_(True)
            loss = F.cross_entropy(model(x_adv), y, reduction="sum")
            (grad,) = torch.autograd.grad(loss, x_adv)
            x_adv = torch.minimum(torch.maximum(x_adv.detach() + step * grad.sign(), low), high)
    return x_adv.detach()


def add_gaussian_noise(x: torch.Tensor, std: torch.Tensor | float, rng: np.random.Generator) -> torch.Tensor:
    """``clip(x + N(0, (std/255)^2), 0, 1)``: noise with standard deviation ``std`` on the 0-255
    scale (per image when ``std`` has shape ``(N,)``), drawn from ``rng``."""
    noise = torch.from_numpy(rng.standard_normal(tuple(x.shape), dtype=np.float32)).to(x.device)
    std = torch.as_tensor(std, dtype=x.dtype, device=x.device)
    if std.dim() == 1:
        std = std.view(-1, *([1] * (x.dim() - 1)))
    return (x + noise * (std / 255.0)).clamp(0.0, 1.0)


@dataclasses.dataclass
class RobustnessConfig(RunConfig):
    """Configuration of ``robustness``.

    Attributes
    ----------
    models : tuple of {"cnn", "odenet", "tisode"}
        Which networks to train.
    trainings : tuple of {"clean", "noise"}
        ``clean``: original images; ``noise``: Gaussian-noise augmentation (each trained separately;
        members are named ``MODEL_TRAINING``).
    data_dir : str
        Folder with the MNIST IDX files (empty: the data rule of docs/data.md).
    train_size, test_size : int
        Class-stratified subsets (0: all 60,000 / 10,000). Noise is evaluated on the test subset.
    attack_size : int
        Test images attacked by FGSM and PGD: the first of a seeded permutation of the test subset
        (0: all of it). The authors attack 1,000 random test images.
    epochs, batch_size, lr, weight_decay : Adam training (paper: 100, 128, 1e-3, 5e-4; the CPU
        default: 1, 32, 1e-2, 5e-4).
    lr_decay_epochs, lr_decay : learning rate times ``lr_decay`` at these epochs (30, 60, 90; 0.2).
    channels : int
        Feature maps (64: the authors' networks; the CPU default 16).
    odenet_step, tisode_step : float
        Euler steps of the ODE-Net (0.1) and of TisODE (0.05).
    tisode_time : float
        TisODE's output time ``T`` (1.0).
    steady_window : pair of float
        ``(t_a, t_b)`` of the steady-state integral (0.9, 1.5).
    steady_weight : float
        Weight of the steady-state term (0.01).
    steady_from_epoch : int
        First epoch (0-based) with the steady-state term (the authors': 5).
    train_noise_stds, train_noise_prob : augmentation of ``noise`` trainings: with probability
        ``train_noise_prob`` an image gets noise of a standard deviation drawn from the tuple.
    noise_stds : tuple of float
        Gaussian test noise, standard deviations on the 0-255 scale (50, 75, 100).
    fgsm_eps : tuple of float
        FGSM budgets in [0, 1] pixel units (0.15, 0.3, 0.5).
    pgd_eps, pgd_step : tuple of float
        PGD budgets (0.2, 0.3) and their step sizes (0.04, 0.06), pairwise.
    pgd_steps : int
        PGD iterations (10).
    eval_batch : int
        Batch size of the evaluation passes and attacks.
    eval_every : int
        ``-1``: clean test accuracy at the end of every epoch.
    """

    models: tuple[Literal["cnn", "odenet", "tisode"], ...] = KINDS
    trainings: tuple[Literal["clean", "noise"], ...] = TRAININGS
    data_dir: str = ""
    train_size: NonNegInt = 19_200
    test_size: NonNegInt = 1000
    attack_size: NonNegInt = 100
    epochs: PosInt = 1
    batch_size: PosInt = 32
    lr: float = 1e-2
    weight_decay: NonNegFloat = 5e-4
    lr_decay_epochs: tuple[NonNegInt, ...] = (30, 60, 90)
    lr_decay: PosFloat = 0.2
    channels: PosInt = 16
    odenet_step: PosFloat = 0.1
    tisode_step: PosFloat = 0.05
    tisode_time: PosFloat = 1.0
    steady_window: tuple[float, ...] = (0.9, 1.5)
    steady_weight: NonNegFloat = 0.01
    steady_from_epoch: NonNegInt = 0
    train_noise_stds: tuple[PosFloat, ...] = (50.0, 75.0, 100.0)
    train_noise_prob: Annotated[float, Range(0, 1)] = 0.5
    noise_stds: tuple[PosFloat, ...] = (50.0, 75.0, 100.0)
    fgsm_eps: tuple[Annotated[float, Range(0, 1, low_open=True)], ...] = (0.15, 0.3, 0.5)
    pgd_eps: tuple[Annotated[float, Range(0, 1, low_open=True)], ...] = (0.2, 0.3)
    pgd_step: tuple[Annotated[float, Range(0, 1, low_open=True)], ...] = (0.04, 0.06)
    pgd_steps: PosInt = 10
    eval_batch: PosInt = 100
    eval_every: Annotated[int, Range(-1)] = -1
    log_every: PosInt = 1
    checkpoint_every: PosInt = 20


class _PerMemberInput(Members):
    """Members that each take their own input: ``forward({name: x})`` (clean or noisy images);
    a plain tensor goes to every member."""

    def forward(self, x) -> dict[str, torch.Tensor]:
        if isinstance(x, torch.Tensor):
            return super().forward(x)
        return {name: m(x[name]) for name, m in self.models.items()}


def _check(config: RobustnessConfig) -> None:
    """ConfigError naming the option for values no run can use."""

    def choices(name, allowed):
        value = getattr(config, name)
        if not value:
            raise ConfigError(f"{name} is empty; give at least one of {', '.join(allowed)}")
        bad = [v for v in value if v not in allowed]
        if bad:
            raise ConfigError(f"{name}={','.join(map(str, value))}: {bad[0]!r} is not one of {', '.join(allowed)}")
        if len(set(value)) != len(value):
            raise ConfigError(f"{name}={','.join(value)} names a value twice")

    choices("models", KINDS)
    choices("trainings", TRAININGS)
    for name in ("train_size", "test_size", "attack_size", "steady_from_epoch"):
        if getattr(config, name) < 0:
            raise ConfigError(f"{name}={getattr(config, name)} is invalid; it must be >= 0")
    for name in ("channels", "pgd_steps", "eval_batch"):
        if getattr(config, name) < 1:
            raise ConfigError(f"{name}={getattr(config, name)} is invalid; it must be >= 1")
    for name in ("odenet_step", "tisode_step", "tisode_time", "lr_decay"):
        if not getattr(config, name) > 0:
            raise ConfigError(f"{name}={getattr(config, name)} is invalid; it must be > 0")
    for name in ("weight_decay", "steady_weight"):
        if not getattr(config, name) >= 0:
            raise ConfigError(f"{name}={getattr(config, name)} is invalid; it must be >= 0")
    if not 0.0 <= config.train_noise_prob <= 1.0:
        raise ConfigError(f"train_noise_prob={config.train_noise_prob} is invalid; it must be in [0, 1]")
    for name in ("train_noise_stds", "noise_stds"):
        if any(not s > 0 for s in getattr(config, name)):
            raise ConfigError(f"{name}={getattr(config, name)}: standard deviations (0-255 scale) must be > 0")
    if "noise" in config.trainings and not config.train_noise_stds:
        raise ConfigError("train_noise_stds is empty but trainings includes noise; give e.g. 50,75,100")
    for name in ("fgsm_eps", "pgd_eps", "pgd_step"):
        if any(not 0 < e <= 1 for e in getattr(config, name)):
            raise ConfigError(f"{name}={getattr(config, name)}: budgets and steps are pixel units in (0, 1]")
    if len(config.pgd_step) != len(config.pgd_eps):
        raise ConfigError(f"pgd_step has {len(config.pgd_step)} values but pgd_eps has {len(config.pgd_eps)}; "
                          f"give one step size per budget (the paper's: pgd_eps=0.2,0.3 pgd_step=0.04,0.06)")
    window = config.steady_window
    if len(window) != 2 or not 0 < window[0] < window[1]:
        raise ConfigError(f"steady_window={window} is invalid; give (t_a, t_b) with 0 < t_a < t_b, e.g. 0.9,1.5")


class Robustness(Classification):
    name = "robustness"
    description = "CNN vs ODE-Net vs TisODE under Gaussian noise, FGSM and PGD on MNIST (Yan et al. 2020)"
    Config = RobustnessConfig
    kinds = KINDS
    class_names = tuple(str(d) for d in range(10))
    references = {
        f"{member}_fgsm{eps:g}": Reference(round(float(np.mean(v)), 4), f"{member} FGSM {eps:g} accuracy", _AUTHORS)
        for member, by_eps in AUTHORS_FGSM.items() for eps, v in by_eps.items()
    }

    @classmethod
    def resolve(cls, config: RobustnessConfig) -> RobustnessConfig:
        _check(config)
        n = 60_000 if config.train_size <= 0 else min(config.train_size, 60_000)
        if n < config.batch_size:
            raise ConfigError(f"train_size={n} is smaller than batch_size={config.batch_size}")
        config = dataclasses.replace(config, data_dir=locate_mnist(config.data_dir, cls.name))
        return cls._resolve_eval_every(config, n // config.batch_size)

    @property
    def member_names(self) -> list[str]:
        return [f"{k}_{t}" for t in self.config.trainings for k in self.config.models]

    def _build(self, name: str) -> nn.Module:
        c = self.config
        kind = name.rsplit("_", 1)[0]
        if kind == "cnn":
            return robust_classifier("cnn", channels=c.channels)
        if kind == "odenet":
            return robust_classifier("odenet", channels=c.channels, step_size=c.odenet_step)
        return robust_classifier("tisode", channels=c.channels, step_size=c.tisode_step,
                                 t_end=c.tisode_time, steady=c.steady_window)

    def build_model(self) -> nn.Module:
        self.model = _PerMemberInput({k: self._build(k) for k in self.member_names}).to(self.device)
        return self.model

    def build_optimizer(self, model):
        c = self.config
        groups = [{"params": list(m.parameters())} for m in _unwrap(model).models.values()]
        # torch's Adam with weight_decay adds it to the gradient (L2, not AdamW), as torch 1.x did
        # for the authors' optim.Adam(..., weight_decay=5e-4).
        self.optimizer = torch.optim.Adam(groups, lr=c.lr, weight_decay=c.weight_decay)
        return self.optimizer

    def _lr(self, epoch: int) -> float:
        c = self.config
        return c.lr * c.lr_decay ** sum(epoch >= e for e in c.lr_decay_epochs)

    # -- data -----------------------------------------------------------------------
    def _data(self):
        c = self.config
        return mnist_subsets(c.data_dir, c.train_size, c.test_size, c.seed, self.name)

    def _transform(self, x: torch.Tensor, position: Position) -> torch.Tensor:
        return x.float() / 255.0

    def _eval_input(self, x: torch.Tensor) -> torch.Tensor:
        return x.float() / 255.0

    def batch(self, position: Position):
        x, y = super().batch(position)
        inputs = {name: x for name in self.member_names}
        if "noise" in self.config.trainings:
            noisy = self._augment(x, position)
            inputs.update({name: noisy for name in self.member_names if name.endswith("_noise")})
        return inputs, y

    def _augment(self, x: torch.Tensor, position: Position) -> torch.Tensor:
        """The authors' augmentation, drawn for the whole global batch from a generator seeded by
        the position (resume and every rank see the same noise), then this rank's rows."""
        c = self.config
        rng = np.random.default_rng([c.seed, position.epoch, position.index, 2])
        mask = rng.random(c.batch_size) < c.train_noise_prob
        stds = rng.choice(np.asarray(c.train_noise_stds, dtype=np.float32), size=c.batch_size)
        noise = rng.standard_normal((c.batch_size, *x.shape[1:]), dtype=np.float32)
        rows = distributed.shard(np.arange(c.batch_size))
        scale = torch.from_numpy((mask * stds / 255.0).astype(np.float32)[rows]).to(x.device)
        noise = torch.from_numpy(noise[rows]).to(x.device)
        return (x + noise * scale.view(-1, *([1] * (x.dim() - 1)))).clamp(0.0, 1.0)

    # -- loss -----------------------------------------------------------------------
    def _steady(self, member: nn.Module, position: Position) -> torch.Tensor | None:
        """TisODE's steady-state term of the member's last forward pass (this rank's share of
        the batch mean), or None: not a TisODE, weight 0, or before ``steady_from_epoch``."""
        c = self.config
        steady = getattr(member, "steady_state", None)
        if steady is None or c.steady_weight == 0 or position.epoch < c.steady_from_epoch:
            return None
        return distributed.global_mean(steady.sum(), c.batch_size)

    def loss(self, model, batch, position):
        """The members' losses summed: what :meth:`train_step` descends, member by member."""
        total, extra = super().loss(model, batch, position)
        for name, member in _unwrap(model).models.items():
            steady = self._steady(member, position)
            if steady is not None:
                total = total + self.config.steady_weight * steady
                extra[f"{name}_steady"] = steady
        return total, extra

    def train_step(self, model, batch, position, optimizer):
        """One Adam step of every member, one member's autograd graph alive at a time.

        The loop's default (one backward pass over :meth:`loss`) keeps the graphs of all six
        members of a batch at once: 5.0 GiB at ``channels=64`` and batch 128, most of it the two
        TisODEs, which save every one of their 30 Euler steps. The members share no parameters,
        so the gradient of the summed loss with respect to a member's parameters is that of the
        member's own loss: each member here runs forward, loss and backward before the next one
        starts, then one ``optimizer.step()`` updates every parameter group from its own
        gradient. The parameters, Adam state and logged values are bitwise those of the joint
        step (tested), so checkpoints and resume are unchanged.

        Under DDP the members are called unwrapped (DDP's reducer expects one backward per
        forward of the whole module), and each member's gradients are averaged over the ranks
        here, in one all-reduce, as DDP would average them.
        """
        inputs, y = batch
        members = _unwrap(model).models
        _, world = distributed.rank_and_world()
        now = self._begin_step(position)
        optimizer.zero_grad(set_to_none=True)
        ces, steadies, extra, steady_extra = [], [], {}, {}
        for name, member in members.items():
            ce = self._member_ce(name, member, member(inputs[name]), y, position, extra, len(members) > 1)
            loss = ce
            steady = self._steady(member, position)
            if steady is not None:
                loss = ce + self.config.steady_weight * steady
                steadies.append(steady.detach())
                steady_extra[f"{name}_steady"] = steady.detach()
            loss.backward()  # frees this member's graph before the next member's forward
            if world > 1:
                _average_gradients(member, world)
            ces.append(ce.detach())
            if len(members) > 1:
                extra[f"{name}_loss"] = extra[f"{name}_loss"].detach()
        self._end_step(position, now)
        optimizer.step()
        total = 0.0  # summed as loss() sums it, so the logged loss is the same number
        for ce in ces:
            total = total + ce
        for steady in steadies:
            total = total + self.config.steady_weight * steady
        return total, {**extra, **steady_extra}

    # -- the robustness table -------------------------------------------------------
    def conditions(self) -> list[tuple[str, str, float]]:
        """``(key, kind, level)`` of every test condition, in table order."""
        c = self.config
        return ([("clean", "clean", 0.0)]
                + [(f"gauss{s:g}", "gauss", s) for s in c.noise_stds]
                + [(f"fgsm{e:g}", "fgsm", e) for e in c.fgsm_eps]
                + [(f"pgd{e:g}", "pgd", e) for e in c.pgd_eps])

    def _attack_indices(self) -> torch.Tensor:
        n = int(self.test_y.shape[0])
        order = np.random.default_rng([self.config.seed, 11]).permutation(n)
        k = self.config.attack_size
        return torch.from_numpy(order if k <= 0 or k >= n else order[:k]).long()

    def robustness_table(self, model: nn.Module) -> dict[str, dict[str, float]]:
        """Accuracy of every member under every condition: ``{member: {condition: accuracy}}``.

        Noise: the same noisy copies of the test subset for every member (one generator per
        standard deviation). Attacks: on the attack subset, each member attacked through its own
        gradients, in evaluation mode."""
        c = self.config
        members = _unwrap(model).models
        was_training = {name: m.training for name, m in members.items()}
        for m in members.values():
            m.eval()
        x_all, y_all = self._eval_input(self.test_x), self.test_y
        attack = self._attack_indices()
        pgd_steps = dict(zip(c.pgd_eps, c.pgd_step))
        table = {name: {} for name in members}
        plan = self.conditions()
        try:
            bar = _progress(len(plan) * len(members))
            for key, kind, level in plan:
                if kind in ("clean", "gauss"):
                    x = x_all if kind == "clean" else add_gaussian_noise(
                        x_all, level, np.random.default_rng([c.seed, 3, int(round(level * 1000))]))
                    y = y_all
                else:
                    x, y = x_all[attack], y_all[attack]
                for name, m in members.items():
                    correct = 0
                    for start in range(0, len(y), c.eval_batch):
                        xb = x[start:start + c.eval_batch].to(self.device)
                        yb = y[start:start + c.eval_batch].to(self.device)
                        if kind == "fgsm":
                            xb = fgsm(m, xb, yb, level)
                        elif kind == "pgd":
                            xb = pgd(m, xb, yb, level, pgd_steps[level], c.pgd_steps)
                        with torch.no_grad():
                            correct += int((m(xb).argmax(1) == yb).sum())
                    table[name][key] = correct / max(1, len(y))
                    bar.update(1)
            bar.close()
        finally:
            for name, m in members.items():
                m.train(was_training[name])
        return table

    def finish(self, model, run):
        metrics = super().finish(model, run)
        if not run.is_main:  # one process computes the table: no collectives inside
            return metrics
        table = self.robustness_table(model)
        plan = self.conditions()
        run.write_json("robustness.json", {
            "conditions": [{"key": k, "kind": kind, "level": lvl} for k, kind, lvl in plan],
            "test_examples": int(self.test_y.shape[0]),
            "attack_examples": int(self._attack_indices().shape[0]),
            "accuracy": table,
            "authors_fgsm": {m: {f"fgsm{e:g}": list(v) for e, v in by.items()} for m, by in AUTHORS_FGSM.items()},
            "authors_source": "https://github.com/HanshuYAN/TisODE/blob/master/sharing_MNIST_FGSM.txt",
        })
        for name, row in table.items():
            for key, acc in row.items():
                metrics[f"{name}_{key}"] = acc
        metrics["attack_examples"] = int(self._attack_indices().shape[0])
        self._plot_robustness(run, table)
        return metrics

    def _plot_robustness(self, run, table):
        c = self.config
        fig = figure(figsize=(11, 3.6))
        ax_noise, ax_fgsm, ax_pgd = fig.subplots(1, 3, sharey=True)
        styles = {"clean": ("-", "o"), "noise": ("--", "s")}
        colours = {"cnn": "C0", "odenet": "C1", "tisode": "C2"}
        for name, row in table.items():
            kind, training = name.rsplit("_", 1)
            line, marker = styles[training]
            style = dict(ls=line, color=colours[kind], marker=marker, ms=3, label=name)
            ax_noise.plot([0, *c.noise_stds], [100 * row["clean"], *(100 * row[f"gauss{s:g}"] for s in c.noise_stds)],
                          **style)
            if c.fgsm_eps:
                ax_fgsm.plot(c.fgsm_eps, [100 * row[f"fgsm{e:g}"] for e in c.fgsm_eps], **style)
            if c.pgd_eps:
                ax_pgd.plot(c.pgd_eps, [100 * row[f"pgd{e:g}"] for e in c.pgd_eps], **style)
        for member, by_eps in AUTHORS_FGSM.items():
            if member in table:
                eps = sorted(by_eps)
                ax_fgsm.plot(eps, [100 * np.mean(by_eps[e]) for e in eps], ls=":", color=colours[member.split("_")[0]],
                             marker="x", label=f"{member} (authors)")
        for ax, title, xlabel in ((ax_noise, "Gaussian noise", "standard deviation (0-255 scale)"),
                                  (ax_fgsm, "FGSM", "epsilon"), (ax_pgd, f"PGD ({c.pgd_steps} steps)", "epsilon")):
            ax.set_title(title)
            ax.set_xlabel(xlabel)
            ax.grid(alpha=0.3)
        ax_noise.set_ylabel("test accuracy (%)")
        ax_fgsm.legend(fontsize=6)
        run.save_figure(fig, "robustness")


def _average_gradients(member: nn.Module, world: int) -> None:
    """Replace the member's gradients by their mean over the ``world`` ranks (one all-reduce)."""
    grads = [p.grad for p in member.parameters() if p.grad is not None]
    if not grads:
        return
    flat = distributed.all_reduce_sum(torch.cat([g.flatten() for g in grads])) / world
    for g, mean in zip(grads, torch.split(flat, [g.numel() for g in grads])):
        g.copy_(mean.view_as(g))


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int):
    """A progress bar on a terminal (tqdm decides; none when output is captured or tqdm is absent)."""
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm comes with the cli extra
        return _NoBar()
    return tqdm(total=total, desc="robustness eval", unit="case", disable=None, leave=False)
