"""Additive (implicit-explicit, IMEX) Runge-Kutta methods as validated data.

An IMEX method integrates ``y' = f_E(t, y) + f_I(t, y)``: the explicit term ``f_E`` (non-stiff, e.g. a neural
network or an advection) by an explicit tableau, the implicit term ``f_I`` (stiff, e.g. diffusion or fast decay) by a
diagonally implicit one, the two sharing stage times ``c`` and stage values (Ascher, Ruuth and Spiteri, Appl. Numer.
Math. 25 (1997) 151; Kennedy and Carpenter, Appl. Numer. Math. 44 (2003) 139). A step computes, for each stage,

    Y_i = y0 + h sum_{j<i} aE[i][j] kE_j + h sum_{j<=i} aI[i][j] kI_j,   kE_i = f_E(t0 + c_i h, Y_i),
    kI_i = f_I(t0 + c_i h, Y_i),        y1 = y0 + h sum_i b_i (kE_i + kI_i),

so each implicit stage is one nonlinear solve ``z = psi_i + h gamma f_I(t_i, z)`` with the Jacobian of ``f_I`` alone:
Newton never differentiates the explicit term, and the step size is limited by ``f_E``'s stability only.

Every method here shares ``b`` (and the embedded ``b_hat``) between the two terms, as Kennedy and Carpenter's do, so
the stage derivatives can be summed before the weights are applied; the data refuses a pair whose terms weigh their
stages differently. Both terms' tableaus and their coupling must meet the claimed order
(:func:`~neuralode.tableaus.order_conditions.additive_satisfied_order`), checked when the data is built.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .implicit import ImplicitTableau
from .order_conditions import additive_satisfied_order

__all__ = ["AdditiveTableau", "ADDITIVE_TABLEAUS"]

_IDENTITY_TOL = 1e-12


@dataclass(frozen=True, eq=False)
class AdditiveTableau:
    """An IMEX Runge-Kutta pair: an explicit tableau and an ESDIRK tableau on the same stages.

    Parameters
    ----------
    name : str
        The method name used by ``solve``/``odeint``.
    c : tuple of float, shape (s,)
        Stage times as fractions of the step, ``c[0] == 0``, shared by both terms.
    a_explicit : tuple of s tuples of s floats
        The explicit term's stage matrix, strictly lower triangular.
    a_implicit : tuple of s tuples of s floats
        The implicit term's stage matrix: lower triangular, first row zero (an explicit first stage, at ``y0``), then
        one common diagonal ``gamma`` (ESDIRK).
    b : tuple of float, shape (s,)
        Weights of the propagated solution, for both terms.
    order : int
        Order of the propagated solution, the coupling conditions included.
    b_err : tuple of float, shape (s,)
        ``b - b_hat`` for the embedded solution of order ``error_order``, for both terms.
    error_order : int
    dense : tuple of s tuples, optional
        The continuous extension ``y(t0 + theta h) = y0 + h sum_i b_i(theta) (kE_i + kI_i)`` with ``b_i(theta) = sum_m
        dense[i][m-1] theta**m``; reproduces ``b`` at ``theta = 1``. ``None``: the cubic Hermite through the step
        ends.
    dense_order : int or None
        The order of ``dense``.
    a_stable, l_stable : bool
        Claims about the implicit term's stability function (checked in the tests).
    reference : str

    Attributes
    ----------
    implicit : ImplicitTableau
        The implicit term's tableau (with ``b``, ``b_err`` and the claims): the implicit stepper's data.
    gamma : float
        The common diagonal.
    """

    name: str
    c: tuple
    a_explicit: tuple
    a_implicit: tuple
    b: tuple
    order: int
    b_err: tuple
    error_order: int
    dense: tuple | None = None
    dense_order: int | None = None
    a_stable: bool = False
    l_stable: bool = False
    reference: str = ""
    implicit: ImplicitTableau = field(init=False)
    gamma: float = field(init=False)

    def __post_init__(self):
        name, s = self.name, len(self.c)
        set_ = object.__setattr__
        for label in ("a_explicit", "a_implicit"):
            matrix = getattr(self, label)
            if len(matrix) != s or any(len(row) != s for row in matrix):
                raise ValueError(f"{name}: {label} must be a square {s} x {s} matrix (one row per stage time)")
            set_(self, label, tuple(tuple(float(x) for x in row) for row in matrix))
        if self.c[0] != 0:
            raise ValueError(f"{name}: c[0] must be 0 (the first stage is explicit in both terms), got {self.c[0]}")
        explicit = np.array(self.a_explicit)
        if np.any(np.triu(explicit) != 0):
            raise ValueError(f"{name}: a_explicit must be strictly lower triangular (an explicit term's stage reads "
                             "earlier stages only)")
        for i, (ci, row) in enumerate(zip(self.c, self.a_explicit)):
            if abs(sum(row) - ci) > _IDENTITY_TOL * max(1.0, abs(ci)):
                raise ValueError(f"{name}: row {i} of a_explicit sums to {sum(row)}, not c[{i}]={ci}")
        # The implicit term's identities (row sums, weights), its structure and its claims: ImplicitTableau's checks.
        implicit = ImplicitTableau(name, c=self.c, a=self.a_implicit, b=self.b, order=self.order, b_err=self.b_err,
                                   error_order=self.error_order, stage_order=None, a_stable=self.a_stable,
                                   l_stable=self.l_stable, reference=self.reference)
        if implicit.structure != "esdirk":
            raise ValueError(f"{name}: a_implicit must be ESDIRK (first row zero, then lower triangular with one common "
                             f"diagonal), got the structure {implicit.structure!r}")
        set_(self, "implicit", implicit)
        set_(self, "gamma", implicit.gamma)
        set_(self, "c", implicit.c)
        set_(self, "b", implicit.b)
        set_(self, "b_err", implicit.b_err)
        matrices = (explicit, np.array(self.a_implicit))
        b = np.array(self.b)
        reached, tree = additive_satisfied_order(matrices, (b, b), self.order)
        if reached < self.order:
            raise ValueError(f"{name}: order={self.order} is claimed, but the pair meets the additive order conditions "
                             f"only up to order {reached} (the coloured tree {tree} fails); check the coefficients")
        embedded = b - np.array(self.b_err)
        reached, tree = additive_satisfied_order(matrices, (embedded, embedded), self.error_order)
        if reached < self.error_order:
            raise ValueError(f"{name}: the embedded solution b - b_err meets the order conditions only up to order "
                             f"{reached}, not error_order={self.error_order}")
        if (self.dense is None) != (self.dense_order is None):
            raise ValueError(f"{name}: dense and dense_order go together")
        if self.dense is not None:
            dense = tuple(tuple(float(x) for x in row) for row in self.dense)
            if len(dense) != s or len({len(row) for row in dense}) != 1:
                raise ValueError(f"{name}: dense must have {s} rows of one length (one column per power of theta)")
            if any(abs(sum(row) - bi) > 1e-11 for row, bi in zip(dense, self.b)):
                raise ValueError(f"{name}: the dense output does not reproduce b at theta = 1")
            set_(self, "dense", dense)

    @property
    def stages(self) -> int:
        return len(self.c)

    @property
    def adaptive(self) -> bool:
        return True


def _lower(rows, s: int, diagonal: float = 0.0) -> tuple:
    """A full ``s x s`` matrix from its rows below the diagonal (row ``i`` has ``i`` entries) and a diagonal that
    is zero in the first row and ``diagonal`` after it."""
    full = []
    for i in range(s):
        row = [0.0] * s
        row[:i] = rows[i - 1] if i else []
        if i:
            row[i] = diagonal
        full.append(tuple(row))
    return tuple(full)


def _dense_from_polynomials(rows) -> tuple:
    """Kennedy and Carpenter's dense output ``b_i(theta) = sum_j b*_ij theta^j`` from its coefficients written highest
    power first without the zero constant term (as diffrax stores them), as this module's columns ``theta^1,
    theta^2, ...``."""
    return tuple(tuple(row[::-1]) for row in rows)


# --- Kennedy and Carpenter's ARK pairs (Appl. Numer. Math. 44 (2003) 139-181, Sec. 8 and Appendix C) ----------------
#
# ARK3(2)4L[2]SA, ARK4(3)6L[2]SA and ARK5(4)8L[2]SA: the implicit term an L-stable, stiffly accurate ESDIRK of stage
# order 2, the explicit term an ERK on the same stage times, one b (and one b_hat) for both. The coefficients are the
# paper's rationals as diffrax 0.7 transcribes them (diffrax/_solver/kencarp3.py, kencarp4.py, kencarp5.py: the
# same numbers that SciML's OrdinaryDiffEq carries as KenCarp3/4/5); every one of them is checked here against the
# additive order conditions up to the claimed order and against b_hat's order.

def _kencarp3() -> AdditiveTableau:
    g = 1767732205903 / 4055673282236
    b = (1471266399579 / 7840856788654, -4482444167858 / 7529755066697, 11266239266428 / 11593286722821, g)
    b_hat = (2756255671327 / 12835298489170, -10771552573575 / 22201958757719, 9247589265047 / 10645013368117,
             2193209047091 / 5459859503100)
    explicit = ((2 * g,),
                (5535828885825 / 10492691773637, 788022342437 / 10882634858940),
                (6485989280629 / 16251701735622, -4246266847089 / 9704473918619, 10755448449292 / 10357097424841))
    implicit = ((g,),
                (2746238789719 / 10658868560708, -640167445237 / 6845629431997),
                b[:3])
    dense = ((-215264564351 / 13552729205753, 4655552711362 / 22874653954995),
             (17870216137069 / 13817060693119, -18682724506714 / 9892148508045),
             (-28141676662227 / 17317692491321, 34259539580243 / 13192909600954),
             (2508943948391 / 7218656332882, 584795268549 / 6622622206610))
    return AdditiveTableau(
        "kencarp3", c=(0.0, 2 * g, 3 / 5, 1.0), a_explicit=_lower(explicit, 4), a_implicit=_lower(implicit, 4, g),
        b=b, order=3, b_err=tuple(x - y for x, y in zip(b, b_hat)), error_order=2,
        dense=_dense_from_polynomials(dense), dense_order=2, a_stable=True, l_stable=True,
        reference="Kennedy and Carpenter, Appl. Numer. Math. 44 (2003) 139-181, ARK3(2)4L[2]SA (diffrax's KenCarp3)",
    )


def _kencarp4() -> AdditiveTableau:
    g = 0.25
    b = (82889 / 524892, 0.0, 15625 / 83664, 69875 / 102672, -2260 / 8211, g)
    b_hat = (4586570599 / 29645900160, 0.0, 178811875 / 945068544, 814220225 / 1159782912, -3700637 / 11593932,
             61727 / 225920)
    explicit = ((0.5,),
                (13861 / 62500, 6889 / 62500),
                (-116923316275 / 2393684061468, -2731218467317 / 15368042101831, 9408046702089 / 11113171139209),
                (-451086348788 / 2902428689909, -2682348792572 / 7519795681897, 12662868775082 / 11960479115383,
                 3355817975965 / 11060851509271),
                (647845179188 / 3216320057751, 73281519250 / 8382639484533, 552539513391 / 3454668386233,
                 3354512671639 / 8306763924573, 4040 / 17871))
    implicit = ((g,),
                (8611 / 62500, -1743 / 31250),
                (5012029 / 34652500, -654441 / 2922500, 174375 / 388108),
                (15267082809 / 155376265600, -71443401 / 120774400, 730878875 / 902184768, 2285395 / 8070912),
                b[:5])
    dense = ((6818779379841 / 7100303317025, -54480133 / 30881146, 6943876665148 / 7220017795957),
             (0.0, 0.0, 0.0),
             (2173542590792 / 12501825683035, -11436875 / 14766696, 7640104374378 / 9702883013639),
             (-31592104683404 / 5083833661969, 174696575 / 18121608, -20649996744609 / 7521556579894),
             (61146701046299 / 7138195549469, -12120380 / 966161, 8854892464581 / 2390941311638),
             (-17219254887155 / 4939391667607, 3843 / 706, -11397109935349 / 6675773540249))
    return AdditiveTableau(
        "kencarp4", c=(0.0, 0.5, 83 / 250, 31 / 50, 17 / 20, 1.0), a_explicit=_lower(explicit, 6),
        a_implicit=_lower(implicit, 6, g), b=b, order=4, b_err=tuple(x - y for x, y in zip(b, b_hat)), error_order=3,
        dense=_dense_from_polynomials(dense), dense_order=3, a_stable=True, l_stable=True,
        reference="Kennedy and Carpenter, Appl. Numer. Math. 44 (2003) 139-181, ARK4(3)6L[2]SA (diffrax's KenCarp4)",
    )


def _kencarp5() -> AdditiveTableau:
    g = 41 / 200
    b = (-872700587467 / 9133579230613, 0.0, 0.0, 22348218063261 / 9555858737531, -1143369518992 / 8141816002931,
         -39379526789629 / 19018526304540, 32727382324388 / 42900044865799, g)
    b_hat = (-975461918565 / 9796059967033, 0.0, 0.0, 78070527104295 / 32432590147079, -548382580838 / 3424219808633,
             -33438840321285 / 15594753105479, 3629800801594 / 4656183773603, 4035322873751 / 18575991585200)
    explicit = ((41 / 100,),
                (367902744464 / 2072280473677, 677623207551 / 8224143866563),
                (1268023523408 / 10340822734521, 0.0, 1029933939417 / 13636558850479),
                (14463281900351 / 6315353703477, 0.0, 66114435211212 / 5879490589093,
                 -54053170152839 / 4284798021562),
                (14090043504691 / 34967701212078, 0.0, 15191511035443 / 11219624916014,
                 -18461159152457 / 12425892160975, -281667163811 / 9011619295870),
                (19230459214898 / 13134317526959, 0.0, 21275331358303 / 2942455364971,
                 -38145345988419 / 4862620318723, -1 / 8, -1 / 8),
                (-19977161125411 / 11928030595625, 0.0, -40795976796054 / 6384907823539,
                 177454434618887 / 12078138498510, 782672205425 / 8267701900261, -69563011059811 / 9646580694205,
                 7356628210526 / 4942186776405))
    implicit = ((g,),
                (41 / 400, -567603406766 / 11931857230679),
                (683785636431 / 9252920307686, 0.0, -110385047103 / 1367015193373),
                (3016520224154 / 10081342136671, 0.0, 30586259806659 / 12414158314087,
                 -22760509404356 / 11113319521817),
                (218866479029 / 1489978393911, 0.0, 638256894668 / 5436446318841, -1179710474555 / 5321154724896,
                 -60928119172 / 8023461067671),
                (1020004230633 / 5715676835656, 0.0, 25762820946817 / 25263940353407, -2161375909145 / 9755907335909,
                 -211217309593 / 5846859502534, -4269925059573 / 7827059040749),
                b[:7])
    dense = ((-9257016797708 / 5021505065439, 43486358583215 / 12773830924787, -17674230611817 / 10670229744614),
             (0.0, 0.0, 0.0),
             (0.0, 0.0, 0.0),
             (26096422576131 / 11239449250142, -91478233927265 / 11067650958493, 65168852399939 / 7868540260826),
             (92396832856987 / 20362823103730, -79368583304911 / 10890268929626, 15494834004392 / 5936557850923),
             (30029262896817 / 10175596800299, -12239297817655 / 9152339842473, -99329723586156 / 26959484932159),
             (-26136350496073 / 3983972220547, 115839755401235 / 10719374521269, -19024464361622 / 5461577185407),
             (-5289405421727 / 3760307252460, 5843115559534 / 2180450260947, -6511271360970 / 6095937251113))
    c = (0.0, 41 / 100, 2935347310677 / 11292855782101, 1426016391358 / 7196633302097, 92 / 100, 24 / 100, 3 / 5, 1.0)
    return AdditiveTableau(
        "kencarp5", c=c, a_explicit=_lower(explicit, 8), a_implicit=_lower(implicit, 8, g), b=b, order=5,
        b_err=tuple(x - y for x, y in zip(b, b_hat)), error_order=4, dense=_dense_from_polynomials(dense),
        dense_order=3, a_stable=True, l_stable=True,
        reference="Kennedy and Carpenter, Appl. Numer. Math. 44 (2003) 139-181, ARK5(4)8L[2]SA (diffrax's KenCarp5)",
    )


KENCARP3 = _kencarp3()
KENCARP4 = _kencarp4()
KENCARP5 = _kencarp5()

ADDITIVE_TABLEAUS = {t.name: t for t in (KENCARP3, KENCARP4, KENCARP5)}
