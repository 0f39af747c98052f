"""Symplectic splitting methods for separable systems, as validated data.

A separable system has a state ``(q, p)`` whose parts drive each other only::

    q' = f(t, p),    p' = g(t, q)

(a Hamiltonian ``H = T(p) + V(q)`` gives ``f = dT/dp``, ``g = -dV/dq``). A splitting method alternates the two
exactly solvable flows, a *drift* of ``q`` with ``p`` frozen and a *kick* of ``p`` with ``q`` frozen; with ``s``
pairs of coefficients ``(a_i, b_i)`` one step of size ``h`` is::

    for i in 1..s:
        q <- q + a_i h f(t0 + h (b_1 + ... + b_{i-1}), p)      (drift)
        p <- p + b_i h g(t0 + h (a_1 + ... + a_i), q)          (kick)

Each flow is symplectic, so the step is: the energy error stays bounded over exponentially long times instead of
growing (Hairer, Lubich and Wanner, "Geometric Numerical Integration", 2nd ed., 2006, Sec. II.5, VI.3 and IX.8).
Each part's derivative is evaluated at the time the other part has reached, which keeps the classical order on
time-dependent fields (measured: with every evaluation at ``t0`` instead, the leapfrog and the fourth-order methods
fall to order 1 on a forced pendulum). The inverse step runs the same substeps backwards with ``-h`` (exactly
solvable flows undo exactly), which makes every splitting method algebraically reversible.

The stepper is :class:`neuralode.solvers.Symplectic`.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field

__all__ = ["SplittingMethod", "SPLITTING_METHODS"]

_IDENTITY_TOL = 1e-12


@dataclass(frozen=True, eq=False)
class SplittingMethod:
    """A splitting (composition) method for a separable system ``q' = f(t, p)``, ``p' = g(t, q)``.

    Parameters
    ----------
    name : str
        The method name used by ``solve``.
    drift : tuple of float, shape (s,)
        ``a_i``: the fractions of the step by which the ``i``-th drift moves ``q``; they sum to 1.
    kick : tuple of float, shape (s,)
        ``b_i``: the same for the ``i``-th kick of ``p`` (after the ``i``-th drift); they sum to 1.
    order : int
        Classical order. Consistency (both sums 1) and, for a claimed order of 2 or more, the second-order
        condition ``sum_i b_i (a_1 + ... + a_i) = 1/2`` are checked here; higher orders are measured by the tests.
    reference : str
        Where the coefficients come from.

    A zero coefficient is skipped (no evaluation). Each remaining substep costs one evaluation of the whole
    field, except that a step whose first substep is of the same kind as its last reuses the previous step's
    last evaluation (the kick-drift-kick leapfrog: two evaluations a step).
    """

    name: str
    drift: tuple
    kick: tuple
    order: int
    reference: str = ""
    # The substeps, in order: (kind, coefficient, time offset as a fraction of h), zero coefficients left out.
    substeps: tuple = field(init=False, repr=False)

    def __post_init__(self):
        for label, values in (("drift", self.drift), ("kick", self.kick)):
            if (not isinstance(values, (tuple, list)) or
                    not all(isinstance(x, numbers.Real) and not isinstance(x, bool) for x in values)):
                raise TypeError(f"{self.name}: {label} must be a tuple of real numbers (one a substep), got "
                                f"{values!r}")
        drift, kick = tuple(float(a) for a in self.drift), tuple(float(b) for b in self.kick)
        if not drift or len(drift) != len(kick):
            raise ValueError(f"{self.name}: drift and kick need the same number (at least one) of coefficients, got "
                             f"{len(drift)} and {len(kick)}")
        if not all(math.isfinite(x) for x in drift + kick):
            raise ValueError(f"{self.name}: the coefficients must be finite")
        for label, values in (("drift", drift), ("kick", kick)):
            if abs(sum(values) - 1) > _IDENTITY_TOL:
                raise ValueError(f"{self.name}: the {label} coefficients sum to {sum(values)!r}, not 1 (a step must "
                                 "move each part by the whole step)")
        if isinstance(self.order, bool) or not isinstance(self.order, int) or self.order < 1:
            raise ValueError(f"{self.name}: order must be a positive integer, got {self.order!r}")
        moved_q = 0.0
        second = 0.0
        for a, b in zip(drift, kick):
            moved_q += a
            second += b * moved_q
        if self.order >= 2 and abs(second - 0.5) > _IDENTITY_TOL:
            raise ValueError(f"{self.name}: order={self.order} is claimed, but sum_i b_i (a_1 + ... + a_i) = "
                             f"{second!r}, not 1/2: the method is of order 1")
        substeps = []
        q_time, p_time = 0.0, 0.0
        for a, b in zip(drift, kick):
            if a:
                substeps.append(("drift", a, p_time))
                q_time += a
            if b:
                q_at = 1.0 if abs(q_time - 1) <= _IDENTITY_TOL else q_time   # (t0 + h itself, not a rounded sum)
                substeps.append(("kick", b, q_at))
                p_time += b
        if substeps[-1][0] == "drift" and abs(p_time - 1) <= _IDENTITY_TOL:
            substeps[-1] = ("drift", substeps[-1][1], 1.0)
        object.__setattr__(self, "drift", drift)
        object.__setattr__(self, "kick", kick)
        object.__setattr__(self, "substeps", tuple(substeps))

    @property
    def reuses_last_evaluation(self) -> bool:
        """Whether a step starts with the kind of substep it ends with: the last evaluation then serves the next
        step's first substep (same part, same operand, time ``t0 + h``)."""
        return self.substeps[0][0] == self.substeps[-1][0]

    @property
    def evaluations_per_step(self) -> int:
        return len(self.substeps) - self.reuses_last_evaluation


def _leapfrog_composition(name, weights, order, reference) -> SplittingMethod:
    """The composition of kick-drift-kick leapfrog steps of sizes ``w_k h`` (adjacent kicks merged)."""
    drift, kick = [0.0], [weights[0] / 2]
    for k, w in enumerate(weights):
        drift.append(w)
        kick.append((w + (weights[k + 1] if k + 1 < len(weights) else 0.0)) / 2)
    return SplittingMethod(name, tuple(drift), tuple(kick), order, reference)


SEMI_IMPLICIT_EULER = SplittingMethod(
    "semi_implicit_euler", drift=(1.0,), kick=(1.0,), order=1,
    reference="Symplectic (semi-implicit) Euler: Hairer, Lubich and Wanner, GNI, Theorem VI.3.3; diffrax's "
              "SemiImplicitEuler (q from the old p, then p from the new q)")
LEAPFROG = SplittingMethod(
    "leapfrog", drift=(0.0, 1.0), kick=(0.5, 0.5), order=2,
    reference="Stoermer-Verlet, velocity form (kick-drift-kick; the leapfrog of Hamiltonian Monte Carlo): Hairer, "
              "Lubich and Wanner, GNI, Sec. I.1.4 and VI.3")

_CUBE_ROOT_2 = 2.0 ** (1.0 / 3.0)
_TRIPLE_JUMP = (1 / (2 - _CUBE_ROOT_2), -_CUBE_ROOT_2 / (2 - _CUBE_ROOT_2), 1 / (2 - _CUBE_ROOT_2))
YOSHIDA4 = _leapfrog_composition(
    "yoshida4", _TRIPLE_JUMP, 4,
    "Three leapfrog steps of sizes w1 h, w0 h, w1 h (the triple jump): Forest and Ruth, Physica D 43 (1990) 105; "
    "Yoshida, Phys. Lett. A 150 (1990) 262")

# McLachlan's symmetric 6-stage method, order 4 (the coefficients as in Boost.Odeint's
# symplectic_rkn_sb3a_mclachlan): about 60 times smaller errors than yoshida4 for 10 evaluations a step against 6.
_A0, _A1 = 0.40518861839525227722, -0.28714404081652408900
_A2 = 0.5 - (_A0 + _A1)
_B0, _B1 = -3 / 73, 17 / 59
_B2 = 1 - 2 * (_B0 + _B1)
MCLACHLAN4 = SplittingMethod(
    "mclachlan4", drift=(_A0, _A1, _A2, _A2, _A1, _A0), kick=(_B0, _B1, _B2, _B1, _B0, 0.0), order=4,
    reference="McLachlan, SIAM J. Sci. Comput. 16 (1995) 151, the symmetric 6-stage method of order 4 (Boost.Odeint's "
              "symplectic_rkn_sb3a_mclachlan)")

# Yoshida's sixth-order composition (his solution A): seven leapfrog steps w3 w2 w1 w0 w1 w2 w3.
_YOSHIDA6_W = (0.784513610477560, 0.235573213359357, -1.17767998417887)
_YOSHIDA6_W0 = 1 - 2 * sum(_YOSHIDA6_W)
YOSHIDA6 = _leapfrog_composition(
    "yoshida6", _YOSHIDA6_W + (_YOSHIDA6_W0,) + _YOSHIDA6_W[::-1], 6,
    "Yoshida, Phys. Lett. A 150 (1990) 262, Table 1, solution A: seven leapfrog steps")

SPLITTING_METHODS = {m.name: m for m in (SEMI_IMPLICIT_EULER, LEAPFROG, YOSHIDA4, MCLACHLAN4, YOSHIDA6)}
