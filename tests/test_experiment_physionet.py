"""`physionet` at smoke size on the real PhysioNet 2012 archive (skipped without it)."""

from __future__ import annotations

import io
import json
import math
import tarfile

import numpy as np
import pytest
import torch
from shared_data import SHARED_DATA, shared

from neuralode.data import PHYSIONET_VARIABLES
from neuralode.experiments import ConfigError, apply_overrides, get_experiment, train
from neuralode.experiments.physionet import (
    PhysioNet,
    PhysioNetConfig,
    _masked_mse,
    holdout_mask,
    rubanova_mse,
)
from neuralode.experiments.runner import read_metrics
from neuralode.models import RNNVAE, RNNBaseline, count_parameters, size_matched_rnn_width

DATA = SHARED_DATA / "physionet2012" / "set-a.tar.gz"
SMOKE = ["max_records=8", "iters=2", "batch_size=4", "step_size=0.25", "latent_dim=2", "encoder_hidden=4",
         "dynamics_hidden=4", "decoder_hidden=4", "rnn_hidden=4", "log_every=1", f"data_path={DATA}"]


def test_holdout_mask_is_a_seeded_subset():
    mask = torch.rand(3, 50, 37) < 0.3
    a = holdout_mask(mask, 0.2, np.random.default_rng(0))
    b = holdout_mask(mask, 0.2, np.random.default_rng(0))
    assert torch.equal(a, b) and not (a & ~mask).any()
    assert 0.1 < a.sum().item() / mask.sum().item() < 0.3


def test_missing_data_names_the_setting(tmp_path):
    # found (or not) when the config is resolved, before a run directory is made
    with pytest.raises(ConfigError, match="data_path"):
        PhysioNet.resolve(apply_overrides(PhysioNetConfig(), [*SMOKE[:-1], f"data_path={tmp_path}/none.tar.gz"]))
    with pytest.raises(ConfigError, match="physionet2012 data not found"):
        PhysioNet.resolve(apply_overrides(PhysioNetConfig(), [*SMOKE[:-1], "data_path=set-z.tar.gz"]))


def _patient(record_id: int, body: list[str]) -> str:
    head = ["Time,Parameter,Value", f"00:00,RecordID,{record_id}", "00:00,Age,60", "00:00,Gender,1",
            "00:00,Height,-1", "00:00,ICUType,3", "00:00,Weight,-1"]  # fmt: skip
    return "\n".join([*head, *body]) + "\n"


def _write_set(path, ids):
    """A small synthetic set archive: every patient has HR 50 and 100, Temp -10 and 40, MechVent 1."""
    with tarfile.open(path, "w:gz") as tar:
        for rid in ids:
            body = ["00:01,HR,50", "00:05,HR,100", "00:07,Temp,-10", "01:00,Temp,40", "02:00,MechVent,1",
                    "02:02,HR,70"]  # fmt: skip
            data = _patient(rid, body).encode()
            info = tarfile.TarInfo(f"set/{rid}.txt")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_masked_mse_of_nothing_is_nan_not_zero():
    pred, values = torch.ones(2, 3, 37), torch.zeros(2, 3, 37)
    assert math.isnan(_masked_mse(pred, values, torch.zeros(2, 3, 37, dtype=torch.bool)))
    assert _masked_mse(pred, values, torch.ones(2, 3, 37, dtype=torch.bool)) == 1.0


@pytest.mark.parametrize("override, message", [
    ("quantization=-0.1", "quantization"), ("quantization=nan", "quantization"), ("quantization=inf", "quantization"),
    ("rnn_hidden=-1", "rnn_hidden"), ("holdout=1", "holdout"), ("holdout=-0.1", "holdout"),
    ("test_fraction=0", "test_fraction"), ("models=latent_ode,latent_ode", "models"), ("models=gru", "models"),
    ("optimizer=sgd", "optimizer"), ("lr_schedule=step", "lr_schedule"), ("kl_schedule=linear", "kl_schedule"),
    ("likelihood=patient", "likelihood"), ("lr_schedule=cosine min_lr=0.1", "min_lr"), ("lr_decay=0", "lr_decay"),
    ("kl_decay=1", "kl_decay"), ("kl_weight=-1", "kl_weight"), ("dynamics_layers=0", "dynamics_layers"),
    ("encoder_ode_layers=0", "encoder_ode_layers"), ("encoder_substeps=0", "encoder_substeps"),
    ("rnn_vae_units=-1", "rnn_vae_units"), ("rnn_vae_grid=mine", "rnn_vae_grid"), ("models=rnn_vae,rnn_vae", "models"),
    ("rnn_roll=mine", "rnn_roll"),
])  # fmt: skip
def test_config_errors_name_the_setting(override, message):
    with pytest.raises(ConfigError, match=message):
        PhysioNet.resolve(apply_overrides(PhysioNetConfig(), override.split()))


@pytest.mark.parametrize("roll", ["own", "all"])
def test_rnn_roll_chooses_the_times_the_rnn_steps_through(roll):
    """rnn_roll=all steps the GRU through the batch's whole grid, hiding each record's own schedule."""
    torch.manual_seed(0)
    exp = PhysioNet(apply_overrides(PhysioNetConfig(), [f"rnn_roll={roll}"]))   # (no resolve: it needs the data)
    rnn = RNNBaseline(37, 4)
    times = torch.tensor([0.0, 0.1, 0.3, 0.6])
    values = torch.randn(2, 4, 37)
    mask = torch.rand(2, 4, 37) < 0.3
    mask[0, 1] = False   # record 0 has no observation at t = 0.1: "own" skips that time, "all" steps through it
    held = torch.zeros_like(mask)
    out = exp._forward({"rnn": rnn}, "rnn", times, values, mask, held)
    for which in ("own", "all"):
        direct = rnn(times, torch.where(mask, values, 0.0), mask, target_times=times, target_values=values,
                     target_mask=mask, roll=which)
        same = torch.equal(out.pred, direct.pred)
        assert same == (which == roll), which


def test_runs_written_before_rnn_roll_resume_with_their_own_times():
    from neuralode.experiments.config import config_from_dict, config_to_dict

    data = config_to_dict(PhysioNetConfig())
    del data["rnn_roll"]
    assert config_from_dict(PhysioNetConfig, data, strict=True).rnn_roll == "own"


def test_rubanova_lr_schedule_decays_per_step_to_its_floor():
    # run_models.py: before every step lr = max(0.999 lr, lr0 / 10), so step s takes lr0 * 0.999^(s + 1).
    exp = PhysioNet(apply_overrides(PhysioNetConfig(), ["lr_schedule=exponential", "iters=5000"]))
    lr = 1e-2
    for step in range(3000):
        lr = max(lr * 0.999, 1e-3)
        assert exp.lr_at(step) == pytest.approx(lr, rel=1e-9)
    assert exp.lr_at(2300) > 1e-3 and exp.lr_at(2302) == 1e-3  # 0.999^2302 < 0.1 < 0.999^2301
    cosine = PhysioNet(apply_overrides(PhysioNetConfig(), ["lr_schedule=cosine", "iters=100", "min_lr=1e-4"]))
    assert cosine.lr_at(0) == 1e-2 and cosine.lr_at(50) == pytest.approx(0.5 * (1e-2 + 1e-4))
    assert cosine.lr_at(100) == pytest.approx(1e-4)
    assert PhysioNet(PhysioNetConfig()).lr_at(999) == 1e-2  # constant by default


def test_rubanova_kl_schedule():
    # run_models.py: kl_coef = 0 for epochs < 10, then 1 - 0.99^(epoch - 10).
    exp = PhysioNet(apply_overrides(PhysioNetConfig(), ["kl_schedule=rubanova"]))
    assert [exp.kl_at(e) for e in range(11)] == [0.0] * 11
    assert exp.kl_at(11) == pytest.approx(0.01) and exp.kl_at(100) == pytest.approx(1 - 0.99 ** 90)
    half = PhysioNet(apply_overrides(PhysioNetConfig(), ["kl_schedule=rubanova", "kl_weight=0.5", "kl_wait_epochs=0"]))
    assert half.kl_at(0) == 0.0 and half.kl_at(2) == pytest.approx(0.5 * (1 - 0.99 ** 2))
    assert PhysioNet(PhysioNetConfig()).kl_at(0) == 1.0
    assert PhysioNet(apply_overrides(PhysioNetConfig(), ["kl_weight=0"])).kl_at(50) == 0.0


def test_rubanova_mse_averages_per_record_and_variable_first():
    # Record 0: HR seen twice (squared errors 1 and 3) and Temp once (4): (mean(1, 3) + 4) / 37, the 35
    # variables it never had count as 0. Record 1: nothing seen: 0. An unseen entry's error is ignored.
    err = torch.zeros(2, 3, 37)
    mask = torch.zeros(2, 3, 37, dtype=torch.bool)
    hr, temp = PHYSIONET_VARIABLES.index("HR"), PHYSIONET_VARIABLES.index("Temp")
    err[0, 0, hr], err[0, 2, hr], err[0, 1, temp], err[0, 1, hr], err[1, 0, hr] = 1.0, 3.0, 4.0, 100.0, 100.0
    mask[0, 0, hr] = mask[0, 2, hr] = mask[0, 1, temp] = True
    assert rubanova_mse(err, mask).tolist() == pytest.approx([(2.0 + 4.0) / 37, 0.0])
    # The per-entry mean would weigh HR twice: (1 + 3 + 4) / 3.
    assert _masked_mse(err.sqrt(), torch.zeros_like(err), mask) == pytest.approx(8 / 3)


class _Out:
    def __init__(self, pred, kl=None):
        self.pred, self.kl = pred, kl


def test_variable_likelihood_weighs_each_variable_of_a_record_equally():
    # Rubanova et al.'s likelihood: per record, the mean over D variables of each variable's mean
    # log-density; KL averaged over latent dimensions.
    exp = PhysioNet(apply_overrides(PhysioNetConfig(), ["likelihood=variable", "obs_std=0.5", "latent_dim=4"]))
    model = {"latent_ode": torch.nn.Module(), "rnn": torch.nn.Module()}
    for m in model.values():
        m.noise = lambda: torch.full((3,), 0.5)
    values = torch.zeros(2, 4, 3)
    pred = torch.zeros(2, 4, 3)
    mask = torch.zeros(2, 4, 3, dtype=torch.bool)
    mask[0, :, 0] = True  # record 0: variable 0 four times (error 1 each), variable 1 once (error 2)
    mask[0, 1, 1] = True
    mask[1, 2, 2] = True  # record 1: variable 2 once (error 0)
    pred[0, :, 0], pred[0, 1, 1] = 1.0, 2.0
    logn = lambda e: -0.5 * (e / 0.5) ** 2 - math.log(0.5) - 0.5 * math.log(2 * math.pi)  # noqa: E731
    want = -((logn(1.0) + logn(2.0)) / 3 + logn(0.0) / 3) / 2
    kl = torch.tensor([4.0, 8.0])
    got = exp._objective(model, "rnn", _Out(pred), values, mask, kl_weight=1.0)
    assert got.item() == pytest.approx(want, rel=1e-6)
    got = exp._objective(model, "latent_ode", _Out(pred, kl), values, mask, kl_weight=0.5)
    assert got.item() == pytest.approx(want + 0.5 * (4.0 + 8.0) / 2 / 4, rel=1e-6)
    # Adding a fifth identical error on variable 0 changes nothing (the entry likelihood would).
    mask2, pred2, values2 = (torch.cat([x, x[:, :1]], 1) for x in (mask, pred, values))
    mask2[0, 4, 1] = False
    assert exp._objective(model, "rnn", _Out(pred2), values2, mask2, 1.0).item() == pytest.approx(want, rel=1e-6)


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="resolving the config locates the data: needs ../shared/data")
def test_rnn_hidden_zero_is_size_matched_to_the_latent_ode():
    config = PhysioNet.resolve(apply_overrides(PhysioNetConfig(), [o for o in SMOKE if not o.startswith("rnn_hidden")]))
    assert config.rnn_hidden == 0
    exp = PhysioNet(config)
    models = exp.build_model()  # needs no data
    target = count_parameters(models["latent_ode"])
    width = models["rnn"].hidden_dim
    assert exp.rnn_hidden == width == size_matched_rnn_width(37, target)
    # No other width is closer in parameter count.
    gaps = {w: abs(count_parameters(RNNBaseline(37, w)) - target) for w in (width - 1, width, width + 1) if w >= 1}
    assert gaps[width] == min(gaps.values())
    # An explicit width is taken as given.
    explicit = PhysioNet(PhysioNet.resolve(apply_overrides(PhysioNetConfig(), SMOKE))).build_model()
    assert explicit["rnn"].hidden_dim == 4


def test_several_sets_quantization_and_rubanova_units(tmp_path):
    a = _write_set(tmp_path / "a.tar.gz", [11, 12, 13])
    b = _write_set(tmp_path / "b.tar.gz", [21, 22, 23])
    config = PhysioNet.resolve(apply_overrides(PhysioNetConfig(), [
        *SMOKE[:-1], f"data_path={a},{b}", "max_records=5", "quantization=0.1", "test_fraction=0.4"]))
    exp = PhysioNet(config)
    exp.setup()
    assert sorted(r.record_id for r in exp.train + exp.test) == [11, 12, 13, 21, 22]  # max_records caps the total
    # 00:01 -> 0.0 h, 00:05 and 00:07 -> 0.1 h, 01:00 -> 1.0 h, 02:00 and 02:02 -> 2.0 h.
    for record in exp.train + exp.test:
        assert record.times.tolist() == pytest.approx([0.0, 0.1, 1.0, 2.0])
    # Their units, (x - min) / max: HR (50..100) -> ((100 - 50) / 100)^2; Temp (-10..40) -> (50 / 40)^2;
    # MechVent, always 1: our scale is 1 for a constant, their max is 1 -> 1; never observed: max 0 -> 1 -> 1.
    w = exp.rubanova_weight
    V = {name: i for i, name in enumerate(PHYSIONET_VARIABLES)}
    assert w[V["HR"]].item() == pytest.approx(0.25) and w[V["Temp"]].item() == pytest.approx(1.5625)
    assert w[V["MechVent"]].item() == 1.0 and w[V["pH"]].item() == 1.0
    with pytest.raises(ConfigError, match="twice"):
        PhysioNet(PhysioNet.resolve(apply_overrides(config, [f"data_path={a},{a}"]))).setup()


def test_end_to_end(tmp_path):
    shared("physionet2012", "set-a.tar.gz")  # skip only without ../shared/data; fail if the file is missing
    assert get_experiment("physionet") is PhysioNet
    config = PhysioNet.resolve(apply_overrides(PhysioNetConfig(), SMOKE))
    summary = train(PhysioNet, config, tmp_path, progress=False)
    m = summary["metrics"]
    for kind in ("latent_ode", "rnn", "mean"):
        for family in ("test_mse_heldout", "test_mse_recon", "test_mse_recon_rubanova_norm", "test_mse_rubanova"):
            assert math.isfinite(m[f"{family}/{kind}"]) and m[f"{family}/{kind}"] > 0
    assert m["data/records"] == 8 and m["data/train_records"] + m["data/test_records"] == 8
    assert m["data/test_heldout_entries"] > 0 and m["data/test_seen_entries"] > 0
    assert m["nfe_per_iter/latent_ode"] > 0 and m["rnn_hidden"] == 4
    # Each paper row has its own figure; the latent ODE's MSE is repeated under its encoder's name.
    refs = summary["references"]
    assert refs["test_mse_rubanova/latent_ode_rnn"]["value"] == 3.9e-3
    assert refs["test_mse_rubanova/latent_ode_odernn"]["value"] == 2.118e-3
    assert refs["test_mse_rubanova/rnn_vae"]["value"] == 5.9e-3
    assert "test_mse_rubanova/rnn" not in refs  # the paper has no deterministic GRU in that table
    assert m["test_mse_rubanova/latent_ode_rnn"] == m["test_mse_rubanova/latent_ode"]
    assert "test_mse_rubanova/latent_ode_odernn" not in m
    assert not any("rnn_vae" in k for k in m)  # not a default member
    assert {p.name for p in (tmp_path / "plots").glob("*.png")} == {"loss.png", "interpolation.png", "mse.png"}
    train_logs = [r for r in read_metrics(tmp_path) if r.get("split") == "train"]
    assert all(math.isfinite(r["train_heldout_mse/rnn"]) for r in train_logs)
    # The final metrics are the posterior mean's, as in the last evaluation (finish() runs with the
    # model in training mode, which once made them a random posterior sample's).
    (last_eval,) = [r for r in read_metrics(tmp_path) if r.get("split") == "eval"][-1:]
    for key in ("test_mse_heldout/latent_ode", "test_mse_recon/latent_ode", "test_mse_recon/rnn"):
        assert m[key] == pytest.approx(last_eval[key], rel=1e-12)


def test_holdout_zero_is_reconstruction_only(tmp_path):
    shared("physionet2012", "set-a.tar.gz")
    config = PhysioNet.resolve(apply_overrides(PhysioNetConfig(), [*SMOKE, "holdout=0", "iters=1"]))
    summary = train(PhysioNet, config, tmp_path, progress=False)
    m = summary["metrics"]
    assert m["data/test_heldout_entries"] == 0 and m["data/test_seen_entries"] > 0
    for kind in ("latent_ode", "rnn", "mean"):
        assert math.isnan(m[f"test_mse_heldout/{kind}"])  # nothing held out: absent, not 0
        assert math.isfinite(m[f"test_mse_recon/{kind}"]) and m[f"test_mse_recon/{kind}"] > 0
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved["metrics"]["test_mse_heldout/latent_ode"] is None  # JSON has no NaN: null
    train_logs = [r for r in read_metrics(tmp_path) if r.get("split") == "train"]
    assert train_logs and not any("train_heldout_mse/rnn" in r for r in train_logs)


def test_one_model_alone_is_the_same_member_as_in_a_run_of_both(tmp_path):
    shared("physionet2012", "set-a.tar.gz")
    rubanova = ["holdout=0", "optimizer=adamax", "lr_schedule=exponential", "kl_schedule=rubanova",
                "kl_wait_epochs=0", "likelihood=variable", "decoder_hidden=0", "dynamics_layers=3",
                "encoder=odernn", "encoder_ode_layers=2", "encoder_ode_hidden=5", "encoder_substeps=1", "iters=3"]
    both = train(PhysioNet, PhysioNet.resolve(apply_overrides(PhysioNetConfig(), [*SMOKE, *rubanova])),
                 tmp_path / "both", progress=False)["metrics"]
    alone = train(PhysioNet, PhysioNet.resolve(apply_overrides(PhysioNetConfig(), [*SMOKE, *rubanova,
                                                                                   "models=latent_ode"])),
                  tmp_path / "alone", progress=False)["metrics"]
    for key in ("test_mse_recon/latent_ode", "test_mse_rubanova/latent_ode", "test_mse_rubanova/mean"):
        assert alone[key] == pytest.approx(both[key], rel=1e-6)
    assert not any(k.endswith("/rnn") for k in alone) and "params/rnn" in both
    logs = [r for r in read_metrics(tmp_path / "alone") if r.get("split") == "train"]
    assert [r["lr"] for r in logs] == pytest.approx([1e-2 * 0.999 ** k for k in (1, 2, 3)])
    assert [r["kl_weight"] for r in logs] == pytest.approx([0.0, 0.0, 0.01])  # 2 steps per epoch


def test_the_rnn_alone_finishes_with_its_plots(tmp_path):
    # The plots once read the latent ODE's metrics, which a run of the RNN alone does not have.
    shared("physionet2012", "set-a.tar.gz")
    config = PhysioNet.resolve(apply_overrides(PhysioNetConfig(), [*SMOKE, "models=rnn", "holdout=0"]))
    m = train(PhysioNet, config, tmp_path, progress=False)["metrics"]
    assert math.isfinite(m["test_mse_rubanova/rnn"]) and "params/rnn" in m
    assert not any("latent_ode" in k for k in m)
    assert {p.name for p in (tmp_path / "plots").glob("*.png")} == {"loss.png", "interpolation.png", "mse.png"}


def test_the_rnn_vae_at_their_sizes_is_a_member_scored_in_their_units(tmp_path):
    # Rubanova et al.'s RNN-VAE (run_models.py --rnn-vae): latents and --rec-dims are latent_dim and
    # encoder_hidden, --units is rnn_vae_units (0: dynamics_hidden); its row's reference is 5.9e-3.
    shared("physionet2012", "set-a.tar.gz")
    members = ["holdout=0", "likelihood=variable", "kl_schedule=rubanova", "kl_wait_epochs=0", "encoder=odernn",
               "encoder_substeps=1", "iters=3"]
    config = PhysioNet.resolve(apply_overrides(PhysioNetConfig(), [*SMOKE, *members, "models=latent_ode,rnn,rnn_vae"]))
    exp = PhysioNet(config)
    vae = exp.build_model()["rnn_vae"]
    assert isinstance(vae, RNNVAE) and vae.decoder_grid == "union"  # their code's grid by default
    assert (vae.latent_dim, vae.encoder_hidden, vae.units) == (2, 4, 4)
    other = PhysioNet(PhysioNet.resolve(apply_overrides(config, ["rnn_vae_units=7", "rnn_vae_grid=own",
                                                                 "rnn_vae_reverse_batch=true"]))).build_model()
    assert (other["rnn_vae"].units, other["rnn_vae"].decoder_grid, other["rnn_vae"].reverse_batch) == (7, "own", True)
    assert not vae.reverse_batch  # their code's batch reversal only on request
    summary = train(PhysioNet, config, tmp_path / "all", progress=False)
    m = summary["metrics"]
    for family in ("test_mse_recon", "test_mse_rubanova"):
        assert math.isfinite(m[f"{family}/rnn_vae"]) and m[f"{family}/rnn_vae"] > 0
    assert m["params/rnn_vae"] == count_parameters(vae)
    assert m["test_mse_rubanova/latent_ode_odernn"] == m["test_mse_rubanova/latent_ode"]
    assert summary["references"]["test_mse_rubanova/rnn_vae"]["value"] == 5.9e-3
    logs = [r for r in read_metrics(tmp_path / "all") if r.get("split") == "train"]
    assert all(math.isfinite(r["loss/rnn_vae"]) for r in logs)
    # Without sampling, training decodes the posterior mean: a different member after a step.
    times, values = torch.tensor([0.0, 0.5]), torch.rand(2, 2, 37)
    mask = torch.rand(2, 2, 37) < 0.5
    for kind in ("rnn_vae", "latent_ode"):
        for flag, sampled in (("true", True), ("false", False)):
            exp_flag = PhysioNet(PhysioNet.resolve(apply_overrides(config, [f"{kind}_sample={flag}"])))
            out = exp_flag._forward(exp_flag.build_model(), kind, times, values, mask, torch.zeros_like(mask),
                                    sample=True, step=5)
            assert torch.equal(out.z0, out.qz0_mean) is not sampled
    mean_only = train(PhysioNet, PhysioNet.resolve(apply_overrides(config, ["models=rnn_vae", "rnn_vae_sample=false"])),
                      tmp_path / "mean_only", progress=False)["metrics"]
    assert mean_only["test_mse_rubanova/rnn_vae"] != pytest.approx(m["test_mse_rubanova/rnn_vae"], rel=1e-6)
    # Alone it is the same member on the same batches; scored at the posterior mean, so exactly.
    alone = train(PhysioNet, PhysioNet.resolve(apply_overrides(config, ["models=rnn_vae"])), tmp_path / "alone",
                  progress=False)["metrics"]
    assert alone["test_mse_rubanova/rnn_vae"] == pytest.approx(m["test_mse_rubanova/rnn_vae"], rel=1e-6)
    assert {p.name for p in (tmp_path / "alone" / "plots").glob("*.png")} == {"loss.png", "interpolation.png",
                                                                              "mse.png"}
