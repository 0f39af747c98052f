"""Parsing --set values into the config dataclass's field types."""

from __future__ import annotations

import dataclasses
import re
import typing
from typing import Literal, Optional

import pytest

from neuralode.experiments.config import ConfigError, RunConfig, apply_overrides, config_from_dict, config_to_dict, parse_value


@dataclasses.dataclass
class C(RunConfig):
    n: int = 1
    x: float = 0.5
    flag: bool = False
    name: str = "a"
    mode: Literal["fast", "slow"] = "fast"
    sizes: tuple[int, ...] = (1, 2)
    rates: list[float] = dataclasses.field(default_factory=lambda: [0.1])
    maybe: Optional[float] = None


@pytest.mark.parametrize("raw, tp, expected", [
    ("3", int, 3), ("-2", int, -2), ("1e-3", float, 1e-3), ("2", float, 2.0),
    ("true", bool, True), ("0", bool, False), ("No", bool, False),
    ("hello world", str, "hello world"),
    ("1,2,3", tuple[int, ...], (1, 2, 3)), ("[1, 2]", tuple[int, ...], (1, 2)), ("", tuple[float, ...], ()),
    ("(0.5,)", list[float], [0.5]),
    ("none", Optional[int], None), ("4", Optional[int], 4),
    ("slow", Literal["fast", "slow"], "slow"),
])
def test_parse_value(raw, tp, expected):
    value = parse_value(raw, tp)
    assert value == expected and type(value) is type(expected)


@pytest.mark.parametrize("raw, tp", [("1.5", int), ("x", float), ("maybe", bool), ("1,a", tuple[int, ...]),
                                     ("medium", Literal["fast", "slow"])])
def test_parse_value_rejects(raw, tp):
    with pytest.raises(ValueError):
        parse_value(raw, tp)


def test_apply_overrides_returns_a_new_config():
    base = C()
    new = apply_overrides(base, ["n=5", "sizes=3,4", "maybe=0.25", "seed=7", "name=x=y"])
    assert (new.n, new.sizes, new.maybe, new.seed, new.name) == (5, (3, 4), 0.25, 7, "x=y")
    assert base.n == 1


def test_a_key_given_twice_takes_the_last_value():
    # Deliberate: a script's base list of overrides followed by its own (the tests do this too).
    assert apply_overrides(C(), ["n=1", "seed=3", "n=2"]).n == 2


def test_errors_suggest_and_explain():
    with pytest.raises(ConfigError, match=r"unknown config key 'rate'. Did you mean 'rates'"):
        apply_overrides(C(), ["rate=1"])
    with pytest.raises(ConfigError, match=r"field 'n' has type int, current value 1"):
        apply_overrides(C(), ["n=1.5"])


def test_round_trip_through_json_dict():
    cfg = apply_overrides(C(), ["sizes=5,6", "mode=slow"])
    import json

    again = config_from_dict(C, json.loads(json.dumps(config_to_dict(cfg))))
    assert again == cfg


@pytest.mark.parametrize("override, message", [
    ("log_every=0", "--set log_every=0: must be a positive integer"),
    ("method=dopr5", "--set method=dopr5: is not a solver method (did you mean 'dopri5'?)"),
    ("rtol=-1", "--set rtol=-1: must be a finite number >= 0"),
    ("lr=nan", "--set lr=nan: must be a finite number"),
])
def test_values_no_run_can_use_are_config_errors(override, message):
    from neuralode.experiments import get_experiment

    config_cls = get_experiment("spiral").Config
    with pytest.raises(ConfigError, match=re.escape(message)):
        apply_overrides(config_cls(), [override])


# Values each experiment's fields refuse by their declared ranges (QA's list, D1): every one ends in a
# FieldError naming the --set key before resolve() or the training loop sees it.
_BAD_VALUES = {
    "spiral": ["hidden=-3", "seed=-1", "noise_std=nan", "noise_std=-1", "rtol=0 atol=0", "snapshots=-1",
               "t_end=nan", "t_end=inf", "t_end=0", "batch_size=0"],
    "cubic": ["x_max=nan", "x_max=inf", "odenet_sweep=nan", "noise_std=nan", "diverge_loss=nan",
              "spread_x_max=nan"],
    "poisson": ["boundary_weight=nan", "boundary_weight=inf", "step_size=nan", "step_size=inf", "step_size=0"],
    "physionet": ["kl_weight=nan", "kl_weight=inf", "time_scale=nan", "time_scale=inf", "obs_std=nan", "obs_std=inf"],
    "ecg": ["rtol=0 atol=0", "eval_batch=0", "model=rknet rk_step=0", "model=rknet rk_step=-0.5", "grad_clip=nan"],
    "mnist": ["rtol=0 atol=0", "batch_size=0", "batch_size=-3", "channels=0", "eval_batch=0", "momentum=nan",
              "lr_decay=nan"],
    "cnf": ["rtol=0", "atol=0", "t1=nan", "t1=inf", "extent=nan", "extent=inf", "extent=-1"],
    "tolerance": ["t_end=nan", "t_end=inf", "train_rtol=nan", "train_rtol=inf", "tolerances=nan",
                  "reference_tol=nan"],
    "latent_spiral": ["noise_std=nan", "noise_std=inf", "noise_std=0", "noise_std=-1", "step_size=nan",
                      "step_size=inf", "step_size=0", "step_size=-1", "dynamics_hidden=0", "dynamics_hidden=-1",
                      "decoder_hidden=-1", "n_plot=0"],
    "robustness": ["batch_size=0"],
    "pendulum": ["short_horizon=nan", "file="],
    "memory": ["depths=0", "width=-1"],
}


@pytest.mark.parametrize("name, override", [(n, o) for n, values in _BAD_VALUES.items() for o in values])
def test_every_field_refuses_values_outside_its_declared_range(name, override):
    from neuralode.experiments import get_experiment

    experiment = get_experiment(name)
    key = override.split()[-1].split("=")[0]
    with pytest.raises(ConfigError, match=r"^--set (" + key + "|rtol)="):
        experiment.resolve(apply_overrides(experiment.Config(), override.split()))


def test_every_float_field_must_be_finite_and_every_field_declares_a_checkable_type():
    """The mechanism, not the cases: nan in any float field (or float item) of any experiment is refused,
    and every field's declared type is one the checks understand."""
    from neuralode.experiments import experiment_names, get_experiment
    from neuralode.experiments.config import _declared, check_fields

    for name in experiment_names():
        cls = get_experiment(name).Config
        check_fields(cls())  # the defaults are valid
        hints = typing.get_type_hints(cls)
        for field in dataclasses.fields(cls):
            assert field.name in _declared(cls), (name, field.name)
            tp = hints[field.name]
            inner = typing.get_args(tp)[0] if typing.get_origin(tp) in (tuple, list) else tp
            if float in (tp, inner) or float in typing.get_args(tp):
                raw = "nan" if inner is tp or typing.get_origin(tp) not in (tuple, list) else "1,nan"
                with pytest.raises(ConfigError, match=f"--set {field.name}="):
                    apply_overrides(cls(), [f"{field.name}={raw}"])


@pytest.mark.parametrize("key, value, needle", [
    ("epochs", "x", "field epochs: expected int, got 'x'"),
    ("lr", "abc", "field lr: expected a number"),
    ("variant", "nope", "field variant: must be one of cubic, linear, linear_hard"),
    ("batch_size", 2.5, "field batch_size: expected int"),
    ("seed", 1.5, "field seed: expected int"),
    ("seed", True, "field seed: expected int, got True"),
    ("method", 5, "field method: expected a string"),
    ("data_size", [1], "field data_size: expected int"),
    ("rtol", None, "field rtol: expected a number"),
    ("hidden", -3, "field hidden: must be a non-negative integer"),
    ("nonsense", 1, "unknown field 'nonsense'"),
])
def test_config_from_dict_checks_types_ranges_and_keys(key, value, needle):
    from neuralode.experiments.spiral import SpiralConfig

    data = config_to_dict(SpiralConfig())
    data[key] = value
    with pytest.raises(ConfigError, match=re.escape(needle)):
        config_from_dict(SpiralConfig, data, strict=True)


def test_config_from_dict_strict_refuses_a_missing_field():
    from neuralode.experiments.spiral import SpiralConfig

    data = config_to_dict(SpiralConfig())
    del data["epochs"]
    with pytest.raises(ConfigError, match="field epochs is missing"):
        config_from_dict(SpiralConfig, data, strict=True)
    with pytest.raises(ConfigError, match="field seed is missing"):
        config_from_dict(SpiralConfig, {}, strict=True)
