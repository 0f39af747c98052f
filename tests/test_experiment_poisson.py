"""`poisson` at smoke size, and the finite-difference reference against the exact solution."""

from __future__ import annotations

import math

import numpy as np
import pytest

from neuralode.experiments import apply_overrides, get_experiment, train
from neuralode.experiments.poisson import (
    Poisson,
    PoissonConfig,
    exact_sine_solution,
    finite_difference_solution,
    interior_grid,
    source_term,
)

SMOKE = ["steps=2", "n_interior=16", "n_boundary=8", "grid=7", "fd_refine=2", "log_every=1", "eval_every=1"]


def _config(*overrides):
    return Poisson.resolve(apply_overrides(PoissonConfig(), [*SMOKE, *overrides]))


def test_finite_differences_converge_to_the_exact_sine_solution():
    """The 5-point scheme is second order: the max error falls 4x when h halves, and is small."""
    errors = []
    for n in (7, 15, 31):
        pts = interior_grid(n)
        u = finite_difference_solution(source_term("sine", pts).reshape(n, n)).ravel()
        errors.append(np.abs(u - exact_sine_solution(pts)).max())
    orders = np.log2(np.array(errors[:-1]) / np.array(errors[1:]))
    assert np.all(np.abs(orders - 2) < 0.1), orders
    # sin(pi x) sin(pi y) is an eigenvector of the discrete Laplacian with eigenvalue
    # 2 (2 cos(pi h) - 2) / h^2, so the discrete solution is the exact one times
    # 2 pi^2 h^2 / (4 - 4 cos(pi h)) = 1 + (pi h)^2 / 12 + ...; its maximum (1) is at the centre.
    h = 1 / 32
    assert errors[-1] == pytest.approx(2 * np.pi**2 * h**2 / (4 - 4 * np.cos(np.pi * h)) - 1, rel=1e-6)


def test_finite_differences_solve_the_discrete_system():
    scipy_sparse = pytest.importorskip("scipy.sparse")
    spsolve = pytest.importorskip("scipy.sparse.linalg").spsolve
    n = 9
    rho = source_term("seed", interior_grid(n)).reshape(n, n)
    h = 1 / (n + 1)
    t = scipy_sparse.diags([1.0, -2.0, 1.0], [-1, 0, 1], shape=(n, n), dtype=float) / h**2
    eye = scipy_sparse.identity(n)
    a = (scipy_sparse.kron(t, eye) + scipy_sparse.kron(eye, t)).tocsr()
    expected = spsolve(a, rho.ravel())
    np.testing.assert_allclose(finite_difference_solution(rho).ravel(), expected, rtol=1e-10, atol=1e-13)


def test_end_to_end(tmp_path):
    summary = train(Poisson, _config(), tmp_path, progress=False)
    m = summary["metrics"]
    for key in ("odenet_pde_loss", "odenet_boundary_loss", "odenet_l2_error", "mlp_l2_error"):
        assert math.isfinite(m[key]), key
    assert m["odenet_nfe_forward"] == 16  # rk4, 4 steps of 0.25
    assert abs(m["odenet_params"] - m["mlp_params"]) / m["mlp_params"] < 0.1
    assert summary["references"]["odenet_pde_loss"]["value"] == 0.0768
    assert summary["references"]["odenet_boundary_loss"]["value"] == 0.1029
    assert {p.name for p in (tmp_path / "plots").glob("*.png")} == {"loss.png", "solution.png", "losses.png"}


def test_references_of_both_sources():
    sine = Poisson(_config("source=sine"))
    sine.setup()
    np.testing.assert_allclose(sine.reference, exact_sine_solution(interior_grid(7)))
    seed = Poisson(_config("source=seed", "fd_refine=8"))
    seed.setup()
    # The fine-grid reference sampled at the evaluation points agrees with a direct
    # finite-difference solve on the evaluation grid to discretisation accuracy.
    coarse = finite_difference_solution(source_term("seed", interior_grid(7)).reshape(7, 7)).ravel()
    assert np.abs(seed.reference - coarse).max() < 0.02 * np.abs(seed.reference).max()
    assert seed.reference.max() < 0  # Laplacian(phi) = rho > 0 inside, phi = 0 on the boundary


def test_registered():
    assert get_experiment("poisson") is Poisson
