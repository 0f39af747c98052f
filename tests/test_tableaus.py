"""Butcher tableau identities for every method: row sums, weights, order conditions (rooted trees),
embedded error estimators, FSAL, and the order of the continuous extension (dense output)."""

from __future__ import annotations

import numpy as np
import pytest

from neuralode.tableaus import TABLEAUS, ButcherTableau, hermite_dense
from neuralode.tableaus.order_conditions import rooted_trees, satisfied_order

NAMES = sorted(TABLEAUS)
TOL = 1e-12

# Order of the dense output: the published continuous extensions, cubic Hermite (order 3) otherwise.
DENSE_ORDER = {"dopri5": 4, "tsit5": 4, "dopri8": 7}


TREES = {n: rooted_trees(n) for n in range(1, 10)}


def _full_a(tab):
    s = tab.stages
    a = np.zeros((s, s))
    for i, row in enumerate(tab.a):
        a[i, :i] = row
    return a


def _satisfied_order(a, b, max_order, theta=1.0):
    """Largest p such that every tree of order <= p satisfies b . g(tree) = theta**|t| / gamma(t)."""
    return satisfied_order(a, b, max_order, theta)[0]


def test_tree_counts():
    # A000081: number of rooted trees of order n.
    assert [len(TREES[n]) for n in range(1, 10)] == [1, 1, 2, 4, 9, 20, 48, 115, 286]


@pytest.mark.parametrize("name", NAMES)
def test_row_sums_and_weights(name):
    tab = TABLEAUS[name]
    assert tab.name == name
    assert tab.c[0] == 0
    for i in range(1, tab.stages):
        assert len(tab.a[i]) == i
        assert abs(sum(tab.a[i]) - tab.c[i]) <= TOL
    assert abs(sum(tab.b) - 1) <= TOL
    if tab.adaptive:
        assert abs(sum(tab.b_err)) <= TOL
        assert tab.error_order is not None and tab.error_order < tab.order
    else:
        assert tab.b_err is None and tab.error_order is None


@pytest.mark.parametrize("name", NAMES)
def test_classical_order_is_exact(name):
    """b satisfies every order condition up to ``order`` and fails one of order ``order + 1``."""
    tab = TABLEAUS[name]
    a, b = _full_a(tab), np.asarray(tab.b)
    assert _satisfied_order(a, b, tab.order + 1) == tab.order


@pytest.mark.parametrize("name", [n for n in NAMES if TABLEAUS[n].adaptive])
def test_embedded_order(name):
    """The embedded solution b - b_err has order ``error_order`` exactly (DOP853's 5th-order estimator
    has order 5 and its 3rd-order one order 3; the controller uses the 8th-order solution's exponent)."""
    tab = TABLEAUS[name]
    a = _full_a(tab)
    b_hat = np.asarray(tab.b) - np.asarray(tab.b_err)
    if name == "dopri8":
        assert _satisfied_order(a, b_hat, 6) == 5
        b_low = np.asarray(tab.b) - np.asarray(tab.b_err_low)
        assert _satisfied_order(a, b_low, 4) == 3
        assert tab.error_order == 7
    else:
        assert _satisfied_order(a, b_hat, tab.error_order + 1) == tab.error_order


EXPECTED_FSAL = {"bosh3": True, "dopri5": True, "tsit5": True}


@pytest.mark.parametrize("name", NAMES)
def test_fsal_is_derived(name):
    assert TABLEAUS[name].fsal is EXPECTED_FSAL.get(name, False)


def _dense_stages(tab):
    """(A, c) of the dense stages: the method's stages, f(t0 + h, y1) if not FSAL, then extra stages."""
    s = tab.stages
    rows = [list(r) for r in tab.a]
    cs = list(tab.c)
    if not tab.fsal:
        rows.append(list(tab.b))
        cs.append(1.0)
    for c, row in zip(tab.extra_c, tab.extra_a):
        rows.append(list(row))
        cs.append(c)
    n = len(rows)
    a = np.zeros((n, n))
    for i, row in enumerate(rows):
        a[i, :len(row)] = row
    assert tab.dense.shape[0] == n
    assert np.allclose(a.sum(axis=1), cs, atol=1e-12)
    del s
    return a


@pytest.mark.parametrize("name", NAMES)
def test_dense_output_order_conditions(name):
    """b_j(theta) = sum_m B[j, m] theta**(m+1) satisfies the order conditions with theta**|t| / gamma(t)
    for every tree up to the interpolant's order, at several theta (a continuous Runge-Kutta method)."""
    tab = TABLEAUS[name]
    a = _dense_stages(tab)
    q = DENSE_ORDER.get(name, 3 if tab.order >= 3 else tab.order)
    powers = np.arange(1, tab.dense.shape[1] + 1)
    for theta in (0.1, 0.3, 0.5, 0.77, 1.0):
        b_theta = tab.dense @ theta ** powers
        assert _satisfied_order(a, b_theta, q, theta) >= q, (name, theta)


@pytest.mark.parametrize("name", NAMES)
def test_dense_output_endpoints(name):
    """theta = 0 gives y0 (no constant term in B) and theta = 1 gives y1 = y0 + h sum b_j k_j."""
    tab = TABLEAUS[name]
    ones = tab.dense.sum(axis=1)
    assert np.allclose(ones[:tab.stages], tab.b, atol=1e-12)
    assert np.allclose(ones[tab.stages:], 0, atol=1e-12)


def test_hermite_dense_is_the_cubic_hermite_basis():
    b = (0.25, 0.75)
    d = hermite_dense(b, fsal=False)
    # y(theta) - y0 = h [f0 H10 + D H01 + f1 H11] with D = sum b_j k_j.
    for theta in (0.2, 0.6, 1.0):
        th = np.array([theta, theta ** 2, theta ** 3])
        w = d @ th
        h10 = theta - 2 * theta ** 2 + theta ** 3
        h01 = 3 * theta ** 2 - 2 * theta ** 3
        h11 = -theta ** 2 + theta ** 3
        assert np.allclose(w, [h10 + b[0] * h01, b[1] * h01, h11], atol=1e-14)


# --- the dataclass validates itself ---------------------------------------------------------------

def _make(**overrides):
    kwargs = dict(name="bad", c=(0.0, 0.5), a=((), (0.5,)), b=(0.0, 1.0), order=2)
    kwargs.update(overrides)
    return ButcherTableau(**kwargs)


def test_valid_tableau_constructs():
    tab = _make()
    assert tab.stages == 2 and not tab.adaptive and not tab.fsal


@pytest.mark.parametrize("overrides, match", [
    (dict(c=(0.1, 0.5)), "c\\[0\\] must be 0"),
    (dict(a=((), (0.4,))), "row 1 of a sums to"),
    (dict(a=((), (0.25, 0.25))), "strictly lower triangular"),
    (dict(b=(0.1, 1.0)), "the weights b sum to"),
    (dict(b=(1.0,)), "b has 1 entries, expected 2"),
    (dict(b_err=(0.1, 0.0), error_order=1), "b_err sums to"),
    (dict(b_err=(0.1, -0.1)), "b_err and error_order go together"),
    (dict(b_err=(0.1, -0.1, 0.0), error_order=1), "b_err has 3 entries"),
    (dict(dense=np.zeros((3, 2))), "does not reproduce y1"),
    (dict(dense=np.zeros((2, 2))), "dense has 2 rows, expected 3"),
])
def test_invalid_tableaus_are_rejected(overrides, match):
    with pytest.raises(ValueError, match=match):
        _make(**overrides)


def test_frozen():
    with pytest.raises(Exception):
        TABLEAUS["rk4"].order = 3


def test_a_tableau_that_does_not_have_its_claimed_order_is_refused():
    # The docstring of solve() said so; only row sums and weights were checked, so order=4 on Euler's
    # coefficients was accepted (a controller exponent and an error estimate built on a false order).
    with pytest.raises(ValueError, match=r"order=4 is claimed, but the weights b meet the order conditions only up "
                                         r"to order 1 \(a condition of order 2 fails\)"):
        ButcherTableau("euler-as-rk4", c=(0.0,), a=((),), b=(1.0,), order=4)
    # Heun's method is order 2, not 3: the third-order condition b . c^2 = 1/3 fails (1/2)
    with pytest.raises(ValueError, match=r"only up to order 2"):
        ButcherTableau("heun-as-3", c=(0.0, 1.0), a=((), (1.0,)), b=(0.5, 0.5), order=3)
    assert ButcherTableau("heun", c=(0.0, 1.0), a=((), (1.0,)), b=(0.5, 0.5), order=2).order == 2
