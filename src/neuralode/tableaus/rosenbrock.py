"""Rosenbrock methods as validated data.

A Rosenbrock method (Hairer and Wanner, "Solving Ordinary Differential Equations II", 2nd ed., 1996,
Sec. IV.7) replaces the nonlinear stage equations of an implicit Runge-Kutta method by linear ones with
the exact Jacobian ``J = df/dy(t0, y0)``. Written with the coefficients ``alpha_ij`` (stage arguments),
``gamma_ij`` (Jacobian terms, ``gamma_ii = gamma``) and weights ``b_i``,

    (I - h gamma J) k_i = h f(t0 + alpha_i h, y0 + sum_{j<i} alpha_ij k_j) + h J sum_{j<i} gamma_ij k_j
                          + gamma_i h^2 df/dt(t0, y0),               y1 = y0 + sum_i b_i k_i,

with ``alpha_i = sum_j alpha_ij`` and ``gamma_i = sum_{j<=i} gamma_ij``. Every published Rosenbrock
code, and this package, runs the *transformed* form instead (Hairer-Wanner IV.7, "Implementation of
Rosenbrock-type methods"): with
``Gamma = (gamma_ij)`` (lower triangular) and ``u_i = sum_{j<=i} gamma_ij k_j``,

    (1/(h gamma) I - J) u_i = f(t0 + c_i h, y0 + sum_{j<i} a_ij u_j) + sum_{j<i} (C_ij / h) u_j + d_i h df/dt,

    y1 = y0 + sum_i m_i u_i,

where ``a = alpha Gamma^{-1}``, ``C = diag(1/gamma) - Gamma^{-1}``, ``m = b Gamma^{-1}``, ``c_i = alpha_i``
and ``d_i = gamma_i``. The matrix-vector product ``J sum gamma_ij k_j`` disappears, so a stage costs one
evaluation of ``f`` and one solve with the single factorised matrix ``I - h gamma J``. The transformed
coefficients are the data (they are what the sources print); :class:`RosenbrockTableau` derives the
untransformed ``Gamma``, ``alpha``, ``b`` and ``b_hat`` from them and checks the identities that tie the
two forms together, so that the order conditions (stated in the untransformed form, Hairer-Wanner IV.7,
Table 7.1) can be tested on the derived numbers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

__all__ = ["RosenbrockTableau", "ROSENBROCK_TABLEAUS", "RODAS5", "RODAS5P", "rosenbrock_stability_function"]

# The published coefficients carry 16 significant digits, and some exceed 300 in size (Rodas5's C_63),
# so identities computed from them hold to about 1e-13; 1e-12 is above that and far below any typo.
_IDENTITY_TOL = 1e-12


@dataclass(frozen=True, eq=False)
class RosenbrockTableau:
    """A Rosenbrock method in Hairer and Wanner's transformed form (see the module docstring).

    Parameters
    ----------
    name : str
        The method name used by ``solve``/``odeint``.
    gamma : float
        The common diagonal ``gamma_ii`` of ``Gamma``; the iteration matrix is ``I - h gamma J``.
    a : tuple of tuples
        Transformed stage-argument coefficients ``a_ij``; row ``i`` (``0 <= i < s``) has ``i`` entries.
    C : tuple of tuples
        Transformed Jacobian-term coefficients ``C_ij`` (the sources' ``c_ij``, capitalised here so they
        are not confused with the stage times); row ``i`` has ``i`` entries.
    c : tuple of float, shape (s,)
        Stage times ``alpha_i`` as fractions of the step.
    d : tuple of float, shape (s,)
        ``gamma_i = sum_{j<=i} gamma_ij``, the weights of ``h df/dt`` in the stage right-hand sides.
    m : tuple of float, shape (s,)
        Weights of the propagated solution on the transformed increments ``u_i``.
    order : int
        Classical order of the propagated solution.
    m_err : tuple of float or None, shape (s,)
        ``m - m_hat`` for an embedded solution of order ``error_order``; the error estimate is
        ``sum_i m_err_i u_i``.
    error_order : int or None
        Order of the embedded solution; given together with ``m_err``.
    dense : tuple of tuples or None
        The rows ``h_1, ..., h_q`` of a continuous extension in Hairer's form (his RODAS; Di Marzo's
        Rodas5): with ``k_j = sum_i h_ji u_i``,
        ``y(t0 + theta h) = (1 - theta) y0 + theta (y1 + (1 - theta)(k_1 + theta (k_2 + ... + theta k_q)))``.
        It reproduces ``y0`` at ``theta = 0`` and ``y1`` at ``theta = 1`` whatever the ``h_ji``.
    dense_order : int or None
        Order of that continuous extension at every ``theta`` in ``(0, 1)``; given together with ``dense``.
    l_stable : bool
        Claim from the literature: ``|R(z)| <= 1`` on the imaginary axis (the poles, ``1/gamma``, lie in
        the right half-plane) and ``R(z) -> 0`` as ``z -> -infinity``
        (:func:`rosenbrock_stability_function`). The tests check it.
    reference : str
        Where the coefficients come from.

    Attributes
    ----------
    Gamma : numpy.ndarray, shape (s, s)
        ``(diag(1/gamma) - C)^{-1}``: the untransformed ``gamma_ij``, lower triangular.
    alpha : numpy.ndarray, shape (s, s)
        ``a Gamma``: the untransformed ``alpha_ij``, strictly lower triangular.
    b, b_hat : numpy.ndarray, shape (s,)
        ``m Gamma`` and ``(m - m_err) Gamma`` (``b_hat`` is ``None`` without an embedded pair).
    stiffly_accurate : bool
        ``alpha_s = 1`` and ``b_i = alpha_si + gamma_si`` (Hairer-Wanner IV.7): ``y1`` is the
        argument of the last stage plus its increment, so ``R(infinity) = 0`` and the method is exact for
        the algebraic part of index-1 problems.
    dense_matrix : numpy.ndarray, shape (q + 1, s) or None
        The continuous extension in the power basis: ``y(t0 + theta h) = y0 + sum_p theta**p
        sum_i dense_matrix[p - 1, i] u_i`` for ``p = 1 .. q + 1``.

    Raises
    ------
    ValueError
        If an identity fails (``c`` are the row sums of ``alpha``, ``d`` those of ``Gamma``,
        ``sum(b) == 1``, ``sum(b_hat) == 1``), the shapes disagree, ``gamma`` is not positive, or
        options that go together are given apart; the message names the method.
    """

    name: str
    gamma: float
    a: tuple
    C: tuple
    c: tuple
    d: tuple
    m: tuple
    order: int
    m_err: tuple | None = None
    error_order: int | None = None
    dense: tuple | None = None
    dense_order: int | None = None
    l_stable: bool = False
    reference: str = ""
    Gamma: np.ndarray = field(init=False, repr=False)
    alpha: np.ndarray = field(init=False, repr=False)
    b: np.ndarray = field(init=False, repr=False)
    b_hat: np.ndarray | None = field(init=False, repr=False)
    stiffly_accurate: bool = field(init=False)
    dense_matrix: np.ndarray | None = field(init=False, repr=False)

    def __post_init__(self):
        name = self.name
        s = len(self.c)
        set_ = object.__setattr__
        if s == 0:
            raise ValueError(f"{name}: a method needs at least one stage")
        for label in ("a", "C"):
            rows = getattr(self, label)
            if len(rows) != s or any(len(row) != i for i, row in enumerate(rows)):
                raise ValueError(f"{name}: {label} must have {s} rows with row i holding i entries (strictly lower "
                                 f"triangular), got row lengths {[len(row) for row in rows]}")
            set_(self, label, tuple(tuple(float(x) for x in row) for row in rows))
        for label in ("c", "d", "m") + (("m_err",) if self.m_err is not None else ()):
            values = getattr(self, label)
            if len(values) != s:
                raise ValueError(f"{name}: {label} has {len(values)} entries, expected {s}")
            set_(self, label, tuple(float(x) for x in values))
        set_(self, "gamma", float(self.gamma))
        numbers = (self.gamma,) + self.c + self.d + self.m + sum(self.a, ()) + sum(self.C, ())
        if not all(math.isfinite(x) for x in numbers):
            raise ValueError(f"{name}: coefficients must be finite")
        if not self.gamma > 0:
            raise ValueError(f"{name}: gamma must be positive (I - h gamma J is the iteration matrix), "
                             f"got {self.gamma}")
        if self.order < 1:
            raise ValueError(f"{name}: order must be at least 1, got {self.order}")
        if (self.m_err is None) != (self.error_order is None):
            raise ValueError(f"{name}: m_err and error_order go together")
        if self.error_order is not None and not 1 <= self.error_order < self.order:
            raise ValueError(f"{name}: error_order {self.error_order} must be in [1, order={self.order})")
        if (self.dense is None) != (self.dense_order is None):
            raise ValueError(f"{name}: dense and dense_order go together")

        a = _lower(self.a, s)
        # Gamma^{-1} = diag(1/gamma) - C is lower triangular with the diagonal 1/gamma, hence invertible.
        Gamma = _inverse_lower(np.eye(s) / self.gamma - _lower(self.C, s))
        alpha = a @ Gamma
        b = np.asarray(self.m) @ Gamma
        for i in range(s):
            if abs(alpha[i].sum() - self.c[i]) > _IDENTITY_TOL * max(1.0, abs(self.c[i])):
                raise ValueError(f"{name}: row {i} of alpha = a Gamma sums to {alpha[i].sum()!r}, "
                                 f"not c[{i}]={self.c[i]}")
            if abs(Gamma[i].sum() - self.d[i]) > _IDENTITY_TOL * max(1.0, abs(self.d[i])):
                raise ValueError(f"{name}: row {i} of Gamma sums to {Gamma[i].sum()!r}, not d[{i}]={self.d[i]}")
        if abs(b.sum() - 1) > _IDENTITY_TOL:
            raise ValueError(f"{name}: the weights b = m Gamma sum to {b.sum()!r}, not 1")
        b_hat = None
        if self.m_err is not None:
            b_hat = (np.asarray(self.m) - np.asarray(self.m_err)) @ Gamma
            if abs(b_hat.sum() - 1) > _IDENTITY_TOL:
                raise ValueError(f"{name}: the embedded weights b_hat = (m - m_err) Gamma sum to "
                                 f"{b_hat.sum()!r}, not 1")
        set_(self, "Gamma", Gamma)
        set_(self, "alpha", alpha)
        set_(self, "b", b)
        set_(self, "b_hat", b_hat)
        beta_last = alpha[-1] + Gamma[-1]
        set_(self, "stiffly_accurate", bool(abs(self.c[-1] - 1) <= _IDENTITY_TOL
                                            and np.abs(b - beta_last).max() <= _IDENTITY_TOL))

        dense_matrix = None
        if self.dense is not None:
            if len(self.dense) < 1 or any(len(row) != s for row in self.dense):
                raise ValueError(f"{name}: dense must hold rows of {s} entries, got {[len(r) for r in self.dense]}")
            set_(self, "dense", tuple(tuple(float(x) for x in row) for row in self.dense))
            H = np.asarray(self.dense)
            q = H.shape[0]
            if not 1 <= self.dense_order <= self.order:
                raise ValueError(f"{name}: dense_order {self.dense_order} must be in [1, order={self.order}]")
            # Expanding (1 - theta) y0 + theta (y1 + (1 - theta) sum_j theta^(j-1) k_j) with y1 - y0 =
            # sum_i m_i u_i: theta^1 carries m + h_1, theta^p (2 <= p <= q) h_p - h_(p-1), theta^(q+1) -h_q.
            dense_matrix = np.zeros((q + 1, s))
            dense_matrix[0] = np.asarray(self.m) + H[0]
            for p in range(1, q):
                dense_matrix[p] = H[p] - H[p - 1]
            dense_matrix[q] = -H[q - 1]
        set_(self, "dense_matrix", dense_matrix)

    @property
    def stages(self) -> int:
        """Number of stages ``s`` (each one evaluation of ``f`` and one linear solve)."""
        return len(self.c)

    @property
    def adaptive(self) -> bool:
        """Whether the tableau carries an embedded error estimate."""
        return self.m_err is not None


def _lower(rows, s) -> np.ndarray:
    """Ragged strictly-lower rows as an ``(s, s)`` matrix."""
    matrix = np.zeros((s, s))
    for i, row in enumerate(rows):
        matrix[i, :i] = row
    return matrix


def _inverse_lower(L: np.ndarray) -> np.ndarray:
    """Inverse of a lower-triangular matrix by forward substitution: exact zeros above the diagonal
    (a general inverse leaves rounding residue there, and Gamma's structure is part of the method)."""
    s = L.shape[0]
    X = np.zeros_like(L)
    for j in range(s):
        for i in range(j, s):
            X[i, j] = (float(i == j) - L[i, j:i] @ X[j:i, j]) / L[i, i]
    return X


def rosenbrock_stability_function(tableau: RosenbrockTableau, z, weights=None):
    """The linear stability function ``R(z) = 1 + z b^T (I - z (alpha + Gamma))^{-1} 1``.

    One step on ``y' = lambda y`` multiplies ``y`` by ``R(h lambda)`` (Hairer and Wanner II, Sec. IV.7);
    ``alpha + Gamma`` is the ``beta`` of their order conditions, diagonal included.

    Parameters
    ----------
    tableau : RosenbrockTableau
    z : complex or array_like of complex
        Points ``h lambda``; arrays are evaluated elementwise.
    weights : array_like, optional
        Weights in place of ``tableau.b`` (``tableau.b_hat`` gives the embedded method's function).

    Returns
    -------
    complex or numpy.ndarray of complex
    """
    beta = np.asarray(tableau.alpha + tableau.Gamma, dtype=np.complex128)
    b = np.asarray(tableau.b if weights is None else weights, dtype=np.complex128)
    s = beta.shape[0]
    zz = np.asarray(z, dtype=np.complex128)
    matrices = np.eye(s) - zz[..., None, None] * beta
    x = np.linalg.solve(matrices, np.ones((s, 1), dtype=np.complex128))[..., 0]
    r = 1 + zz * (x @ b)
    return complex(r) if r.ndim == 0 else r


# --- Rodas5 ----------------------------------------------------------------------------------------
# Di Marzo's RODAS5(4) (G. A. Di Marzo, "RODAS5(4) - Methodes de Rosenbrock d'ordre 5(4) adaptees aux
# problemes differentiels-algebriques", Memoire de diplome, Univ. Geneve, 1993), in Hairer and Wanner's
# transformed form. The numbers are those of OrdinaryDiffEq.jl (SciML), lib/OrdinaryDiffEqRosenbrockTableaus/
# src/rosenbrock_tableaus.jl (RODAS5A, RODAS5C, RODAS5c, RODAS5d, RODAS5H; the same digits as the named
# a21..h48 of its older src/tableaus/rosenbrock_tableaus.jl). Only the numbers are taken.
#
# Structure worth knowing when reading them: stages 6, 7 and 8 all sit at c = 1, and their arguments are
# Y_7 = Y_6 + u_6 and Y_8 = Y_7 + u_7 (rows 7 and 8 of a extend row 6 by ones). The solution is
# y1 = Y_8 + u_8 (so m is row 8 of a followed by 1: stiffly accurate), the embedded 4th-order solution is
# Y_8 itself, and the error estimate is u_8 alone: Hairer's "difference of the last two stages".
# d_6 = d_7 = d_8 = 0: the last stages carry no df/dt term.
#
# Tiny entries of the dense rows (h_32 = 1.4e-13, h_42 = -5.8e-13) are printed as published: they are the
# rounding residue of a fit whose exact value is 0; leaving them changes nothing measurable.
_RODAS5_A_ROW6 = (-14.09640773051259, 6.925207756232704, -41.47510893210728, 2.343771018586405, 24.13215229196062)

RODAS5 = RosenbrockTableau(
    "rodas5",
    gamma=0.19,
    a=((),
       (2.0,),
       (3.040894194418781, 1.041747909077569),
       (2.576417536461461, 1.62208306077664, -0.9089668560264532),
       (2.760842080225597, 1.446624659844071, -0.3036980084553738, 0.2877498600325443),
       _RODAS5_A_ROW6,
       _RODAS5_A_ROW6 + (1.0,),
       _RODAS5_A_ROW6 + (1.0, 1.0)),
    C=((),
       (-10.31323885133993,),
       (-21.04823117650003, -7.234992135176716),
       (32.22751541853323, -4.943732386540191, 19.44922031041879),
       (-20.69865579590063, -8.816374604402768, 1.260436877740897, -0.7495647613787146),
       (-46.22004352711257, -17.49534862857472, -289.6389582892057, 93.60855400400906, 318.3822534212147),
       (34.20013733472935, -14.1553540271769, 57.823356409884, 25.83362985412365, 1.408950972071624,
        -6.551835421242162),
       (42.57076742291101, -13.80770672017997, 93.98938432427124, 18.77919633714503, -31.5835918722337,
        -6.685968952921985, -5.810979938412932)),
    c=(0.0, 0.38, 0.3878509998321533, 0.483971893787384, 0.457047700881958, 1.0, 1.0, 1.0),
    d=(0.19, -0.1823079225333714636, -0.319231832186874912, 0.3449828624725343, -0.377417564392089818,
       0.0, 0.0, 0.0),
    m=_RODAS5_A_ROW6 + (1.0, 1.0, 1.0),
    order=5,
    m_err=(0.0,) * 7 + (1.0,),
    error_order=4,
    dense=((27.354592673333357, -6.925207756232857, 26.40037733258859, 0.5635230501052979, -4.699151156849391,
            -1.6008677469422725, -1.5306074446748028, -1.3929872940716344),
           (44.19024239501722, 1.3677947663381929e-13, 202.93261852171622, -35.5669339789154,
            -181.91095152160645, 3.4116351403665033, 2.5793540257308067, 2.2435122582734066),
           (-44.0988150021747, -5.755396159656812e-13, -181.26175034586677, 56.99302194811676,
            183.21182741427398, -7.480257918273637, -5.792426076169686, -5.32503859794143)),
    # Order 4 at every theta: the tests check the continuous order conditions (all trees of order <= 4 hold
    # to rounding, order 5 fails by ~1e-3), which is one more than Hairer's RODAS (Rodas4) interpolant.
    dense_order=4,
    # The embedded method is not A-stable (|R_hat(iy)| reaches 1.25), which is usual: it only steers h.
    l_stable=True,
    reference="Di Marzo, RODAS5(4), Univ. Geneve (1993), in the transformed form of Hairer and Wanner II (1996), "
              "Sec. IV.7; coefficients as printed in OrdinaryDiffEq.jl's Rodas5 tableau",
)

# Steinebach's Rodas5P (2023): the same 8-stage, stiffly accurate structure as Rodas5 (rows 7 and 8 of a
# repeat row 6 and add ones; y1 = Y_8 + u_8, the error estimate u_8, c_6 = c_7 = c_8 = 1, d_6 = d_7 = d_8 = 0),
# with coefficients chosen so that the Prothero-Robinson test problem y' = lambda (y - g(t)) + g'(t) keeps
# order 3 or more for very stiff lambda (Rodas5 drops to order 1-2 there), which is where Rodas5's global error
# stops following the tolerance on the very stiff Van der Pol problem (mu = 1000, err/tol 2, 13, 34 at
# rtol 1e-5, 1e-6, 1e-7; benchmarks/stiff.py). Also a dense output of order 4 built from three rows h_2..h_4.
_RODAS5P_A_ROW6 = (-7.502846399306121, 2.561846144803919, -11.627539656261098, -0.18268767659942256,
                   0.030198172008377946)

RODAS5P = RosenbrockTableau(
    "rodas5p",
    gamma=0.21193756319429014,
    a=((),
       (3.0,),
       (2.849394379747939, 0.45842242204463923),
       (-6.954028509809101, 2.489845061869568, -10.358996098473584),
       (2.8029986275628964, 0.5072464736228206, -0.3988312541770524, -0.04721187230404641),
       _RODAS5P_A_ROW6,
       _RODAS5P_A_ROW6 + (1.0,),
       _RODAS5P_A_ROW6 + (1.0, 1.0)),
    C=((),
       (-14.155112264123755,),
       (-17.97296035885952, -2.859693295451294),
       (147.12150275711716, -1.41221402718213, 71.68940251302358),
       (165.43517024871676, -0.4592823456491126, 42.90938336958603, -5.961986721573306),
       (24.854864614690072, -3.0009227002832186, 47.4931110020768, 5.5814197821558125, -0.6610691825249471),
       (30.91273214028599, -3.1208243349937974, 77.79954646070892, 34.28646028294783, -19.097331116725623,
        -28.087943162872662),
       (37.80277123390563, -3.2571969029072276, 112.26918849496327, 66.9347231244047, -40.06618937091002,
        -54.66780262877968, -9.48861652309627)),
    c=(0.0, 0.6358126895828704, 0.4095798393397535, 0.9769306725060716, 0.4288403609558664, 1.0, 1.0, 1.0),
    d=(0.21193756319429014, -0.42387512638858027, -0.3384627126235924, 1.8046452872882734, 2.325825639765069,
       0.0, 0.0, 0.0),
    m=_RODAS5P_A_ROW6 + (1.0, 1.0, 1.0),
    order=5,
    m_err=(0.0,) * 7 + (1.0,),
    error_order=4,
    dense=((25.948786856663858, -2.5579724845846235, 10.433815404888879, -2.3679251022685204, 0.524948541321073,
            1.1241088310450404, 0.4272876194431874, -0.17202221070155493),
           (-9.91568850695171, -0.9689944594115154, 3.0438037242978453, -24.495224566215796, 20.176138334709044,
            15.98066361424651, -6.789040303419874, -6.710236069923372),
           (11.419903575922262, 2.8879645146136994, 72.92137995996029, 80.12511834622643, -52.072871366152654,
            -59.78993625266729, -0.15582684282751913, 4.883087185713722)),
    dense_order=4,
    l_stable=True,
    reference="G. Steinebach, Construction of Rosenbrock-Wanner method Rodas5P and numerical benchmarks within the "
              "Julia Differential Equations package, BIT Numer. Math. 63, 27 (2023); coefficients as printed in "
              "OrdinaryDiffEq.jl's Rodas5P tableau (OrdinaryDiffEqRosenbrock, rosenbrock_tableaus.jl)",
)

ROSENBROCK_TABLEAUS = {RODAS5.name: RODAS5, RODAS5P.name: RODAS5P}
