"""Implicit Runge-Kutta tableaus: order conditions (rooted trees) for the full stage matrix, embedded
estimates and their sign, stage order, the derived structure/gamma/stiff accuracy, A- and L-stability
claims against the stability function, the dense outputs (Hermite, and the continuous extensions derived from
the stages), and validation errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
from test_tableaus import TREES, _satisfied_order

from neuralode.tableaus import TABLEAUS, hermite_dense
from neuralode.tableaus.implicit import IMPLICIT_TABLEAUS, ImplicitTableau, stability_function
from neuralode.tableaus.order_conditions import continuous_extension

NAMES = sorted(IMPLICIT_TABLEAUS)
# The literature's classification of each method (the tableau's own claims are checked against these,
# and both against R(z)).
L_STABLE = {"implicit_euler", "adaptive_implicit_euler", "radauIIA3", "radauIIA5", "sdirk2", "trbdf2", "kvaerno3",
            "kvaerno4", "kvaerno5"}
A_NOT_L = {"implicit_midpoint", "trapezoid", "gl4", "gl6"}
STRUCTURE = {
    "implicit_euler": ("sdirk", 1.0),
    "adaptive_implicit_euler": ("esdirk", 1.0),
    "implicit_midpoint": ("sdirk", 0.5),
    "trapezoid": ("esdirk", 0.5),
    "gl4": ("firk", None),
    "gl6": ("firk", None),
    "radauIIA3": ("firk", None),
    "radauIIA5": ("firk", None),
    "sdirk2": ("sdirk", 1 - math.sqrt(2) / 2),
    # Hosea and Shampine's gamma = 2 - sqrt(2) is c_2; the SDIRK diagonal is half of it.
    "trbdf2": ("esdirk", 1 - math.sqrt(2) / 2),
    "kvaerno3": ("esdirk", 0.4358665215),
    "kvaerno4": ("esdirk", 0.5728160625),
    "kvaerno5": ("esdirk", 0.26),
}
# The trapezoidal rule has b equal to the last row of a as well, though its a is singular (see below).
STIFFLY_ACCURATE = {"implicit_euler", "adaptive_implicit_euler", "radauIIA3", "radauIIA5", "sdirk2", "trbdf2",
                    "trapezoid", "kvaerno3", "kvaerno4", "kvaerno5"}


def _a(tab):
    return np.asarray(tab.a, dtype=np.float64)


def test_the_methods():
    assert set(NAMES) == set(STRUCTURE) == L_STABLE | A_NOT_L
    for name, tab in IMPLICIT_TABLEAUS.items():
        assert tab.name == name and tab.reference
    # One registry will hold both kinds, so no implicit name may shadow an explicit one.
    assert not set(IMPLICIT_TABLEAUS) & set(TABLEAUS)


def test_trees_reach_the_highest_order():
    assert max(tab.order for tab in IMPLICIT_TABLEAUS.values()) + 1 <= max(TREES)


# --- order ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", NAMES)
def test_identities(name):
    tab = IMPLICIT_TABLEAUS[name]
    s = tab.stages
    assert len(tab.a) == s and all(len(row) == s for row in tab.a) and len(tab.b) == s
    assert np.allclose(_a(tab).sum(axis=1), tab.c, atol=1e-12, rtol=0)
    assert abs(sum(tab.b) - 1) <= 1e-12
    if tab.adaptive:
        # (adaptive implicit Euler propagates the lower order: its embedded trapezoid is of order 2)
        assert abs(sum(tab.b_err)) <= 1e-12 and tab.error_order < tab.order or name == "adaptive_implicit_euler"
    else:
        assert tab.b_err is None and tab.error_order is None


@pytest.mark.parametrize("name", NAMES)
def test_classical_order_is_exact(name):
    """b satisfies every rooted-tree condition up to ``order`` and fails one of order ``order + 1``."""
    tab = IMPLICIT_TABLEAUS[name]
    assert _satisfied_order(_a(tab), np.asarray(tab.b), tab.order + 1) == tab.order


@pytest.mark.parametrize("name", [n for n in NAMES if IMPLICIT_TABLEAUS[n].adaptive])
def test_embedded_order_is_exact(name):
    tab = IMPLICIT_TABLEAUS[name]
    b_hat = np.asarray(tab.b) - np.asarray(tab.b_err)
    assert _satisfied_order(_a(tab), b_hat, tab.error_order + 1) == tab.error_order


@pytest.mark.parametrize("name", ["kvaerno3", "kvaerno4", "kvaerno5"])
def test_kvaerno_embedded_solution_is_the_penultimate_stage(name):
    """The order test cannot see the sign of b_err (2 b - b_hat has the same order as b_hat); Kvaerno's
    embedded solution is the stage value Y_{s-1} at c = 1, which pins the sign: b_err = b - b_hat."""
    tab = IMPLICIT_TABLEAUS[name]
    assert tab.c[-2] == 1.0
    assert np.allclose(np.asarray(tab.b) - np.asarray(tab.b_err), tab.a[-2], atol=1e-15, rtol=0)


@pytest.mark.parametrize("name, printed", [("kvaerno3", 0.4358665215), ("kvaerno4", 0.5728160625)])
def test_kvaerno_gamma_is_the_printed_root(name, printed):
    """We polish the paper's 10-digit gamma to the root of the L-stability polynomial; it must round back."""
    assert round(IMPLICIT_TABLEAUS[name].gamma, 10) == printed


def _stage_order(tab, max_q=10):
    """Largest q with C(q): A c**(k-1) = c**k / k for k = 1..q."""
    a, c = _a(tab), np.asarray(tab.c)
    q = 0
    while q < max_q and np.allclose(a @ c ** q, c ** (q + 1) / (q + 1), atol=1e-12, rtol=0):
        q += 1
    return q


@pytest.mark.parametrize("name", NAMES)
def test_stage_order(name):
    tab = IMPLICIT_TABLEAUS[name]
    assert tab.stage_order is not None
    assert _stage_order(tab) == tab.stage_order


# --- derived structure ----------------------------------------------------------------------------

@pytest.mark.parametrize("name", NAMES)
def test_structure_and_gamma_are_derived(name):
    tab = IMPLICIT_TABLEAUS[name]
    structure, gamma = STRUCTURE[name]
    assert tab.structure == structure
    if gamma is None:
        assert tab.gamma is None
    else:
        # kvaerno3/4 are compared with the paper's 10 printed digits.
        assert tab.gamma == pytest.approx(gamma, rel=0, abs=1e-10)
        a = _a(tab)
        assert np.all(np.triu(a, 1) == 0)
        first = 1 if structure == "esdirk" else 0
        assert np.all(np.diag(a)[first:] == tab.gamma)
        if structure == "esdirk":
            assert tab.c[0] == 0 and not np.any(a[0])


@pytest.mark.parametrize("name", NAMES)
def test_stiff_accuracy_is_derived(name):
    tab = IMPLICIT_TABLEAUS[name]
    assert tab.stiffly_accurate is (name in STIFFLY_ACCURATE)
    if tab.stiffly_accurate:
        assert tab.c[-1] == 1.0 and np.allclose(tab.b, tab.a[-1], atol=1e-14, rtol=0)


def _make(**overrides):
    kwargs = dict(name="bad_method", c=(0.0, 1.0), a=((0.0, 0.0), (0.5, 0.5)), b=(0.5, 0.5), order=2)
    kwargs.update(overrides)
    return ImplicitTableau(**kwargs)


@pytest.mark.parametrize("a, structure, gamma", [
    (((0.0, 0.0), (0.5, 0.5)), "esdirk", 0.5),
    (((0.25, 0.0), (0.5, 0.25)), "sdirk", 0.25),
    (((0.0, 0.0), (0.5, 0.25)), "esdirk", 0.25),
    (((0.5, 0.0), (0.25, 0.25)), "dirk", None),
    (((0.0, 0.0), (1.0, 0.0)), "dirk", None),  # an explicit method written as a full matrix
    (((0.25, -0.25), (0.5, 0.5)), "firk", None),
])
def test_structure_of_small_matrices(a, structure, gamma):
    c = tuple(sum(row) for row in a)
    tab = _make(c=c, a=a, b=(0.5, 0.5), order=1)
    assert (tab.structure, tab.gamma) == (structure, gamma)


# --- linear stability -----------------------------------------------------------------------------

def test_stability_function_closed_forms():
    """Hairer and Wanner II, Sec. IV.3-IV.5: the known rational functions."""
    tab = IMPLICIT_TABLEAUS
    for z in (-0.3 + 0.1j, 2.5j, -40.0, 0.7):
        assert stability_function(tab["implicit_euler"], z) == pytest.approx(1 / (1 - z), rel=1e-14)
        pade11 = (1 + z / 2) / (1 - z / 2)
        assert stability_function(tab["implicit_midpoint"], z) == pytest.approx(pade11, rel=1e-14)
        assert stability_function(tab["trapezoid"], z) == pytest.approx(pade11, rel=1e-14)
        radau3 = (1 + z / 3) / (1 - 2 * z / 3 + z ** 2 / 6)
        assert stability_function(tab["radauIIA3"], z) == pytest.approx(radau3, rel=1e-13)


def test_stability_function_broadcasts():
    tab = IMPLICIT_TABLEAUS["radauIIA5"]
    z = np.array([[-1.0, 2j], [-3 + 1j, 0.0]])
    r = stability_function(tab, z)
    assert r.shape == (2, 2)
    assert all(r[i, j] == pytest.approx(stability_function(tab, complex(z[i, j])), rel=1e-14)
               for i in range(2) for j in range(2))
    assert isinstance(stability_function(tab, -1.0), complex)


@pytest.mark.parametrize("name", NAMES)
def test_claims_match_the_literature(name):
    tab = IMPLICIT_TABLEAUS[name]
    assert tab.a_stable
    assert tab.l_stable is (name in L_STABLE)


_IMAG_AXIS = 1j * np.concatenate([np.linspace(-1e4, 1e4, 2001), np.linspace(-10, 10, 2001)])
_radii = np.logspace(-3, 8, 45)
_angles = np.linspace(-np.pi / 2, np.pi / 2, 41)[1:-1]  # open left half-plane
_LEFT_HALF_PLANE = -(np.outer(_radii, np.exp(1j * _angles))).ravel()


@pytest.mark.parametrize("name", [n for n in NAMES if IMPLICIT_TABLEAUS[n].a_stable])
def test_a_stability(name):
    """|R| <= 1 on the imaginary axis and at sampled points with Re z < 0, and no pole there: the poles of
    R are among 1/lambda for the nonzero eigenvalues lambda of A (maximum principle, HW II Sec. IV.3)."""
    tab = IMPLICIT_TABLEAUS[name]
    assert np.max(np.abs(stability_function(tab, _IMAG_AXIS))) <= 1 + 1e-12
    assert np.all(_LEFT_HALF_PLANE.real < 0)
    assert np.max(np.abs(stability_function(tab, _LEFT_HALF_PLANE))) <= 1 + 1e-12
    eigenvalues = np.linalg.eigvals(_a(tab))
    nonzero = eigenvalues[np.abs(eigenvalues) > 1e-12]
    assert np.all(nonzero.real > 0)


@pytest.mark.parametrize("name", NAMES)
def test_l_stability_claim(name):
    """L-stable: R(z) -> 0 as z -> -infinity; A- but not L-stable: |R(-infinity)| = 1 (Gauss, trapezoid)."""
    tab = IMPLICIT_TABLEAUS[name]
    far = abs(stability_function(tab, -1e8))
    far_off_axis = abs(stability_function(tab, -1e8 + 1e3j))
    if tab.l_stable:
        assert far < 1e-6 and far_off_axis < 1e-6
    else:
        assert abs(far - 1) < 1e-6 and abs(far_off_axis - 1) < 1e-6


def test_stiffly_accurate_with_invertible_a_is_l_stable():
    """R(infinity) = 1 - b^T A^{-1} 1 = 1 - e_s^T 1 = 0 when b is the last row of an invertible A. The
    trapezoid rule shows why invertibility matters: stiffly accurate, singular A, R(infinity) = -1."""
    for tab in IMPLICIT_TABLEAUS.values():
        if tab.stiffly_accurate and abs(np.linalg.det(_a(tab))) > 1e-12:
            assert tab.l_stable, tab.name
    assert abs(stability_function(IMPLICIT_TABLEAUS["trapezoid"], -1e8) + 1) < 1e-6


# --- dense output ---------------------------------------------------------------------------------

# Tableaus whose dense output is derived from their stages (dense_order); the others interpolate by cubic Hermite.
DERIVED_DENSE = {"kvaerno5": 4, "radauIIA5": 3}


def test_the_derived_dense_outputs_are_the_listed_ones():
    assert {n: t.dense_order for n, t in IMPLICIT_TABLEAUS.items() if t.dense_order} == DERIVED_DENSE


@pytest.mark.parametrize("name", [n for n in NAMES if n not in DERIVED_DENSE])
def test_dense_is_the_hermite_cubic(name):
    tab = IMPLICIT_TABLEAUS[name]
    expected = hermite_dense(tab.b, fsal=tab.stiffly_accurate)
    assert np.array_equal(tab.dense, expected)
    assert tab.dense.shape == (tab.stages if tab.stiffly_accurate else tab.stages + 1, 3)
    # theta = 1 reproduces y1 = y0 + h sum_j b_j k_j.
    ones = tab.dense.sum(axis=1)
    assert np.allclose(ones[:tab.stages], tab.b, atol=1e-14, rtol=0)
    assert np.allclose(ones[tab.stages:], 0, atol=1e-14)


@pytest.mark.parametrize("name", [n for n in NAMES
                                  if IMPLICIT_TABLEAUS[n].structure == "esdirk" and n not in DERIVED_DENSE])
def test_esdirk_dense_output_is_a_continuous_extension(name):
    """With an explicit first stage (k_0 = f(t0, y0)) and stiff accuracy (k_{s-1} = f(t1, y1)), the dense rows
    are weights on the stages alone, and b(theta) satisfies the order conditions up to min(3, order)."""
    tab = IMPLICIT_TABLEAUS[name]
    assert tab.stiffly_accurate and tab.c[0] == 0
    powers = np.arange(1, 4)
    q = min(3, tab.order)
    for theta in (0.1, 0.3, 0.5, 0.77, 1.0):
        assert _satisfied_order(_a(tab), tab.dense @ theta ** powers, q, theta) >= q, theta


def _dense_stability(tab, z: float, theta: float) -> float:
    """y(t0 + theta h) / y0 of the dense output on y' = lambda y, z = h lambda: 1 + z b(theta)^T (I - z A)^{-1} 1."""
    a = _a(tab)
    b_theta = tab.dense @ theta ** np.arange(1, tab.dense.shape[1] + 1)
    return float(1 + z * b_theta @ np.linalg.solve(np.eye(len(a)) - z * a, np.ones(len(a))))


@pytest.mark.parametrize("name", sorted(DERIVED_DENSE))
def test_derived_dense_output_has_its_order_and_ends(name):
    """b(theta) meets the order conditions up to dense_order at every theta (and no higher, at interior theta),
    reproduces b at theta = 1, and its derivative there is the last stage, f(t0 + h, y1): the output is C1 at the
    step's end."""
    tab = IMPLICIT_TABLEAUS[name]
    q = tab.dense_order
    powers = np.arange(1, tab.dense.shape[1] + 1)
    assert tab.dense.shape == (tab.stages, q)
    for theta in (0.1, 0.3, 0.5, 0.77):
        assert _satisfied_order(_a(tab), tab.dense @ theta ** powers, q + 1, theta) == q, theta
    np.testing.assert_allclose(tab.dense.sum(axis=1), tab.b, rtol=0, atol=1e-13)
    np.testing.assert_allclose(tab.dense @ powers, np.eye(tab.stages)[-1], rtol=0, atol=1e-12)


def test_kvaerno5_dense_output_is_bounded_in_the_stiff_limit_where_the_hermite_cubic_is_not():
    """On y' = lambda y the cubic Hermite's h f0 term grows like h lambda (0.125 z at theta = 1/2); the derived
    output is built to stay bounded (b(theta) orthogonal to the stage values' limit)."""
    tab = IMPLICIT_TABLEAUS["kvaerno5"]
    hermite = ImplicitTableau("k5_hermite", c=tab.c, a=tab.a, b=tab.b, order=5)
    for theta in (0.25, 0.5, 0.75):
        values = [abs(_dense_stability(tab, z, theta)) for z in (-1e4, -1e6, -1e8)]
        assert max(values) < 10 and abs(values[-1] - values[-2]) < 1e-3, (theta, values)
        assert abs(_dense_stability(hermite, -1e8, theta)) > 1e6


def test_radau_iia5_dense_output_is_its_collocation_polynomial():
    """The collocation polynomial u passes through the stage values: u(c_i) = y0 + h sum_j a_ij k_j, i.e.
    b(c_i) = row i of A (scipy's Radau and Hairer's RADAU5 interpolate with it)."""
    tab = IMPLICIT_TABLEAUS["radauIIA5"]
    for i, c in enumerate(tab.c):
        np.testing.assert_allclose(tab.dense @ c ** np.arange(1, 4), _a(tab)[i], rtol=0, atol=1e-12)


def test_continuous_extension_reports_an_order_out_of_reach():
    tab = IMPLICIT_TABLEAUS["kvaerno5"]
    assert continuous_extension(_a(tab), tab.b, 5, end_derivative=tab.stages - 1) is None
    with pytest.raises(ValueError, match="no dense output of order 5"):
        ImplicitTableau("k5", c=tab.c, a=tab.a, b=tab.b, order=5, dense_order=5)
    with pytest.raises(ValueError, match="dense_order 6 must be in"):
        ImplicitTableau("k5", c=tab.c, a=tab.a, b=tab.b, order=5, dense_order=6)


# --- the dataclass validates itself ---------------------------------------------------------------

def test_valid_tableau_constructs():
    tab = _make()
    assert tab.stages == 2 and not tab.adaptive and tab.structure == "esdirk" and tab.stiffly_accurate
    assert isinstance(tab.a[1], tuple) and isinstance(tab.c, tuple)


@pytest.mark.parametrize("overrides, match", [
    (dict(a=((0.0, 0.0), (0.5, 0.4))), "row 1 of a sums to"),
    (dict(c=(0.1, 1.0)), "row 0 of a sums to"),
    (dict(b=(0.5, 0.6)), "the weights b sum to"),
    (dict(a=((0.0,), (0.5, 0.5))), "a must be a square 2 x 2 matrix"),
    (dict(a=((0.0, 0.0), (0.5, 0.5), (0.0, 0.0))), "a must be a square 2 x 2 matrix"),
    (dict(a=((0.0, 0.0, 0.0), (0.5, 0.5, 0.0))), "a must be a square 2 x 2 matrix"),
    (dict(b=(1.0,)), "b has 1 entries, expected 2"),
    (dict(b_err=(0.1, 0.0), error_order=1), "b_err sums to"),
    (dict(b_err=(0.1, -0.1)), "b_err and error_order go together"),
    (dict(error_order=1), "b_err and error_order go together"),
    (dict(b_err=(0.1, -0.1, 0.0), error_order=1), "b_err has 3 entries"),
    (dict(b_err=(0.1, -0.1), error_order=2), "error_order 2 must be at least 1 and differ from order=2"),
    (dict(stage_order=3), "stage_order 3 must be in"),
    (dict(l_stable=True), "L-stability includes A-stability"),
    (dict(order=0), "order must be at least 1"),
    (dict(c=(), a=(), b=()), "a method needs at least one stage"),
    (dict(b=(0.5, float("nan"))), "coefficients must be finite"),
])
def test_invalid_tableaus_are_rejected_by_name(overrides, match):
    with pytest.raises(ValueError, match="^bad_method: " + match):
        _make(**overrides)


def test_frozen():
    with pytest.raises(Exception):
        IMPLICIT_TABLEAUS["kvaerno5"].order = 4
