"""`cnf` at smoke size: the toy densities, the planar inverse, and a run end to end."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from neuralode.experiments import ConfigError, apply_overrides, get_experiment, train
from neuralode.experiments.cnf import (
    DENSITIES,
    CNFConfig,
    CNFExperiment,
    planar_inverse,
    planar_log_prob,
    sample_density,
)
from neuralode.models import PlanarFlow

SMOKE = ["iters=2", "batch_size=16", "n_test=40", "grid_points=8", "n_samples=20", "frames=2",
         "hyper_hidden=4", "log_every=1", "rtol=0.01", "atol=0.01"]


@pytest.mark.parametrize("name", DENSITIES)
def test_densities_are_seeded_and_shaped(name):
    a = sample_density(name, 101, np.random.default_rng(3))
    b = sample_density(name, 101, np.random.default_rng(3))
    c = sample_density(name, 101, np.random.default_rng(4))
    assert a.shape == (101, 2) and a.dtype == np.float32
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert np.abs(a).max() < 6.0  # inside the plotted extent (up to a few noise tails)


def test_unknown_density_and_bad_config():
    with pytest.raises(ValueError, match="unknown density 'spiral'"):
        sample_density("spiral", 3, np.random.default_rng(0))
    with pytest.raises(ConfigError, match="densities"):
        CNFExperiment.resolve(apply_overrides(CNFConfig(), ["densities=moon"]))
    with pytest.raises(ConfigError, match="at least one"):
        CNFExperiment.resolve(apply_overrides(CNFConfig(), ["widths=", "depths="]))


def test_planar_inverse_and_density():
    torch.manual_seed(0)
    flow = PlanarFlow(2, 4).double()
    with torch.no_grad():
        flow.u.mul_(20)
        flow.w.mul_(20)
    x = torch.randn(50, 2, dtype=torch.float64)
    z, _ = flow(x)
    assert torch.allclose(planar_inverse(flow, z), x, atol=1e-9)
    # log p integrates to about 1 over a wide grid
    s = torch.linspace(-8, 8, 161, dtype=torch.float64)
    grid = torch.stack(torch.meshgrid(s, s, indexing="xy"), -1).reshape(-1, 2)
    mass = planar_log_prob(flow, grid).exp().sum() * (s[1] - s[0]) ** 2
    assert abs(mass.item() - 1.0) < 1e-2


def test_end_to_end(tmp_path):
    assert get_experiment("cnf") is CNFExperiment
    config = CNFExperiment.resolve(apply_overrides(CNFConfig(), [*SMOKE, "densities=checkerboard",
                                                                  "widths=2", "depths=3"]))
    summary = train(CNFExperiment, config, tmp_path, progress=False)
    m = summary["metrics"]
    for name in ("planar_K3_checkerboard", "cnf_M2_checkerboard"):
        assert math.isfinite(m[f"test_nll/{name}"])
    assert m["nfe_per_iter/cnf_M2_checkerboard"] > 0
    plots = {p.name for p in (tmp_path / "plots").iterdir()}
    assert {"loss.png", "densities.png", "flow.png", "samples.png", "nll.png"} <= plots
    try:
        import PIL  # noqa: F401
    except ImportError:
        pass
    else:
        assert "flow.gif" in plots


def test_models_train_independently(tmp_path):
    """Training all models together gives each one the update it would get alone."""
    both = train(CNFExperiment, CNFExperiment.resolve(apply_overrides(CNFConfig(), [*SMOKE, "gif=false", "widths=2"])),
                 tmp_path / "both", progress=False)
    alone = train(CNFExperiment, CNFExperiment.resolve(apply_overrides(CNFConfig(), [*SMOKE, "gif=false", "widths="])),
                  tmp_path / "one", progress=False)
    key = "test_nll/planar_K8_moons"
    assert both["metrics"][key] == alone["metrics"][key]
