"""Implicit Runge-Kutta methods as validated data.

An implicit method is an :class:`ImplicitTableau`: stage times ``c``, the *full* ``s x s`` stage matrix
``a``, weights ``b`` and, for adaptive pairs, error weights ``b_err = b - b_hat`` (Hairer and Wanner,
"Solving Ordinary Differential Equations II", 2nd ed., 1996, Sec. IV.3-IV.6). A step solves

    Y_i = y0 + h sum_j a[i][j] f(t0 + c_i h, Y_j),    y1 = y0 + h sum_j b_j f(t0 + c_j h, Y_j)

for the stage values ``Y_i``. The shape of ``a`` decides how much of that system is coupled, so the
tableau derives it once (``structure``) and the stepper reads it instead of re-testing the matrix:

- ``"esdirk"``: explicit first stage (``c_0 = 0``, first row zero, so ``k_0 = f(t0, y0)``), then
  lower-triangular rows with one common diagonal ``gamma``: ``s - 1`` solves of size ``n`` that share
  one iteration matrix ``I - h gamma J``;
- ``"sdirk"``: lower triangular with a common nonzero diagonal ``gamma``: ``s`` such solves;
- ``"dirk"``: any other lower-triangular ``a`` (one iteration matrix per distinct diagonal entry);
- ``"firk"``: fully implicit, one coupled system of size ``s n`` per step (Radau IIA, Gauss).

The linear stability function ``R(z) = 1 + z b^T (I - z a)^{-1} 1`` (:func:`stability_function`) is
what the ``a_stable``/``l_stable`` claims are about; the tests check each claim against it.

Dense output is, for a tableau that gives ``dense_order``, a continuous extension derived from its stages
(kvaerno5: order 4; Radau IIA 5: its collocation polynomial, order 3); otherwise the cubic Hermite interpolant
through ``y0, f0, y1, f1`` in the form the explicit tableaus use (:func:`neuralode.tableaus.hermite_dense`); when
the method is stiffly accurate the last stage already is ``f(t0 + h, y1)`` and doubles as ``f1``. Between the
long steps of a stiff solve either is far less accurate than the steps themselves, so the implicit methods step
onto the output times by default (``land_on_outputs``, docs/solvers.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

# tableaus/__init__ defines both helpers before its registry, so a registry there that imports this module
# must do so after them (at the bottom of the file), or the import cycle sees a half-built package.
from . import _f, hermite_dense
from .order_conditions import continuous_extension

__all__ = ["ImplicitTableau", "IMPLICIT_TABLEAUS", "stability_function"]

_IDENTITY_TOL = 1e-12
# Entries that are equal by construction (a common diagonal, b equal to the last row of a) are written
# as the same float expression, so they agree to rounding; 1e-14 is many ulps above that and far below
# any genuine difference between two coefficients.
_EQUAL_TOL = 1e-14


@dataclass(frozen=True, eq=False)
class ImplicitTableau:
    """An implicit Runge-Kutta method with a full stage matrix.

    Parameters
    ----------
    name : str
        The method name used by ``solve``/``odeint``.
    c : tuple of float, shape (s,)
        Stage times as fractions of the step.
    a : tuple of s tuples of s floats
        The full stage matrix; ``a[i][j]`` weights stage ``j`` in stage ``i``.
    b : tuple of float, shape (s,)
        Weights of the propagated solution.
    order : int
        Classical order of the propagated solution.
    b_err : tuple of float or None, shape (s,)
        ``b - b_hat`` for an embedded solution ``b_hat`` of order ``error_order``; sums to zero.
        ``None`` for fixed-step methods and for methods whose error estimate is not a linear
        combination of the stages (Radau IIA 5, whose estimate the stepper computes).
    error_order : int or None
        Order of the embedded solution; given together with ``b_err``. Usually below ``order``; above it where the
        method propagates the lower-order solution (adaptive implicit Euler), and the step-size controller then
        assumes the lower of the two.
    stage_order : int or None
        Largest ``q`` with ``sum_j a[i][j] c_j**(k-1) = c_i**k / k`` for all ``i`` and ``k <= q``
        (the simplifying assumption C(q)); the order a method keeps on very stiff problems is governed by it.
    dense_order : int or None
        The order of a dense output derived from the stages (see ``dense``); ``None``: the cubic Hermite.
        Given where the derived one is measured to be the better: it raises kvaerno5's dense order from 3
        to 4, and for Radau IIA 5 it is the collocation polynomial (RADAU5's and scipy's dense output).
    a_stable, l_stable : bool
        Claims from the literature: ``|R(z)| <= 1`` on the closed left half-plane, and in addition
        ``R(z) -> 0`` as ``z -> -infinity``. ``l_stable`` implies ``a_stable``.
    reference : str
        Where the coefficients come from.

    Attributes
    ----------
    structure : {"esdirk", "sdirk", "dirk", "firk"}
        The shape of ``a``, derived (see the module docstring).
    gamma : float or None
        The common diagonal of an SDIRK/ESDIRK method, else ``None``.
    stiffly_accurate : bool
        ``c[-1] == 1`` and ``b`` equals the last row of ``a``, so ``y1`` is the last stage value
        (Hairer and Wanner II, Sec. IV.6). Then ``R(infinity) = 0`` whenever ``a`` is invertible, and the
        last stage derivative is ``f(t0 + h, y1)``.
    dense : numpy.ndarray, shape (s, dense_order), or (s or s + 1, 3) without a dense_order
        With ``dense_order``: the weights ``b(theta) = dense @ (theta, ..., theta**dense_order)`` of the
        continuous extension derived from the stages
        (:func:`~neuralode.tableaus.order_conditions.continuous_extension`): order ``dense_order`` at every
        theta, ``b(1) = b``, the derivative at the step's end ``f(t0 + h, y1)`` when stiffly accurate (at the
        start it is not ``f0``: values, not slopes, are continuous across steps), and bounded as
        ``h lambda -> -infinity``. Without one:
        ``hermite_dense(b, fsal=stiffly_accurate)``, the cubic Hermite interpolant through
        ``y0, f0, y1, f1`` in the power basis of theta. Its rows follow the explicit tableaus'
        convention: row ``0`` carries the ``f0`` coefficient, row ``s`` (when present) ``f1``. Row ``0``
        is the first stage derivative only when ``c[0] == 0`` (ESDIRK); otherwise the stepper evaluates
        ``f(t0, y0)`` itself (or keeps it from the previous step) and the row's ``b_0`` part still
        belongs to ``k_0``.

    Raises
    ------
    ValueError
        If an identity fails (row sums of ``a`` are ``c``, ``sum(b) == 1``, ``sum(b_err) == 0``), the
        shapes disagree, or the claims contradict each other; the message names the method.
    """

    name: str
    c: tuple
    a: tuple
    b: tuple
    order: int
    b_err: tuple | None = None
    error_order: int | None = None
    stage_order: int | None = None
    dense_order: int | None = None
    a_stable: bool = False
    l_stable: bool = False
    reference: str = ""
    structure: str = field(init=False)
    gamma: float | None = field(init=False)
    stiffly_accurate: bool = field(init=False)
    dense: np.ndarray = field(init=False)

    def __post_init__(self):
        name = self.name
        s = len(self.c)
        if s == 0:
            raise ValueError(f"{name}: a method needs at least one stage")
        if len(self.a) != s or any(len(row) != s for row in self.a):
            shape = [len(row) for row in self.a]
            raise ValueError(f"{name}: a must be a square {s} x {s} matrix (one row per stage time), "
                             f"got rows of lengths {shape}")
        if len(self.b) != s:
            raise ValueError(f"{name}: b has {len(self.b)} entries, expected {s}")
        # Store plain float tuples so that the data is immutable whatever sequence type came in.
        object.__setattr__(self, "c", tuple(float(x) for x in self.c))
        object.__setattr__(self, "a", tuple(tuple(float(x) for x in row) for row in self.a))
        object.__setattr__(self, "b", tuple(float(x) for x in self.b))
        if not all(math.isfinite(x) for x in self.c + self.b + sum(self.a, ())):
            raise ValueError(f"{name}: coefficients must be finite")
        for i, (ci, row) in enumerate(zip(self.c, self.a)):
            if abs(sum(row) - ci) > _IDENTITY_TOL * max(1.0, abs(ci)):
                raise ValueError(f"{name}: row {i} of a sums to {sum(row)}, not c[{i}]={ci}")
        if abs(sum(self.b) - 1) > _IDENTITY_TOL:
            raise ValueError(f"{name}: the weights b sum to {sum(self.b)}, not 1")
        if (self.b_err is None) != (self.error_order is None):
            raise ValueError(f"{name}: b_err and error_order go together")
        if self.b_err is not None:
            if len(self.b_err) != s:
                raise ValueError(f"{name}: b_err has {len(self.b_err)} entries, expected {s}")
            object.__setattr__(self, "b_err", tuple(float(x) for x in self.b_err))
            if abs(sum(self.b_err)) > _IDENTITY_TOL:
                raise ValueError(f"{name}: b_err sums to {sum(self.b_err)}, not 0")
            # (error_order > order: a pair that propagates the lower-order solution, adaptive implicit Euler's)
            if self.error_order < 1 or self.error_order == self.order:
                raise ValueError(f"{name}: error_order {self.error_order} must be at least 1 and differ from "
                                 f"order={self.order} (an estimate needs two solutions of different orders)")
        if self.order < 1:
            raise ValueError(f"{name}: order must be at least 1, got {self.order}")
        if self.stage_order is not None and not 1 <= self.stage_order <= self.order:
            raise ValueError(f"{name}: stage_order {self.stage_order} must be in [1, order={self.order}]")
        if self.l_stable and not self.a_stable:
            raise ValueError(f"{name}: L-stability includes A-stability; set a_stable=True too")

        structure, gamma = _structure(self.a)
        object.__setattr__(self, "structure", structure)
        object.__setattr__(self, "gamma", gamma)
        stiffly_accurate = abs(self.c[-1] - 1) <= _EQUAL_TOL and all(
            abs(bj - aj) <= _EQUAL_TOL for bj, aj in zip(self.b, self.a[-1]))
        object.__setattr__(self, "stiffly_accurate", stiffly_accurate)
        if self.dense_order is None:
            object.__setattr__(self, "dense", hermite_dense(self.b, fsal=stiffly_accurate))
        else:
            if not 1 <= self.dense_order <= self.order:
                raise ValueError(f"{name}: dense_order {self.dense_order} must be in [1, order={self.order}]")
            dense = continuous_extension(np.array(self.a), self.b, self.dense_order,
                                         end_derivative=s - 1 if stiffly_accurate else None)
            if dense is None:
                raise ValueError(f"{name}: no dense output of order {self.dense_order} is a combination of these "
                                 "stages (with the end conditions and the stiff bound of continuous_extension); "
                                 "give a lower dense_order, or None for the cubic Hermite")
            object.__setattr__(self, "dense", dense)

    @property
    def stages(self) -> int:
        """Number of stages ``s``."""
        return len(self.c)

    @property
    def adaptive(self) -> bool:
        """Whether the tableau carries an embedded error estimate."""
        return self.b_err is not None


def _structure(a) -> tuple[str, float | None]:
    """Classify the stage matrix: ("esdirk" | "sdirk" | "dirk" | "firk", common diagonal or None)."""
    s = len(a)
    # Upper entries are exact zeros in every published lower-triangular tableau, so we test them exactly:
    # a tiny nonzero there would still couple the stages and the stepper must not drop it.
    if any(a[i][j] != 0 for i in range(s) for j in range(i + 1, s)):
        return "firk", None
    diagonal = [a[i][i] for i in range(s)]

    def common(values):
        return all(v != 0 and abs(v - values[0]) <= _EQUAL_TOL for v in values)

    if s > 1 and not any(a[0]) and common(diagonal[1:]):
        return "esdirk", diagonal[1]
    if common(diagonal):
        return "sdirk", diagonal[0]
    return "dirk", None


def stability_function(tableau: ImplicitTableau, z):
    """The linear stability function ``R(z) = 1 + z b^T (I - z A)^{-1} 1``.

    One step of the method on ``y' = lambda y`` multiplies ``y`` by ``R(h lambda)``
    (Hairer and Wanner II, Sec. IV.3).

    Parameters
    ----------
    tableau : ImplicitTableau
        The method; any object with ``a`` and ``b`` works.
    z : complex or array_like of complex
        Points ``h lambda``; arrays are evaluated elementwise.

    Returns
    -------
    complex or numpy.ndarray of complex
        ``R(z)``, a Python complex for scalar ``z``.
    """
    a = np.asarray(tableau.a, dtype=np.complex128)
    b = np.asarray(tableau.b, dtype=np.complex128)
    s = a.shape[0]
    zz = np.asarray(z, dtype=np.complex128)
    matrices = np.eye(s) - zz[..., None, None] * a
    # A batched linear solve rather than an inverse: backward stable, also for |z| = 1e8 where the tests
    # probe R(-infinity).
    x = np.linalg.solve(matrices, np.ones((s, 1), dtype=np.complex128))[..., 0]
    r = 1 + zz * (x @ b)
    return complex(r) if r.ndim == 0 else r


def _root_near(coefficients, guess: float) -> float:
    """The root of a polynomial (highest power first) near ``guess``, by Newton's method in float64.

    Used where a paper prints a rounded root of a polynomial it defines: Newton converges
    quadratically from the printed digits, so a few iterations give the root to rounding.
    """
    p = np.polynomial.Polynomial(coefficients[::-1])
    dp = p.deriv()
    x = float(guess)
    for _ in range(8):
        step = p(x) / dp(x)
        x -= step
        if abs(step) <= 4e-16 * abs(x):
            break
    return float(x)


# --- one-stage and two-stage classics (torchdiffeq's fixed-step implicit methods) ----------------

IMPLICIT_EULER = ImplicitTableau(
    "implicit_euler", c=_f(1), a=(_f(1),), b=_f(1), order=1, stage_order=1,
    a_stable=True, l_stable=True,
    reference="Backward Euler; Hairer and Wanner II (1996), Sec. IV.3 (R(z) = 1/(1 - z))",
)

# Implicit Euler with an error estimate (diffrax's ImplicitEuler under a PIDController): an explicit first stage
# f(t0, y0) (the previous step's last, as the method is stiffly accurate) and the implicit Euler stage; the estimate
# is the difference from the trapezoidal rule (order 2) through the same two stages, h (f1 - f0) / 2, of the size of
# implicit Euler's own local error (O(h^2)): the controller assumes the lower order, 1.
ADAPTIVE_IMPLICIT_EULER = ImplicitTableau(
    "adaptive_implicit_euler", c=_f(0, 1), a=(_f(0, 0), _f(0, 1)), b=_f(0, 1), order=1,
    b_err=_f("-1/2", "1/2"), error_order=2, stage_order=1, a_stable=True, l_stable=True,
    reference="Backward Euler with the trapezoidal rule as its error estimate (diffrax's ImplicitEuler); Hairer and "
              "Wanner II (1996), Sec. IV.3",
)

IMPLICIT_MIDPOINT = ImplicitTableau(
    "implicit_midpoint", c=_f("1/2"), a=(_f("1/2"),), b=_f(1), order=2, stage_order=1,
    # R(z) = (1 + z/2)/(1 - z/2): |R(iy)| = 1 and R(-infinity) = -1, so A- but not L-stable.
    a_stable=True, l_stable=False,
    reference="Implicit midpoint rule, the one-stage Gauss method; Hairer and Wanner II (1996), Sec. IV.5",
)

TRAPEZOID = ImplicitTableau(
    "trapezoid", c=_f(0, 1), a=(_f(0, 0), _f("1/2", "1/2")), b=_f("1/2", "1/2"), order=2, stage_order=2,
    # b is the last row of a, so the rule is stiffly accurate in the formal sense, yet R(-infinity) = -1:
    # the explicit first stage makes a singular, and stiff accuracy only forces R(infinity) = 0 for
    # invertible a. It is an ESDIRK with gamma = 1/2 (the first stage of TR-BDF2).
    a_stable=True, l_stable=False,
    reference="Trapezoidal rule (Crank-Nicolson) as a two-stage Lobatto IIIA method; Hairer and Wanner II "
              "(1996), Sec. IV.5",
)

_SQRT3 = math.sqrt(3)
GL4 = ImplicitTableau(
    "gl4", c=(0.5 - _SQRT3 / 6, 0.5 + _SQRT3 / 6),
    a=((0.25, 0.25 - _SQRT3 / 6),
       (0.25 + _SQRT3 / 6, 0.25)),
    b=_f("1/2", "1/2"), order=4, stage_order=2,
    # torchdiffeq's table (fixed_grid_implicit.py, 2025) has the same a and b but stage times
    # c = (1/2 - sqrt(3)/6, 1/2 - sqrt(3)/6): the second entry has the wrong sign. Its own row sums give
    # 1/2 + sqrt(3)/6, so our validation would reject it; torchdiffeq evaluates the second stage at the
    # wrong time, which costs order on non-autonomous problems. We take the textbook c.
    a_stable=True, l_stable=False,
    reference="Two-stage Gauss-Legendre method (Butcher 1964); Hairer and Wanner II (1996), Sec. IV.5",
)

_SQRT15 = math.sqrt(15)
GL6 = ImplicitTableau(
    "gl6", c=(0.5 - _SQRT15 / 10, 0.5, 0.5 + _SQRT15 / 10),
    a=((5 / 36, 2 / 9 - _SQRT15 / 15, 5 / 36 - _SQRT15 / 30),
       (5 / 36 + _SQRT15 / 24, 2 / 9, 5 / 36 - _SQRT15 / 24),
       (5 / 36 + _SQRT15 / 30, 2 / 9 + _SQRT15 / 15, 5 / 36)),
    b=_f("5/18", "4/9", "5/18"), order=6, stage_order=3,
    # R is the (3,3) Pade approximant of exp: |R(iy)| = 1 and R(-infinity) = -1. Same as torchdiffeq.
    a_stable=True, l_stable=False,
    reference="Three-stage Gauss-Legendre method (Butcher 1964); Hairer and Wanner II (1996), Sec. IV.5",
)

RADAU_IIA3 = ImplicitTableau(
    "radauIIA3", c=_f("1/3", 1), a=(_f("5/12", "-1/12"), _f("3/4", "1/4")), b=_f("3/4", "1/4"),
    order=3, stage_order=2, a_stable=True, l_stable=True,
    reference="Two-stage Radau IIA method (Ehle 1969); Hairer and Wanner II (1996), Sec. IV.5",
)

_SQRT6 = math.sqrt(6)
RADAU_IIA5 = ImplicitTableau(
    "radauIIA5", c=((4 - _SQRT6) / 10, (4 + _SQRT6) / 10, 1.0),
    a=(((88 - 7 * _SQRT6) / 360, (296 - 169 * _SQRT6) / 1800, (-2 + 3 * _SQRT6) / 225),
       ((296 + 169 * _SQRT6) / 1800, (88 + 7 * _SQRT6) / 360, (-2 - 3 * _SQRT6) / 225),
       ((16 - _SQRT6) / 36, (16 + _SQRT6) / 36, 1 / 9)),
    b=((16 - _SQRT6) / 36, (16 + _SQRT6) / 36, 1 / 9), order=5, stage_order=3, dense_order=3,
    # No b_err: RADAU5's error estimate is (I - h gamma0 J)^{-1} applied to a combination of the stages and
    # f(t0, y0) (Hairer and Wanner II, Sec. IV.8), which is not of the form h sum_j b_err_j k_j; the stepper
    # computes it. torchdiffeq's coefficients are the same numbers written as 11/45 - 7 sqrt(6)/360 etc.
    a_stable=True, l_stable=True,
    reference="Three-stage Radau IIA method (Ehle 1969), the method of RADAU5; Hairer and Wanner II (1996), "
              "Sec. IV.5 and IV.8",
)

_SDIRK2_GAMMA = 1 - math.sqrt(2) / 2
SDIRK2 = ImplicitTableau(
    "sdirk2", c=(_SDIRK2_GAMMA, 1.0),
    a=((_SDIRK2_GAMMA, 0.0),
       (1 - _SDIRK2_GAMMA, _SDIRK2_GAMMA)),
    b=(1 - _SDIRK2_GAMMA, _SDIRK2_GAMMA), order=2, stage_order=1,
    # gamma = 1 - sqrt(2)/2 is the smaller root of gamma^2 - 2 gamma + 1/2 = 0, the condition for order 2 of
    # a stiffly accurate two-stage SDIRK; the larger root 1 + sqrt(2)/2 is L-stable too but has c_1 > 1 and
    # a larger error constant (Alexander 1977). torchdiffeq writes it as (2 - sqrt(2))/2.
    a_stable=True, l_stable=True,
    reference="Alexander, SIAM J. Numer. Anal. 14 (1977) 1006-1021; Hairer and Wanner II (1996), Sec. IV.6",
)

# TR-BDF2 (Bank et al. 1985) as the ESDIRK of Hosea and Shampine: a trapezoidal stage to t0 + gamma h with
# gamma = 2 - sqrt(2), then a BDF2 stage to t0 + h. In their notation the diagonal is d = gamma/2 and the
# last row is (w, w, d) with w = sqrt(2)/4. This module's `gamma` attribute is the SDIRK diagonal, so it is
# their d = 1 - sqrt(2)/2, the number torchdiffeq calls `gamma` in its tableau. Hosea and Shampine also
# give a third-order companion for error estimation; torchdiffeq's trbdf2 is fixed-step, so there is no
# b_err here.
_TRBDF2_GAMMA = 2 - math.sqrt(2)
_TRBDF2_D = _TRBDF2_GAMMA / 2
_TRBDF2_W = math.sqrt(2) / 4
TRBDF2 = ImplicitTableau(
    "trbdf2", c=(0.0, _TRBDF2_GAMMA, 1.0),
    a=((0.0, 0.0, 0.0),
       (_TRBDF2_D, _TRBDF2_D, 0.0),
       (_TRBDF2_W, _TRBDF2_W, _TRBDF2_D)),
    b=(_TRBDF2_W, _TRBDF2_W, _TRBDF2_D), order=2, stage_order=2,
    a_stable=True, l_stable=True,
    reference="Hosea and Shampine, Appl. Numer. Math. 20 (1996) 21-37; Bank, Coughran, Fichtner, Grosse, "
              "Rose and Smith, IEEE Trans. Electron Devices 32 (1985) 1992-2007",
)

# --- Kvaerno's ESDIRK pairs -------------------------------------------------------------------------
#
# Kvaerno (2004) writes every coefficient of the 3(2) and 4(3) pairs as a rational function of the
# diagonal gamma and then picks gamma so that R(-infinity) = 0. For both pairs y1 is the last stage and
# the embedded solution is the stage before it (both have c = 1), so b_err = a[-1] - a[-2]: the same sign
# convention as diffrax's b_error (b_sol - b_embedded), which we checked against its kvaerno*.py.
#
# The paper prints gamma rounded to 10 digits. We take the root of the L-stability polynomial that those
# digits round from, polished to float64: the order conditions hold for any gamma, so this changes only
# R(-infinity), from about 1e-11 to rounding. diffrax uses the printed digits (kvaerno3: 0.43586652150,
# kvaerno4: 0.5728160625); the difference to ours is below 1e-10.

_KV3_GAMMA = _root_near((6, -18, 9, -1), 0.4358665215)  # 6 g^3 - 18 g^2 + 9 g - 1: R(inf) of the 3(2) pair


def _kvaerno3() -> ImplicitTableau:
    g = _KV3_GAMMA
    a31 = (-4 * g ** 2 + 6 * g - 1) / (4 * g)
    a32 = (-2 * g + 1) / (4 * g)
    a41 = (6 * g - 1) / (12 * g)
    a42 = -1 / ((24 * g - 12) * g)
    a43 = (-6 * g ** 2 + 6 * g - 1) / (6 * g - 3)
    a = ((0.0, 0.0, 0.0, 0.0),
         (g, g, 0.0, 0.0),
         (a31, a32, g, 0.0),
         (a41, a42, a43, g))
    return ImplicitTableau(
        "kvaerno3", c=(0.0, 2 * g, 1.0, 1.0), a=a, b=a[3], order=3,
        b_err=tuple(x - y for x, y in zip(a[3], a[2])), error_order=2, stage_order=2,
        a_stable=True, l_stable=True,
        reference="Kvaerno, BIT 44 (2004) 489-502, ESDIRK 3(2) with 4 stages; coefficients as in diffrax "
                  "(diffrax/_solver/kvaerno3.py) with gamma the exact root of 6g^3 - 18g^2 + 9g - 1",
    )


# 24 g^4 - 96 g^3 + 72 g^2 - 16 g + 1: R(inf) of the 4(3) pair. Kvaerno gives two 4(3) methods with the same
# formulas: this one advances the fourth-order solution (gamma = 0.5728160625); the other advances the
# third-order one and needs a different gamma. diffrax's comment notes that OrdinaryDiffEq.jl mixes the two.
_KV4_GAMMA = _root_near((24, -96, 72, -16, 1), 0.5728160625)


def _kvaerno4() -> ImplicitTableau:
    g = _KV4_GAMMA

    def p(*coefficients):  # polynomial in gamma, highest power first, as in the paper
        value = 0.0
        for coefficient in coefficients:
            value = value * g + coefficient
        return value

    a31 = p(144, -180, 81, -15, 1) * g / p(12, -6, 1) ** 2
    a32 = p(-36, 39, -15, 2) * g / p(12, -6, 1) ** 2
    a41 = p(-144, 396, -330, 117, -18, 1) / (12 * g ** 2 * p(12, -9, 2))
    a42 = p(72, -126, 69, -15, 1) / (12 * g ** 2 * p(3, -1))
    a43 = p(-6, 6, -1) * p(12, -6, 1) ** 2 / (12 * g ** 2 * p(12, -9, 2) * p(3, -1))
    a51 = p(288, -312, 120, -18, 1) / (48 * g ** 2 * p(12, -9, 2))
    a52 = p(24, -12, 1) / (48 * g ** 2 * p(3, -1))
    a53 = -p(12, -6, 1) ** 3 / (48 * g ** 2 * p(3, -1) * p(12, -9, 2) * p(6, -6, 1))
    a54 = p(-24, 36, -12, 1) / p(24, -24, 4)
    a = ((0.0, 0.0, 0.0, 0.0, 0.0),
         (g, g, 0.0, 0.0, 0.0),
         (a31, a32, g, 0.0, 0.0),
         (a41, a42, a43, g, 0.0),
         (a51, a52, a53, a54, g))
    # c_3 = gamma + a31 + a32 simplifies to 2 gamma (12 gamma^2 - 9 gamma + 2) / (12 gamma^2 - 6 gamma + 1).
    c3 = 2 * g * p(12, -9, 2) / p(12, -6, 1)
    return ImplicitTableau(
        "kvaerno4", c=(0.0, 2 * g, c3, 1.0, 1.0), a=a, b=a[4], order=4,
        b_err=tuple(x - y for x, y in zip(a[4], a[3])), error_order=3, stage_order=2,
        a_stable=True, l_stable=True,
        reference="Kvaerno, BIT 44 (2004) 489-502, ESDIRK 4(3) with 5 stages advancing the 4th-order "
                  "solution; coefficients as in diffrax (diffrax/_solver/kvaerno4.py) with gamma the exact "
                  "root of 24g^4 - 96g^3 + 72g^2 - 16g + 1",
    )


def _kvaerno5() -> ImplicitTableau:
    # The 5(4) pair is published in decimals only (all 17 digits taken, as diffrax has them); gamma = 0.26 is
    # exact. As above, y1 is stage 7 and the embedded solution is stage 6 (both at c = 1).
    g = 0.26
    a = ((0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0),
         (g, g, 0.0, 0.0, 0.0, 0.0, 0.0),
         (0.13, 0.84033320996790809, g, 0.0, 0.0, 0.0, 0.0),
         (0.22371961478320505, 0.47675532319799699, -0.06470895363112615, g, 0.0, 0.0, 0.0),
         (0.16648564323248321, 0.10450018841591720, 0.03631482272098715, -0.13090704451073998, g, 0.0, 0.0),
         (0.13855640231268224, 0.0, -0.04245337201752043, 0.02446657898003141, 0.61943039072480676, g, 0.0),
         (0.13659751177640291, 0.0, -0.05496908796538376, -0.04118626728321046, 0.62993304899016403,
          0.06962479448202728, g))
    # Stage 3 lies past the step (c_3 > 1): the stepper evaluates f slightly beyond t0 + h.
    c = (0.0, 0.52, 1.230333209967908, 0.8957659843500759, 0.43639360985864756, 1.0, 1.0)
    return ImplicitTableau(
        "kvaerno5", c=c, a=a, b=a[6], order=5,
        b_err=tuple(x - y for x, y in zip(a[6], a[5])), error_order=4, stage_order=2, dense_order=4,
        a_stable=True, l_stable=True,
        reference="Kvaerno, BIT 44 (2004) 489-502, ESDIRK 5(4) with 7 stages; coefficients as in diffrax "
                  "(diffrax/_solver/kvaerno5.py)",
    )


KVAERNO3 = _kvaerno3()
KVAERNO4 = _kvaerno4()
KVAERNO5 = _kvaerno5()

IMPLICIT_TABLEAUS = {t.name: t for t in (IMPLICIT_EULER, ADAPTIVE_IMPLICIT_EULER, IMPLICIT_MIDPOINT, TRAPEZOID, GL4,
                                         GL6, RADAU_IIA3, RADAU_IIA5, SDIRK2, TRBDF2, KVAERNO3, KVAERNO4, KVAERNO5)}
