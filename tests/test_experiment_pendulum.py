"""`pendulum` at smoke size on the real data (skipped without it), and the missing-data error."""

from __future__ import annotations

import math

import pytest

from neuralode.experiments import ConfigError, apply_overrides, get_experiment, train
from neuralode.experiments.pendulum import Pendulum, PendulumConfig
from shared_data import shared  # tests/shared_data.py: skip only if ../shared/data is absent


def test_missing_data_names_the_path_and_the_fix(tmp_path):
    with pytest.raises(ConfigError) as info:
        Pendulum.resolve(apply_overrides(PendulumConfig(), [f"data_dir={tmp_path}"]))
    message = str(info.value)
    assert str(tmp_path / "real_pend_h_1.txt") in message and "--set data_dir=" in message


def test_end_to_end(tmp_path):
    data_dir = shared("pendulum", "real_pend_h_1.txt").parent
    assert get_experiment("pendulum") is Pendulum
    config = Pendulum.resolve(apply_overrides(PendulumConfig(), ["steps=2", "batch_size=4", "window=4",
                                                                 "hidden=8", "log_every=1", "eval_every=0",
                                                                 f"data_dir={data_dir}"]))
    assert config.data_dir is not None  # resolved and recorded in config.json
    summary = train(Pendulum, config, tmp_path, progress=False)
    m = summary["metrics"]
    for name in ("ode", "discrete"):
        assert math.isfinite(m[f"{name}_extrapolation_rmse"]) and math.isfinite(m[f"{name}_short_rmse"])
    assert m["frame_dt"] == pytest.approx(1 / 6)
    assert {p.name for p in (tmp_path / "plots").glob("*.png")} == {"loss.png", "trajectories.png",
                                                                   "extrapolation_error.png"}
