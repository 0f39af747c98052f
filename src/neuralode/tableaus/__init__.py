"""Butcher tableaus: every explicit Runge-Kutta method as validated data.

A method is a :class:`ButcherTableau` (Butcher, "Numerical Methods for Ordinary Differential
Equations", 3rd ed., 2016, Sec. 23): stage times ``c``, the strictly lower-triangular stage matrix
``a`` (row ``i`` holds ``i`` entries), solution weights ``b`` and error weights ``b_err = b - b_hat``.
The single stepper in :mod:`neuralode.solvers.runge_kutta` runs any of them.

Dense output is data too: ``dense`` is a matrix ``B`` with one row per "dense stage" and one column
per power of theta, so that on a step from ``t0`` with size ``h``

    y(t0 + theta h) = y0 + h * sum_j k_j * sum_m B[j, m] theta**(m + 1).

The dense stages are the method's stages, then ``f(t0 + h, y1)`` if the method is not FSAL (every
loop computes it anyway as the next step's first stage), then ``extra_c``/``extra_a`` stages that
only dense output needs (DOP853). Methods without a published continuous extension get the cubic
Hermite interpolant through ``y0, f0, y1, f1`` written in the same form.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from fractions import Fraction as F

import numpy as np

from . import _dop853_data as _dop853
from .order_conditions import satisfied_order

__all__ = ["ButcherTableau", "TABLEAUS", "hermite_dense"]

_IDENTITY_TOL = 1e-12


@dataclass(frozen=True, eq=False)
class ButcherTableau:
    """An explicit Runge-Kutta method.

    Parameters
    ----------
    name : str
        The method name used by ``solve``/``odeint``.
    c : tuple of float, shape (s,)
        Stage times as fractions of the step; ``c[0] == 0``.
    a : tuple of tuples
        Stage matrix, row ``i`` (``0 <= i < s``) has ``i`` entries.
    b : tuple of float, shape (s,)
        Weights of the propagated solution.
    order : int
        Classical order of the propagated solution.
    b_err : tuple of float or None, shape (s,)
        ``b - b_hat`` for an embedded estimate of order ``error_order``; ``None`` for fixed-step methods.
    error_order : int or None
        Order of the embedded solution; the step-size controller uses ``1 / (error_order + 1)``.
    b_err_low : tuple of float or None
        A second, lower-order error estimator combined with ``b_err`` as in DOP853
        (Hairer, Norsett and Wanner, Vol. I, Sec. II.10): ``r = r1**2 / sqrt(r1**2 + 0.01 r2**2)``.
    dense : numpy.ndarray or None, shape (n_dense_stages, degree)
        Continuous extension (see the module docstring); ``None`` means cubic Hermite.
    extra_c, extra_a : tuples
        Extra stages evaluated only for dense output.
    reference : str
        Where the coefficients come from.
    """

    name: str
    c: tuple
    a: tuple
    b: tuple
    order: int
    b_err: tuple | None = None
    error_order: int | None = None
    b_err_low: tuple | None = None
    dense: np.ndarray | None = None
    extra_c: tuple = ()
    extra_a: tuple = ()
    reference: str = ""
    fsal: bool = field(init=False)

    def __post_init__(self):
        s = len(self.c)
        if self.c[0] != 0:
            raise ValueError(f"{self.name}: c[0] must be 0, got {self.c[0]}")
        if len(self.a) != s or any(len(row) != i for i, row in enumerate(self.a)):
            raise ValueError(f"{self.name}: a must be strictly lower triangular with {s} rows")
        if len(self.b) != s:
            raise ValueError(f"{self.name}: b has {len(self.b)} entries, expected {s}")
        for i in range(1, s):
            if abs(sum(self.a[i]) - self.c[i]) > _IDENTITY_TOL * max(1.0, abs(self.c[i])):
                raise ValueError(f"{self.name}: row {i} of a sums to {sum(self.a[i])}, not c[{i}]={self.c[i]}")
        if abs(sum(self.b) - 1) > _IDENTITY_TOL:
            raise ValueError(f"{self.name}: the weights b sum to {sum(self.b)}, not 1")
        for label, weights in (("b_err", self.b_err), ("b_err_low", self.b_err_low)):
            if weights is not None:
                if len(weights) != s:
                    raise ValueError(f"{self.name}: {label} has {len(weights)} entries, expected {s}")
                if abs(sum(weights)) > _IDENTITY_TOL:
                    raise ValueError(f"{self.name}: {label} sums to {sum(weights)}, not 0")
        if (self.b_err is None) != (self.error_order is None):
            raise ValueError(f"{self.name}: b_err and error_order go together")
        full_a = np.zeros((s, s))
        for i, row in enumerate(self.a):
            full_a[i, :i] = [float(x) for x in row]
        reached, _ = satisfied_order(full_a, [float(x) for x in self.b], self.order)
        if reached < self.order:
            raise ValueError(f"{self.name}: order={self.order} is claimed, but the weights b meet the order conditions "
                             f"only up to order {reached} (a condition of order {reached + 1} fails); give the order "
                             "the coefficients have, or check them")
        for i, (ci, row) in enumerate(zip(self.extra_c, self.extra_a)):
            if abs(sum(row) - ci) > _IDENTITY_TOL:
                raise ValueError(f"{self.name}: extra stage {i} sums to {sum(row)}, not {ci}")
        # First Same As Last: the last stage is evaluated at y1 itself, so the next step reuses it.
        fsal = s > 1 and self.c[-1] == 1 and tuple(self.a[-1]) == tuple(self.b[:-1]) and self.b[-1] == 0
        object.__setattr__(self, "fsal", fsal)
        n_dense = s + (0 if fsal else 1) + len(self.extra_c)
        dense = hermite_dense(self.b, fsal) if self.dense is None else np.asarray(self.dense, dtype=np.float64)
        if dense.shape[0] != n_dense:
            raise ValueError(f"{self.name}: dense has {dense.shape[0]} rows, expected {n_dense}")
        # At theta = 1 the interpolant must reproduce y1 = y0 + h sum_j b_j k_j.
        at_one = dense.sum(axis=1)[: s]
        if not np.allclose(at_one, self.b, atol=1e-11) or not np.allclose(dense.sum(axis=1)[s:], 0, atol=1e-11):
            raise ValueError(f"{self.name}: the dense output does not reproduce y1 at theta=1")
        object.__setattr__(self, "dense", dense)

    @property
    def stages(self) -> int:
        return len(self.c)

    @property
    def adaptive(self) -> bool:
        return self.b_err is not None


def hermite_dense(b, fsal: bool) -> np.ndarray:
    """The cubic Hermite interpolant through (y0, f0) and (y1, f1) as a dense matrix.

    y(theta) = y0 + h [ f0 (theta - 2 theta^2 + theta^3) + D (3 theta^2 - 2 theta^3)
    + f1 (-theta^2 + theta^3) ] with D = (y1 - y0) / h = sum_j b_j k_j.
    """
    s = len(b)
    n = s if fsal else s + 1
    dense = np.zeros((n, 3))
    dense[:s] += np.outer(np.asarray(b, dtype=np.float64), [0.0, 3.0, -2.0])
    dense[0] += [1.0, -2.0, 1.0]
    dense[n - 1] += [0.0, -1.0, 1.0]
    return dense


def _f(*values):
    return tuple(float(F(v)) if isinstance(v, str) else float(v) for v in values)


def _rows(*rows):
    return tuple(_f(*row) for row in rows)


# --- fixed-step methods -------------------------------------------------------------------------

EULER = ButcherTableau("euler", c=_f(0), a=((),), b=_f(1), order=1, reference="Euler (1768)")

MIDPOINT = ButcherTableau(
    "midpoint", c=_f(0, "1/2"), a=_rows((), ("1/2",)), b=_f(0, 1), order=2,
    reference="Explicit midpoint rule (Hairer, Norsett, Wanner I, Sec. II.1)",
)

HEUN2 = ButcherTableau(
    "heun2", c=_f(0, 1), a=_rows((), (1,)), b=_f("1/2", "1/2"), order=2,
    reference="Heun's second-order method (trapezoidal predictor-corrector)",
)

HEUN3 = ButcherTableau(
    "heun3", c=_f(0, "1/3", "2/3"), a=_rows((), ("1/3",), (0, "2/3")), b=_f("1/4", 0, "3/4"), order=3,
    reference="Heun (1900), third-order method",
)

RK4 = ButcherTableau(
    "rk4", c=_f(0, "1/3", "2/3", 1), a=_rows((), ("1/3",), ("-1/3", 1), (1, -1, 1)),
    b=_f("1/8", "3/8", "3/8", "1/8"), order=4,
    reference="Kutta's 3/8 rule (Kutta 1901), the method torchdiffeq calls 'rk4'",
)

RK4_CLASSIC = ButcherTableau(
    "rk4_classic", c=_f(0, "1/2", "1/2", 1), a=_rows((), ("1/2",), (0, "1/2"), (0, 0, 1)),
    b=_f("1/6", "1/3", "1/3", "1/6"), order=4,
    reference="The classical Runge-Kutta method (Kutta 1901)",
)

# --- adaptive methods ---------------------------------------------------------------------------

ADAPTIVE_HEUN = ButcherTableau(
    "adaptive_heun", c=_f(0, 1), a=_rows((), (1,)), b=_f("1/2", "1/2"), order=2,
    b_err=_f("-1/2", "1/2"), error_order=1,
    reference="Heun-Euler 2(1) pair: Heun's method with an embedded Euler step",
)

FEHLBERG2 = ButcherTableau(
    "fehlberg2", c=_f(0, "1/2", 1), a=_rows((), ("1/2",), ("1/256", "255/256")),
    b=_f("1/512", "255/256", "1/512"), order=2,
    b_err=_f("1/512", 0, "-1/512"), error_order=1,
    reference="Fehlberg, NASA TR R-315 (1969), RKF1(2) propagating the second-order solution",
)

BOSH3 = ButcherTableau(
    "bosh3", c=_f(0, "1/2", "3/4", 1),
    a=_rows((), ("1/2",), (0, "3/4"), ("2/9", "1/3", "4/9")),
    b=_f("2/9", "1/3", "4/9", 0), order=3,
    b_err=_f(F(2, 9) - F(7, 24), F(1, 3) - F(1, 4), F(4, 9) - F(1, 3), F(-1, 8)), error_order=2,
    reference="Bogacki and Shampine, Appl. Math. Lett. 2 (1989) 321-325",
)

_DOPRI5_B = ("35/384", 0, "500/1113", "125/192", "-2187/6784", "11/84", 0)
# The embedded fourth-order solution of Shampine's "Some practical Runge-Kutta formulas" (Math. Comp. 46,
# 1986), the one torchdiffeq uses. It satisfies every fourth-order condition, like Dormand and Prince's
# original (last weight 1/40), and has the smaller fifth-order residual (71/405000 against 71/270000), so
# its error estimates are 2/3 of the original's. Taking it means neuralode's dopri5 accepts exactly the
# steps torchdiffeq's does, so results agree with torchdiffeq to rounding.
_DOPRI5_B_HAT = ("1951/21600", 0, "22642/50085", "451/720", "-12231/42400", "649/6300", "1/60")
# Shampine's y(t0 + h/2) for the same pair, used by the quartic dense output through y0, y_mid, y1, f0, f1.
_DOPRI5_MID = (F(6025192743, 30085553152) / 2, 0, F(51252292925, 65400821598) / 2,
               F(-2691868925, 45128329728) / 2, F(187940372067, 1594534317056) / 2,
               F(-1776094331, 19743644256) / 2, F(11237099, 235043384) / 2)


def _quartic_through_midpoint(b, mid) -> np.ndarray:
    """Dense matrix of the quartic through y0, y_mid = y(t0 + h/2), y1 with slopes f0 and f1 (FSAL).

    With y1 = y0 + h sum b_j k_j and y_mid = y0 + h sum mid_j k_j, the polynomial
    y0 + d theta + c theta^2 + b theta^3 + a theta^4 has (in units of h) d = f0,
    c = f1 - 4 f0 - 5 D + 16 M, b = 5 f0 - 3 f1 + 14 D - 32 M, a = 2 f1 - 2 f0 - 8 D + 16 M,
    where D = sum b_j k_j and M = sum mid_j k_j; the y0 terms cancel.
    """
    s = len(b)
    D = np.array([float(x) for x in b])
    M = np.array([float(x) for x in mid])
    f0, f1 = np.eye(s)[0], np.eye(s)[s - 1]
    return np.stack([f0, f1 - 4 * f0 - 5 * D + 16 * M, 5 * f0 - 3 * f1 + 14 * D - 32 * M,
                     2 * f1 - 2 * f0 - 8 * D + 16 * M], axis=1)


DOPRI5 = ButcherTableau(
    "dopri5", c=_f(0, "1/5", "3/10", "4/5", "8/9", 1, 1),
    a=_rows(
        (),
        ("1/5",),
        ("3/40", "9/40"),
        ("44/45", "-56/15", "32/9"),
        ("19372/6561", "-25360/2187", "64448/6561", "-212/729"),
        ("9017/3168", "-355/33", "46732/5247", "49/176", "-5103/18656"),
        ("35/384", 0, "500/1113", "125/192", "-2187/6784", "11/84"),
    ),
    b=_f(*_DOPRI5_B), order=5,
    b_err=tuple(float(F(x) - F(y)) for x, y in zip(_DOPRI5_B, _DOPRI5_B_HAT)),
    error_order=4, dense=_quartic_through_midpoint([F(x) for x in _DOPRI5_B], _DOPRI5_MID),
    reference="Dormand and Prince, J. Comput. Appl. Math. 6 (1980) 19-26, with Shampine's (1986) embedded "
              "4th-order estimate and mid-point dense output, as in torchdiffeq",
)


def _tsit5_dense() -> np.ndarray:
    """Tsitouras's fourth-order interpolant, expanded from the product form of the paper's b_i(theta)."""
    P = np.polynomial.polynomial
    t = (0.0, 1.0)  # the polynomial "theta"

    def poly(scale, *roots_or_quadratics):
        p = np.array([scale])
        for factor in roots_or_quadratics:
            p = P.polymul(p, factor)
        return p

    t2 = (0.0, 0.0, 1.0)
    basis = [
        poly(-1.0530884977290216, t, (-1.3299890189751412, 1.0), (0.7139816917074209, -1.4364028541716351, 1.0)),
        poly(0.1017, t2, (1.2949852507374631, -2.1966568338249754, 1.0)),
        poly(2.490627285651252793, t2, (1.57803468208092486, -2.38535645472061657, 1.0)),
        poly(-16.54810288924490272, (-1.21712927295533244, 1.0), (-0.61620406037800089, 1.0), t2),
        poly(47.37952196281928122, (-1.203071208372362603, 1.0), (-0.658047292653547382, 1.0), t2),
        poly(-34.87065786149660974, (-1.2, 1.0), (-0.666666666666666667, 1.0), t2),
        poly(2.5, (-1.0, 1.0), (-0.6, 1.0), t2),
    ]
    dense = np.zeros((7, 4))
    for j, p in enumerate(basis):
        p = np.pad(p, (0, 5 - len(p)))
        dense[j] = p[1:5]  # the constant term is zero for every basis polynomial
    return dense


_TSIT5_B = (0.09646076681806523, 0.01, 0.4798896504144996, 1.379008574103742, -3.290069515436081,
            2.324710524099774, 0.0)
TSIT5 = ButcherTableau(
    "tsit5", c=(0.0, 0.161, 0.327, 0.9, 0.9800255409045097, 1.0, 1.0),
    a=(
        (),
        (0.161,),
        (-0.008480655492356989, 0.335480655492357),
        (2.8971530571054935, -6.359448489975075, 4.3622954328695815),
        (5.325864828439257, -11.748883564062828, 7.4955393428898365, -0.09249506636175525),
        (5.86145544294642, -12.92096931784711, 8.159367898576159, -0.071584973281401, -0.02826905039406838),
        _TSIT5_B[:6],
    ),
    b=_TSIT5_B, order=5,
    # The paper prints the error weights with the wrong sign on the last entry (it is -1/66):
    # see OrdinaryDiffEq.jl issue 1654 and diffrax issue 98.
    b_err=(0.00178001105222577714, 0.0008164344596567469, -0.007880878010261995, 0.1447110071732629,
           -0.5823571654525552, 0.45808210592918697, -1 / 66),
    error_order=4, dense=_tsit5_dense(),
    reference="Tsitouras, Comput. Math. Appl. 62 (2011) 770-775",
)


def _dop853_dense() -> np.ndarray:
    """DOP853's seventh-order dense output in the power basis over 16 dense stages.

    The Fortran code evaluates y0 + x(F0 + (1-x)(F1 + x(F2 + (1-x)(F3 + x(F4 + (1-x)(F5 + x F6))))))
    with F0 = dy, F1 = h f0 - dy, F2 = 2 dy - h (f0 + f1) and F3..F6 = h D k, where dy = h sum b_j k_j.
    Each F_m is linear in the dense stages; we expand the nested form once, here.
    """
    P = np.polynomial.polynomial
    n = 16
    b = np.zeros(n)
    b[:12] = _dop853.B
    weights = np.zeros((7, n))
    weights[0] = b
    weights[1] = -b
    weights[1, 0] += 1.0
    weights[2] = 2 * b
    weights[2, 0] -= 1.0
    weights[2, 12] -= 1.0
    weights[3:] = np.asarray(_dop853.D)
    x, one_minus_x = (0.0, 1.0), (1.0, -1.0)
    basis, p = [], np.array([1.0])
    for m in range(7):
        p = P.polymul(p, x if m % 2 == 0 else one_minus_x)
        basis.append(np.pad(p, (0, 8 - len(p))))
    dense = np.zeros((n, 7))
    for m in range(7):
        dense += np.outer(weights[m], basis[m][1:8])
    return dense


DOPRI8 = ButcherTableau(
    "dopri8", c=_dop853.C[:12], a=((),) + tuple(_dop853.A[:11]), b=_dop853.B, order=8,
    b_err=_dop853.E5, error_order=7, b_err_low=_dop853.E3,
    dense=_dop853_dense(), extra_c=_dop853.C[13:16], extra_a=tuple(_dop853.A[12:15]),
    reference="Hairer, Norsett and Wanner I, Sec. II.10: DOP853, an 8(5,3) pair with 7th-order dense output",
)

TABLEAUS = {t.name: t for t in (EULER, MIDPOINT, HEUN2, HEUN3, RK4, RK4_CLASSIC, ADAPTIVE_HEUN, FEHLBERG2,
                                BOSH3, DOPRI5, TSIT5, DOPRI8)}
