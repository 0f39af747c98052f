"""Parsing --set values into the config dataclass's field types."""

from __future__ import annotations

import dataclasses
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
    ("log_every=0", "log_every=0 is invalid; it must be >= 1"),
    ("method=dopr5", "method='dopr5' is not a solver method. Did you mean 'dopri5'"),
    ("rtol=-1", "rtol=-1.0 is invalid"),
    ("lr=nan", "lr=nan is invalid; a learning rate must be finite and > 0"),
])
def test_values_no_run_can_use_are_config_errors(override, message):
    from neuralode.experiments import get_experiment

    config_cls = get_experiment("spiral").Config
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("'", "'")):
        apply_overrides(config_cls(), [override])
