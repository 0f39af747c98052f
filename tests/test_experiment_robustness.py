"""`robustness` (Yan et al. 2020): attacks, the TisODE regulariser and field, the run, its config."""

from __future__ import annotations

import json
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from shared_data import shared
from torch import nn

from neuralode.experiments import ConfigError, Experiment, Position, apply_overrides, get_experiment, train
from neuralode.experiments import robustness as robustness_module
from neuralode.experiments.robustness import Robustness, RobustnessConfig, add_gaussian_noise, fgsm, pgd
from neuralode.experiments.ecg import saved_activation_bytes
from neuralode.experiments.runner import CHECKPOINT, Hook, load_checkpoint
from neuralode.models import TisODENet, count_parameters, robust_classifier
from neuralode.nn import Autonomous

# -- attacks ---------------------------------------------------------------------------------


def _toy_problem():
    """Two classes of 1x6x6 images in [0, 1] (dark vs bright, pixels at 0 and 1 included) and a
    logistic-regression classifier trained on them to perfect clean accuracy."""
    g = torch.Generator().manual_seed(0)
    n = 200
    y = torch.arange(n) % 2
    x = (0.35 + 0.3 * y.view(-1, 1, 1, 1) + 0.12 * torch.randn(n, 1, 6, 6, generator=g)).clamp(0, 1)
    x[:4, :, 0, 0] = 0.0
    x[4:8, :, 0, 0] = 1.0
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(36, 2))
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(150):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    model.zero_grad(set_to_none=True)
    return model, x, y


def _accuracy(model, x, y):
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


@pytest.mark.parametrize("attack", ["fgsm", "pgd"])
def test_attacks_stay_in_the_ball_and_the_box_and_lower_accuracy(attack):
    model, x, y = _toy_problem()
    clean = _accuracy(model, x, y)
    assert clean == 1.0
    eps = 0.3
    x_adv = fgsm(model, x, y, eps) if attack == "fgsm" else pgd(model, x, y, eps, step=0.06, steps=10)
    assert x_adv.shape == x.shape and not x_adv.requires_grad
    assert (x_adv - x).abs().max() <= eps + 1e-6
    assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0
    # the corner pixels at 0 and 1 were pushed against the box by some of the attacks
    moved = (x_adv - x).abs() > 1e-6
    assert moved.float().mean() > 0.5
    assert _accuracy(model, x_adv, y) < clean - 0.5
    assert all(p.grad is None for p in model.parameters())  # only the input is differentiated


def test_pgd_is_at_least_as_strong_as_one_small_step_and_fgsm_is_one_full_step():
    model, x, y = _toy_problem()
    eps = 0.15
    one_small = pgd(model, x, y, eps, step=0.03, steps=1)
    many = pgd(model, x, y, eps, step=0.03, steps=10)
    assert _accuracy(model, many, y) <= _accuracy(model, one_small, y)
    assert torch.equal(fgsm(model, x, y, eps), pgd(model, x, y, eps, step=eps, steps=1))


def test_gaussian_noise_is_on_the_0_255_scale_and_clipped():
    x = torch.full((400, 1, 28, 28), 0.5)
    noisy = add_gaussian_noise(x, 50.0, np.random.default_rng(0))
    assert noisy.min() >= 0 and noisy.max() <= 1
    assert (noisy - x).std().item() == pytest.approx(50 / 255, rel=0.02)
    per_image = add_gaussian_noise(x[:2], torch.tensor([0.0, 100.0]), np.random.default_rng(0))
    assert torch.equal(per_image[0], x[0]) and not torch.equal(per_image[1], x[1])


# -- TisODE ----------------------------------------------------------------------------------


class _Field(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, z):
        return self.fn(z)


def _tisode(fn, **kwargs):
    return TisODENet(nn.Identity(), Autonomous(_Field(fn)), nn.Identity(), **kwargs)


def test_steady_state_term_constant_field_by_hand():
    c = torch.tensor([[-1.0, 2.0, 0.0, 3.0]])
    m = _tisode(lambda z: c.expand_as(z), t_end=0.5, steady=(0.3, 0.8), step_size=0.1).train()
    z0 = torch.tensor([[1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0]])
    out = m(z0)
    # mean |f| = (1 + 2 + 0 + 3) / 4 = 1.5 over a window of length 0.5
    assert m.steady_state.shape == (2,)
    assert torch.allclose(m.steady_state, torch.tensor([0.75, 0.75]), atol=1e-6)
    assert torch.allclose(out, z0 + 0.5 * c, atol=1e-6)


def test_steady_state_term_decaying_field_by_hand_with_euler():
    # dz/dt = -z, Euler with h = 0.5: z_k = 0.5^k z0. The window [0.5, 1.5] holds the steps from
    # t = 0.5 (z_1) and t = 1.0 (z_2): h * mean|z0| * (0.5 + 0.25) = 0.5 * 1.5 * 0.75 = 0.5625.
    m = _tisode(lambda z: -z, t_end=1.0, steady=(0.5, 1.5), step_size=0.5).train()
    z0 = torch.tensor([[1.0, -2.0]])
    out = m(z0)
    assert m.steady_state.item() == pytest.approx(0.5625, abs=1e-6)
    assert torch.allclose(out, 0.25 * z0)
    m.eval()
    assert torch.allclose(m(z0), 0.25 * z0) and m.steady_state is None  # evaluation solves [0, T] only


def test_steady_state_term_is_differentiable():
    m = robust_classifier("tisode", channels=4).train()
    m(torch.rand(3, 1, 28, 28))
    m.steady_state.sum().backward()
    assert all(p.grad is not None for p in m.field.parameters())


def test_time_invariant_field_ignores_t_and_odenet_field_does_not():
    torch.manual_seed(0)
    z = torch.randn(2, 4, 5, 5)
    tis = robust_classifier("tisode", channels=4)
    assert isinstance(tis.field, Autonomous)
    assert torch.equal(tis.field(torch.tensor(0.0), z), tis.field(torch.tensor(0.7), z))
    ode = robust_classifier("odenet", channels=4)
    assert not torch.allclose(ode.block.func(torch.tensor(0.0), z), ode.block.func(torch.tensor(0.7), z))


def test_parameter_counts_are_the_authors():
    # the counts printed in the training logs of the authors' code release (channels 64)
    assert [count_parameters(robust_classifier(k)) for k in ("cnn", "odenet", "tisode")] == [141_130, 142_410, 141_130]


# -- the experiment --------------------------------------------------------------------------

TINY = ["train_size=32", "test_size=30", "attack_size=10", "batch_size=8", "channels=4", "eval_batch=16",
        "epochs=1", "checkpoint_every=2", "models=cnn,tisode", "trainings=clean,noise",
        "noise_stds=100", "fgsm_eps=0.3", "pgd_eps=0.3", "pgd_step=0.1", "pgd_steps=2"]


def _config(*extra):
    return apply_overrides(RobustnessConfig(), [f"data_dir={shared('mnist')}", *TINY, *extra])


class _Crash(Hook):
    def after_step(self, run, position, record):
        if position.step == 3:
            raise SystemExit("simulated crash")


def test_run_writes_its_table_and_resumes_exactly(tmp_path):
    ref = train(Robustness, _config(), tmp_path / "ref", progress=False)
    table = json.loads((tmp_path / "ref" / "robustness.json").read_text())
    assert set(table["accuracy"]) == {"cnn_clean", "tisode_clean", "cnn_noise", "tisode_noise"}
    keys = ["clean", "gauss100", "fgsm0.3", "pgd0.3"]
    assert [c["key"] for c in table["conditions"]] == keys
    assert (table["test_examples"], table["attack_examples"]) == (30, 10)
    for member, row in table["accuracy"].items():
        assert set(row) == set(keys) and all(0 <= v <= 1 for v in row.values())
        assert ref["metrics"][f"{member}_fgsm0.3"] == row["fgsm0.3"]
        assert ref["metrics"][f"{member}_accuracy"] == pytest.approx(row["clean"])
    assert ref["metrics"]["tisode_clean_nfe_forward_per_epoch"][0] == 30  # Euler 0.05 to t_b = 1.5
    train_records = [json.loads(line) for line in (tmp_path / "ref" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["tisode_noise_steady"] > 0 for r in train_records if r["split"] == "train")
    assert (tmp_path / "ref" / "plots" / "robustness.png").stat().st_size > 0

    with pytest.raises(SystemExit):
        train(Robustness, _config(), tmp_path / "cut", progress=False, hooks=[_Crash()])
    assert load_checkpoint(tmp_path / "cut" / CHECKPOINT)["step"] == 2
    train(Robustness, _config(), tmp_path / "cut", progress=False, resume=True)
    a, b = (load_checkpoint(tmp_path / d / CHECKPOINT)["model"] for d in ("ref", "cut"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "ref" / "metrics.jsonl").read_text() == (tmp_path / "cut" / "metrics.jsonl").read_text()
    assert (tmp_path / "ref" / "robustness.json").read_text() == (tmp_path / "cut" / "robustness.json").read_text()


def _stepped(step):
    """Initial weights, then model, optimiser, loss and logged scalars after one training step by
    ``step`` (an unbound ``train_step``) of a fresh experiment with the same seed."""
    torch.manual_seed(0)
    exp = Robustness(Robustness.resolve(_config()))
    exp.setup()
    model = exp.build_model()
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = exp.build_optimizer(model)
    position = Position(step=0, epoch=0, index=0)
    loss, scalars = step(exp, model, exp.batch(position), position, optimizer)
    return initial, model.state_dict(), optimizer.state_dict()["state"], loss, scalars


def _value(v):
    return v.detach().item() if isinstance(v, torch.Tensor) else v


def test_member_wise_step_is_the_joint_step_bitwise():
    # The loop's default step (one backward pass over the summed loss of all members, TisODE's
    # steady-state term included) against Robustness.train_step (one member's forward and
    # backward at a time): the same update, Adam state and logged values, to the bit.
    init, a, adam_a, loss_a, logged_a = _stepped(Experiment.train_step)
    init_b, b, adam_b, loss_b, logged_b = _stepped(Robustness.train_step)
    assert all(torch.equal(init[k], init_b[k]) for k in init)
    assert all(not torch.equal(init[k], a[k]) for k in a if k.endswith("weight"))  # every member moved
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert all(torch.equal(adam_a[i][k], adam_b[i][k]) for i in adam_a for k in adam_a[i])
    assert loss_a.item() == loss_b.item() and not loss_b.requires_grad
    assert list(logged_a) == list(logged_b) and all(_value(logged_a[k]) == _value(logged_b[k]) for k in logged_a)
    assert {"tisode_clean_steady", "tisode_noise_steady"} <= set(logged_b)


class _Saved:
    """A tensor autograd saved for backward; alive as long as some graph holds it."""

    __slots__ = ("tensor", "__weakref__")

    def __init__(self, tensor):
        self.tensor = tensor


@pytest.mark.parametrize("member_wise", [True, False])
def test_one_member_graph_is_alive_at_a_time(member_wise):
    exp = Robustness(Robustness.resolve(_config()))
    exp.setup()
    model = exp.build_model()
    optimizer = exp.build_optimizer(model)
    batch = exp.batch(Position(step=0, epoch=0, index=0))
    live = weakref.WeakSet()
    alive_at_forward = []
    for member in model.models.values():
        member.register_forward_pre_hook(lambda *_: alive_at_forward.append(len(live)))

    def pack(t):
        saved = _Saved(t)
        live.add(saved)
        return saved

    step = Robustness.train_step if member_wise else Experiment.train_step
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda saved: saved.tensor):
        step(exp, model, batch, Position(0, 0, 0), optimizer)
    assert len(alive_at_forward) == 4
    if member_wise:  # every member starts with no other member's graph in memory
        assert alive_at_forward == [0, 0, 0, 0]
    else:  # the loop's default step keeps them all until its one backward pass
        assert alive_at_forward[0] == 0 and all(n > 0 for n in alive_at_forward[1:])


def test_activation_meter_keeps_no_activation_alive():
    # TisODE keeps steady_state, a tensor of its last forward pass, and with it that pass's graph:
    # the meter's graph must not hold the activations it counted (0.85 GiB per TisODE at channels 64)
    torch.manual_seed(0)
    member = robust_classifier("tisode", channels=4).train()
    stem_out = []
    member.stem.register_forward_hook(lambda module, args, out: stem_out.append(weakref.ref(out)))
    x, y = torch.rand(8, 1, 28, 28), torch.arange(8) % 10
    with_graph = saved_activation_bytes(member, x, y)
    assert member.steady_state is not None and member.steady_state.grad_fn is not None
    assert stem_out[0]() is None
    member.steady_state = None
    assert saved_activation_bytes(member, x, y) == with_graph > 0


def test_noise_members_see_noisy_images_and_clean_members_clean_ones():
    exp = Robustness(Robustness.resolve(_config()))
    exp.setup()
    position = Position(step=0, epoch=0, index=0)
    inputs, _ = exp.batch(position)
    assert torch.equal(inputs["cnn_clean"], inputs["tisode_clean"])
    assert torch.equal(inputs["cnn_noise"], inputs["tisode_noise"])
    assert not torch.equal(inputs["cnn_clean"], inputs["cnn_noise"])
    assert inputs["cnn_noise"].min() >= 0 and inputs["cnn_noise"].max() <= 1
    again, _ = exp.batch(position)
    assert torch.equal(again["cnn_noise"], inputs["cnn_noise"])  # drawn from the position, not a stream


FULL = ["channels=64", "batch_size=128", "lr=1e-3", "train_size=0", "test_size=0", "attack_size=1000",
        "epochs=100", "steady_from_epoch=5"]


def test_registered_and_the_full_setting_is_the_authors():
    assert get_experiment("robustness") is Robustness
    c = apply_overrides(RobustnessConfig(), FULL)
    assert [count_parameters(robust_classifier(k, channels=c.channels)) for k in ("cnn", "odenet", "tisode")] == [
        141_130, 142_410, 141_130]
    assert (c.lr, c.weight_decay, c.batch_size, c.lr_decay_epochs, c.lr_decay) == (1e-3, 5e-4, 128, (30, 60, 90), 0.2)
    assert (c.noise_stds, c.fgsm_eps, c.pgd_eps, c.pgd_step, c.pgd_steps) == (
        (50, 75, 100), (0.15, 0.3, 0.5), (0.2, 0.3), (0.04, 0.06), 10)
    assert (c.steady_window, c.steady_weight, c.odenet_step, c.tisode_step) == ((0.9, 1.5), 0.01, 0.1, 0.05)
    exp = Robustness(c)
    assert [exp._lr(e) for e in (0, 29, 30, 60, 90)] == pytest.approx([1e-3, 1e-3, 2e-4, 4e-5, 8e-6])


def test_the_documented_full_command_is_the_full_setting():
    # the command of the module docstring and of docs/classification.md is the one tested above
    command = "neuralode run robustness --set " + " ".join(FULL)
    assert command in robustness_module.__doc__
    assert command in (Path(__file__).resolve().parents[1] / "docs" / "classification.md").read_text()


@pytest.mark.parametrize("override, option", [
    ("models=cnn,resnet", "models"),
    ("trainings=adversarial", "trainings"),
    ("pgd_step=0.04", "pgd_step"),
    ("fgsm_eps=0,0.3", "fgsm_eps"),
    ("noise_stds=-50", "noise_stds"),
    ("steady_window=1.5,0.9", "steady_window"),
    ("train_noise_prob=1.5", "train_noise_prob"),
    ("attack_size=-1", "attack_size"),
    ("tisode_step=0", "tisode_step"),
    ("train_size=16", "batch_size"),
])
def test_bad_config_values_name_the_option(override, option):
    with pytest.raises(ConfigError, match=option):
        Robustness.resolve(apply_overrides(RobustnessConfig(), [override]))
