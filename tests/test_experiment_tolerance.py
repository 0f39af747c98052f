"""`tolerance` at smoke size: the sweep writes NFE, errors and the error-control figure."""

from __future__ import annotations

import json

import pytest

from neuralode.experiments import ConfigError, apply_overrides, get_experiment, train
from neuralode.experiments.tolerance import Tolerance, ToleranceConfig

SMOKE = ["steps=2", "hidden=8", "batch_size=8", "sweep_batch=8", "repeats=1", "tolerances=1e-2,1e-5", "log_every=1"]


def test_end_to_end(tmp_path):
    assert get_experiment("tolerance") is Tolerance
    config = Tolerance.resolve(apply_overrides(ToleranceConfig(), SMOKE))
    summary = train(Tolerance, config, tmp_path, progress=False)
    m = summary["metrics"]
    assert m["tol1e-05_nfe_forward"] >= m["tol1e-02_nfe_forward"] > 0
    assert m["tol1e-05_nfe_backward"] > 0
    # Tighter tolerance, smaller error against the reference: 1000x tighter gives at least 10x
    # less error (measured 23-60x over seeds 0-2), and the loose solve's error is really there.
    assert m["tol1e-02_output_error"] > 1e-5
    assert 0 < m["tol1e-05_output_error"] < m["tol1e-02_output_error"] / 10
    rows = json.loads((tmp_path / "sweep.json").read_text())["rows"]
    assert [r["tol"] for r in rows] == [1e-2, 1e-5]
    assert {p.name for p in (tmp_path / "plots").glob("*.png")} == {"loss.png", "error_control.png"}


def test_reference_must_be_tighter():
    with pytest.raises(ConfigError, match="reference_tol"):
        Tolerance.resolve(apply_overrides(ToleranceConfig(), ["reference_tol=1e-3"]))
