"""Empirical order of convergence (log-log regression against matrix-exponential references) for every
method, the order of the embedded error estimators, and adaptive solves meeting their tolerance on
problems with closed forms and against an independent scipy reference (rtol 1e-13)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import neuralode
from neuralode.methods import REGISTRY
from neuralode.solvers.runge_kutta import ExplicitRungeKutta
from neuralode.tableaus import TABLEAUS

RK_METHODS = sorted(TABLEAUS)
ADAPTIVE = [m for m in RK_METHODS if TABLEAUS[m].adaptive]
F64 = torch.float64

A_BASE = torch.tensor([[-0.1, 1.0], [-1.0, -0.1]], dtype=F64)
Y0 = torch.tensor([1.0, 0.5], dtype=F64)


def _slope(hs, errs):
    return float(np.polyfit(np.log(hs), np.log(errs), 1)[0])


def _setup(order):
    """A linear problem and step counts that keep the errors well above round-off for this order."""
    # Step sizes are dyadic, so n steps of h land exactly on T (no sliver step at the end).
    if order >= 8:
        return 4 * A_BASE, 3.0, [8, 12, 16, 24]
    return A_BASE, 2.0, [8, 16, 32, 64]


def _fixed_options(method, h):
    if REGISTRY[method].adaptive:
        # An adaptive method at fixed steps: the step is pinned by first_step = min_step = max_step
        # (a step at min_step is accepted whatever its error).
        return {"first_step": h, "min_step": h, "max_step": h}
    return {"step_size": h}


@pytest.mark.parametrize("method", RK_METHODS)
def test_order_of_convergence_fixed_steps(method):
    order = TABLEAUS[method].order
    a, T, ns = _setup(order)
    reference = torch.linalg.matrix_exp(a * T) @ Y0
    t = torch.tensor([0.0, T], dtype=F64)
    hs, errs = [], []
    for n in ns:
        h = T / n
        sol = neuralode.solve(lambda t, y: a @ y, Y0, t, method=method, options=_fixed_options(method, h))
        assert sol.stats["n_accepted"] == n and sol.stats["n_rejected"] == 0
        hs.append(h)
        errs.append(float((sol.ys[-1] - reference).norm()))
    assert abs(_slope(hs, errs) - order) < 0.3, (method, errs)


@pytest.mark.parametrize("method", ["euler", "midpoint", "rk4", "bosh3", "dopri5"])
def test_order_of_convergence_backwards_in_time(method):
    order = TABLEAUS[method].order
    a, T, ns = _setup(order)
    reference = torch.linalg.matrix_exp(-a * T) @ Y0
    t = torch.tensor([T, 0.0], dtype=F64)
    hs, errs = [], []
    for n in ns:
        h = T / n
        sol = neuralode.solve(lambda t, y: a @ y, Y0, t, method=method, options=_fixed_options(method, h))
        assert sol.stats["n_accepted"] == n
        hs.append(h)
        errs.append(float((sol.ys[-1] - reference).norm()))
    assert abs(_slope(hs, errs) - order) < 0.3, (method, errs)


@pytest.mark.parametrize("method", ["rk4", "tsit5"])
def test_order_of_convergence_tuple_state(method):
    """The same linear system split into a tuple (x, v) converges at the same order."""
    order = TABLEAUS[method].order
    a, T, ns = _setup(order)
    reference = torch.linalg.matrix_exp(a * T) @ Y0

    def f(t, y):
        x, v = y
        return (a[0, 0] * x + a[0, 1] * v, a[1, 0] * x + a[1, 1] * v)

    y0 = (Y0[:1].clone(), Y0[1:].clone())
    hs, errs = [], []
    for n in ns:
        h = T / n
        x, v = neuralode.solve(f, y0, torch.tensor([0.0, T], dtype=F64), method=method,
                               options=_fixed_options(method, h)).ys
        hs.append(h)
        errs.append(float((torch.cat([x[-1], v[-1]]) - reference).norm()))
    assert abs(_slope(hs, errs) - order) < 0.3


@pytest.mark.parametrize("method", ADAPTIVE)
def test_error_estimate_order(method):
    """The embedded error estimate of one step scales like h**(error_order + 1) (dopri8's 5th-order
    estimator: h**6), which is the exponent the controller assumes. Uses the stepper directly."""
    tab = TABLEAUS[method]
    stepper = ExplicitRungeKutta(tab)
    y0 = torch.tensor([1.0, 0.5], dtype=F64)

    def f(t, y):  # nonlinear and time dependent, so no order condition is accidentally exact
        return torch.stack([y[1] * torch.cos(t), -torch.sin(y[0]) + 0.3 * t])

    def wrapped(t, y):
        return f(torch.tensor(t, dtype=F64), y)

    captured = []

    def norm(err, y0_, y1_):
        captured.append(float(err.norm()))
        return err.norm()

    expected = 6 if method == "dopri8" else tab.error_order + 1
    hs = [0.2, 0.1, 0.05, 0.025]
    errs = []
    for h in hs:
        captured.clear()
        stepper.step(wrapped, 0.3, y0, wrapped(0.3, y0), h, norm)
        errs.append(captured[0])
    assert abs(_slope(hs, errs) - expected) < 0.3, errs


# --- adaptive solves meet their tolerance ---------------------------------------------------------

def _closed_form_problems():
    a = A_BASE
    yield ("linear", lambda t, y: a @ y, Y0, 5.0, lambda T: torch.linalg.matrix_exp(a * T) @ Y0)
    # logistic growth y' = y (1 - y), y(0) = 0.1: y = 1 / (1 + 9 e^{-t})
    yield ("logistic", lambda t, y: y * (1 - y), torch.tensor([0.1], dtype=F64), 8.0,
           lambda T: torch.tensor([1 / (1 + 9 * math.exp(-T))], dtype=F64))
    # time dependent: y' = -2 t y, y = exp(-t^2)
    yield ("gaussian", lambda t, y: -2 * t * y, torch.tensor([1.0], dtype=F64), 3.0,
           lambda T: torch.tensor([math.exp(-T * T)], dtype=F64))


def _tolerances(method):
    # First-order error estimators need ~tol**-1/2 steps: keep their tolerances loose so the suite stays fast.
    return {1: (1e-3, 1e-5), 2: (1e-4, 1e-7)}.get(TABLEAUS[method].error_order, (1e-5, 1e-9))


# fehlberg2 (RKF1(2)) is excluded from "meets its tolerance": its estimator measures the error of the
# embedded *first*-order solution, whose h**2 error constant is only 1/512, so at practical step sizes it
# under-estimates the propagated solution's h**3 error by orders of magnitude (the global error is
# ~900x the tolerance on the linear problem, the same as torchdiffeq's fehlberg2). It is still checked for
# tolerance proportionality below.
MEETS_TOLERANCE = [m for m in ADAPTIVE if m != "fehlberg2"]


@pytest.mark.parametrize("method", ADAPTIVE)
def test_adaptive_tolerance_proportionality(method):
    """log(error) against log(tol) has a positive slope: tightening the tolerance always pays."""
    f, T = (lambda t, y: A_BASE @ y), 4.0
    exact = torch.linalg.matrix_exp(A_BASE * T) @ Y0
    loose, tight = _tolerances(method)
    tols = [loose, math.sqrt(loose * tight), tight]
    errs = []
    for tol in tols:
        sol = neuralode.solve(f, Y0, torch.tensor([0.0, T], dtype=F64), method=method, rtol=tol, atol=tol)
        errs.append(float((sol.ys[-1] - exact).abs().max()))
    assert _slope(tols, errs) > 0.5, errs


@pytest.mark.parametrize("method", MEETS_TOLERANCE)
@pytest.mark.parametrize("controller", ["integral", "pi"])
def test_adaptive_meets_tolerance_closed_form(method, controller):
    """Global error within a small multiple of the tolerance, and it shrinks as the tolerance does."""
    for label, f, y0, T, exact in _closed_form_problems():
        t = torch.tensor([0.0, T], dtype=F64)
        errs = []
        for tol in _tolerances(method):
            sol = neuralode.solve(f, y0, t, method=method, rtol=tol, atol=tol,
                                  options={"controller": controller})
            assert sol.success
            err = float((sol.ys[-1] - exact(T)).abs().max())
            scale = tol * (1 + float(exact(T).abs().max()))
            assert err <= 50 * scale, (label, tol, err)
            errs.append(err)
        assert errs[1] < errs[0], label


def _van_der_pol(t, y):
    return torch.stack([y[1], (1 - y[0] ** 2) * y[1] - y[0]])


@pytest.fixture(scope="module")
def scipy_van_der_pol():
    import scipy.integrate as scipy_integrate  # a test dependency
    t_eval = np.linspace(0.0, 6.0, 13)
    ref = scipy_integrate.solve_ivp(lambda t, y: [y[1], (1 - y[0] ** 2) * y[1] - y[0]], (0.0, 6.0), [2.0, 0.0],
                                    method="DOP853", rtol=1e-13, atol=1e-13, t_eval=t_eval)
    assert ref.success
    return torch.tensor(t_eval, dtype=F64), torch.tensor(ref.y.T, dtype=F64)


@pytest.mark.parametrize("method", MEETS_TOLERANCE)
def test_adaptive_meets_tolerance_against_scipy_reference(method, scipy_van_der_pol):
    t, reference = scipy_van_der_pol
    y0 = torch.tensor([2.0, 0.0], dtype=F64)
    tol = _tolerances(method)[1]
    sol = neuralode.solve(_van_der_pol, y0, t, method=method, rtol=tol, atol=tol)
    err = (sol.ys - reference).abs().max().item()
    assert err <= 50 * tol * (1 + reference.abs().max().item()), err


@pytest.mark.parametrize("method", ["dopri5", "tsit5", "bosh3"])
def test_adaptive_backwards_in_time(method):
    """Solving y' = A y backwards from T to 0 recovers exp(-A T) y0 to tolerance."""
    T = 5.0
    t = torch.tensor([T, 2.5, 0.0], dtype=F64)
    sol = neuralode.solve(lambda t, y: A_BASE @ y, Y0, t, method=method, rtol=1e-8, atol=1e-8)
    for i, ti in enumerate(t.tolist()):
        expected = torch.linalg.matrix_exp(A_BASE * (ti - T)) @ Y0
        assert (sol.ys[i] - expected).abs().max() < 1e-6
    assert torch.equal(sol.ts, t)
