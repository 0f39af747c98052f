"""The stiff benchmark problems themselves (benchmarks/stiff_problems.py), not the solvers that use them.

Torch and numpy fields agree (and the analytic numpy Jacobians agree with autograd), batched and
unbatched torch calls agree, the heat field has the discrete sine mode as an eigenvector, and the scipy
reference reproduces the published values (Robertson at t = 40 to the 7 digits printed; HIRES, OREGO,
VDPOL and Robertson at 1e11 from the IVP test set / Hairer's page to what rtol 1e-10 resolves).
"""

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("scipy")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import stiff_problems as sp  # noqa: E402

SMALL = [sp.robertson(), sp.van_der_pol(1000.0), sp.vdpol(1e6), sp.hires(), sp.oregonator(), sp.heat(7)]


def _states(p, count, seed=0):
    """Random states around y0 (positive for the chemistry problems), shape (count, n), float64."""
    g = torch.Generator().manual_seed(seed)
    y0 = p.y0.reshape(-1)
    scale = y0.abs().max().clamp(min=1.0)
    return y0 + scale * 0.5 * torch.rand(count, y0.numel(), generator=g, dtype=torch.float64)


@pytest.mark.parametrize("p", SMALL, ids=lambda p: p.name)
def test_torch_and_numpy_fields_agree(p):
    ys = _states(p, 5)
    for i in range(ys.shape[0]):
        t = 0.3 * i
        got = p.func(torch.tensor(t, dtype=torch.float64), ys[i]).numpy()
        want = p.f_numpy(t, ys[i].numpy().copy())
        np.testing.assert_allclose(got, want, rtol=1e-13, atol=1e-13 * np.abs(want).max())


@pytest.mark.parametrize("p", SMALL, ids=lambda p: p.name)
def test_numpy_jacobian_matches_autograd(p):
    y = _states(p, 1, seed=3)[0]
    want = torch.autograd.functional.jacobian(lambda v: p.func(torch.tensor(0.0, dtype=torch.float64), v), y).numpy()
    got = p.jac_numpy(0.0, y.numpy().copy())
    got = got.toarray() if hasattr(got, "toarray") else np.asarray(got)
    np.testing.assert_allclose(got, want, rtol=1e-13, atol=1e-13 * np.abs(want).max())


@pytest.mark.parametrize("p", SMALL, ids=lambda p: p.name)
def test_batched_and_unbatched_calls_agree(p):
    ys = _states(p, 4, seed=1)
    t = torch.tensor(0.7, dtype=torch.float64)
    batched = p.func(t, ys)
    assert batched.shape == ys.shape and batched.dtype == torch.float64
    for i in range(4):
        torch.testing.assert_close(batched[i], p.func(t, ys[i]), rtol=0, atol=0)
    # float32 works too (the fields carry no float64 tensors into a float32 state)
    assert p.func(t.float(), ys.float()).dtype == torch.float32


def test_robertson_batch_broadcasts_per_sample_constants():
    k = sp.sample_rate_constants(6, seed=2)
    ratio = k / torch.tensor(sp.ROBERTSON_K, dtype=torch.float64)
    assert bool(((ratio >= 0.1) & (ratio <= 10.0)).all()) and ratio.max() / ratio.min() > 3
    batch = sp.robertson_batch(k)
    ys = _states(batch, 1, seed=4).reshape(-1)[:3].repeat(6, 1) * torch.linspace(0.5, 1.5, 6,
                                                                                 dtype=torch.float64)[:, None]
    t = torch.tensor(1.0, dtype=torch.float64)
    out = batch.func(t, ys)
    flat = batch.f_numpy(1.0, ys.reshape(-1).numpy().copy()).reshape(6, 3)
    jac = batch.jac_numpy(1.0, ys.reshape(-1).numpy().copy()).toarray()
    for i in range(6):
        single = sp.robertson(k[i].tolist())
        torch.testing.assert_close(out[i], single.func(t, ys[i]), rtol=1e-15, atol=0)
        np.testing.assert_allclose(flat[i], single.f_numpy(1.0, ys[i].numpy().copy()), rtol=1e-14)
        np.testing.assert_allclose(jac[3 * i:3 * i + 3, 3 * i:3 * i + 3], single.jac_numpy(1.0, ys[i].numpy()),
                                   rtol=1e-14)
    assert batch.y0.shape == (6, 3)


def test_robertson_conserves_mass():
    p = sp.robertson()
    ys = _states(p, 3)
    assert float(p.func(torch.tensor(0.0, dtype=torch.float64), ys).sum(-1).abs().max()) < 1e-9


@pytest.mark.parametrize("n", [5, 1000, 100_000])
def test_heat_sine_mode_is_an_eigenvector(n):
    p = sp.heat(n)
    y = p.y0
    lam = sp.heat_lambda1(n)
    dx = 1.0 / (n + 1)
    assert lam == pytest.approx(-(4 / dx ** 2) * math.sin(math.pi * dx / 2) ** 2, rel=1e-15)
    assert lam == pytest.approx(-math.pi ** 2, rel=2 / (n + 1) ** 2)  # consistency: lambda_1 -> -pi^2
    f = p.func(torch.tensor(0.0, dtype=torch.float64), y)
    # rounding: each y_j carries ~eps, and the second difference multiplies it by up to 4 / dx^2
    rounding = 16 * np.finfo(np.float64).eps * 4 * (n + 1) ** 2
    torch.testing.assert_close(f, lam * y, rtol=0, atol=rounding + 1e-12 * abs(lam))
    np.testing.assert_allclose(p.exact(0.1), math.exp(0.1 * lam) * y.numpy(), rtol=1e-15)
    if n <= 1000:
        np.testing.assert_allclose(p.f_numpy(0.0, y.numpy().copy()), f.numpy(), rtol=1e-12, atol=rounding)


def test_heat_field_is_the_second_difference():
    n = 6
    p = sp.heat(n)
    dx = 1.0 / (n + 1)
    A = (np.diag(np.full(n, -2.0)) + np.diag(np.ones(n - 1), 1) + np.diag(np.ones(n - 1), -1)) / dx ** 2
    y = _states(p, 2, seed=5)
    got = p.func(torch.tensor(0.0, dtype=torch.float64), y).numpy()
    np.testing.assert_allclose(got, y.numpy() @ A.T, rtol=1e-12, atol=1e-9)


def test_heat_reference_matches_closed_form():
    p = sp.heat(40)
    ref = sp.scipy_reference(p, [0.0, 0.01, p.t_short[1]])
    for t, row in zip([0.0, 0.01, p.t_short[1]], ref):
        np.testing.assert_allclose(row, p.exact(t), rtol=0, atol=1e-8)


def _to_published_digits(value, published, digits):
    """|value - published| <= half a unit in the last of ``digits`` significant digits."""
    unit = 10.0 ** (math.floor(math.log10(abs(published))) - digits + 1)
    return abs(value - published) <= 0.5 * unit


def test_robertson_t40_published_values():
    p = sp.robertson()
    assert p.t_short == (0.0, 40.0)
    y = sp.scipy_reference(p, [40.0])[-1]
    for got, want in zip(y, sp.ROBERTSON_T40):
        assert _to_published_digits(got, want, 7), (got, want)
    # the reference is cached: the same array comes back
    assert sp.scipy_reference(p, [40.0]) is sp.scipy_reference(sp.robertson(), np.array([40.0]))


def test_robertson_t1e11_test_set_values():
    p = sp.robertson(t_end=1e11)
    y = sp.scipy_reference(p, [1e11])[-1]
    np.testing.assert_allclose(y, sp.ROBERTSON_T1E11, rtol=1e-8)


def test_hires_test_set_values():
    p = sp.hires()
    assert p.t_span == (0.0, 321.8122)
    y = sp.scipy_reference(p, [p.t_span[1]])[-1]
    np.testing.assert_allclose(y, sp.HIRES_REFERENCE, rtol=1e-9)


def test_oregonator_test_set_values():
    p = sp.oregonator()
    y = sp.scipy_reference(p, [p.t_span[1]], rtol=1e-9)[-1]
    np.testing.assert_allclose(y, sp.OREGO_REFERENCE, rtol=1e-9)


def test_vdpol_published_values():
    p = sp.vdpol()
    y = sp.scipy_reference(p, [1.0])[-1]
    np.testing.assert_allclose(y, sp.VDPOL_REFERENCE[1.0], rtol=1e-10)


def test_mixed_error_measure():
    ref = np.array([1.0, 1e-6])
    assert sp.mixed_error(ref, ref, 1e-6, 1e-10) == 0.0
    # |err| = atol + rtol |ref| on the small component -> exactly rtol
    y = ref + np.array([0.0, 1e-10 + 1e-6 * 1e-6])
    assert sp.mixed_error(y, ref, 1e-6, np.array([1e-10, 1e-10])) == pytest.approx(1e-6, rel=1e-9)
