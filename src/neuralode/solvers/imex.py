"""The IMEX stepper: an additive Runge-Kutta pair on a :class:`~neuralode.SplitField` ``f = f_E + f_I``.

:class:`AdditiveRungeKutta` runs an :class:`~neuralode.tableaus.additive.AdditiveTableau` (KenCarp3/4/5). It is the
ESDIRK stepper of :mod:`neuralode.solvers.implicit` on the implicit term, with the explicit term's stage derivatives
added to each stage's known part (Kennedy and Carpenter, Appl. Numer. Math. 44 (2003) 139, eq. 3):

    psi_i = y0 + h sum_{j<i} (aE_ij kE_j + aI_ij kI_j),   z = psi_i + h gamma f_I(t_i, z),
    kI_i = (z - psi_i) / (h gamma),   kE_i = f_E(t_i, z).

Newton's iteration, its Jacobian (of ``f_I`` alone), the factorised iteration matrix and their reuse across steps,
the error control, the stiff check of the dense output and the gradients through the stage equations (implicit
function theorem) are that stepper's. Per step: the explicit term ``s`` times (its first stage at the step's
start), the implicit term once at the start plus once per Newton iteration. An accepted step's end is not a stage
(the explicit term's last row differs from ``b``), so each step starts with both terms at ``(t0, y0)``, reused by a
retried step.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ..tableaus.additive import ADDITIVE_TABLEAUS, AdditiveTableau
from .base import method_data, user_field
from .implicit import ImplicitRungeKutta, ImplicitState, _sparse
from .runge_kutta import StepOutcome, linear_combination


@dataclass(frozen=True)
class ExplicitTerm:
    """What the implicit stepper's stage loop needs of an IMEX method's explicit term (internal)."""

    field: Callable            # f_E(t, y) on the flat state, counted
    rows: tuple                # per stage, the sparse row (j, aE_ij) of the explicit term's stage matrix
    start: torch.Tensor        # f_E(t0, y0)
    implicit_start: torch.Tensor   # f_I(t0, y0)


@dataclass
class AdditiveState(ImplicitState):
    """The Newton bookkeeping, and both terms at the current step's start ``(y0, t0, f_E, f_I)``."""

    start: Any = None
    terms: Any = None


def _terms(func, method: str):
    """The explicit and implicit terms of the loop's field, or a ValueError saying what the method needs."""
    term = getattr(func, "term", None)
    explicit = term("explicit") if term is not None else None
    if explicit is None:
        given = type(user_field(func)).__name__ if getattr(func, "func", None) is not None else None
        wrapped = (f"; func is a {given} (ODEBlock's regularisers, kinetic= and frobenius=, wrap the field and hide a "
                   "SplitField: they are not supported with the IMEX methods)"
                   if given not in (None, "function") else "")
        raise ValueError(f"method {method!r} is an IMEX method: give func as neuralode.SplitField(explicit=..., "
                         "implicit=...), the non-stiff part (e.g. a network) explicit and the stiff part implicit; "
                         f"for a field given whole, use an implicit method ('kvaerno5', 'rodas5p'){wrapped}")
    return explicit, term("implicit")


@dataclass(frozen=True, eq=False)
class AdditiveRungeKutta(ImplicitRungeKutta):
    """An IMEX additive Runge-Kutta method (see the module docstring).

    Parameters
    ----------
    tableau : str or AdditiveTableau, default "kencarp4"
        ``"kencarp3"``, ``"kencarp4"``, ``"kencarp5"``, or an
        :class:`~neuralode.tableaus.additive.AdditiveTableau` of your own. The implicit stepper's other settings
        (``jacobian``, ``max_iters``, ``preconditioner``, ``keep_step``) apply to the implicit term.
    """

    tableau: Any = "kencarp4"
    reads_derivative = False   # (both terms at the step's start are its own: the loop's f(t0, y0) is their sum)
    needs_terms = True
    pair: AdditiveTableau = field(init=False, repr=False)
    _explicit_rows: tuple = field(init=False, repr=False)
    _pair_dense_rows: tuple = field(init=False, repr=False)

    def __post_init__(self):
        pair = method_data(self.tableau, ADDITIVE_TABLEAUS, AdditiveTableau, "AdditiveRungeKutta(tableau=...)",
                           "an IMEX pair")
        set_ = object.__setattr__
        set_(self, "pair", pair)
        set_(self, "tableau", pair.implicit)
        set_(self, "_explicit_rows", tuple(_sparse(row) for row in pair.a_explicit))
        columns = list(zip(*pair.dense)) if pair.dense is not None else []
        set_(self, "_pair_dense_rows", tuple(_sparse(column) for column in columns))
        super().__post_init__()

    @property
    def name(self) -> str:
        return self.pair.name

    def init(self, func, t0, y0, f0) -> AdditiveState:
        return AdditiveState(terms=_terms(func, self.name))

    @staticmethod
    def blank_state() -> AdditiveState:
        return AdditiveState()

    def statistics(self, state) -> dict:
        counters = super().statistics(state)
        if state is not None and state.terms is not None:
            counters["nfe_explicit"], counters["nfe_implicit"] = state.terms[0].nfe, state.terms[1].nfe
        return counters

    def step(self, func, t0, y0, f0, h, error_norm, state, explicit=None) -> StepOutcome:
        explicit_field, implicit_field = _terms(func, self.name)
        start = state.start
        if start is not None and start[0] is y0 and start[1] == t0:
            k_explicit, k_implicit = start[2], start[3]    # (a retried step: its start is the same)
        else:
            k_explicit, k_implicit = explicit_field(t0, y0), implicit_field(t0, y0)
            if start is None:
                _check_terms(y0, k_explicit, k_implicit)
            state.start = (y0, t0, k_explicit, k_implicit)
        term = ExplicitTerm(explicit_field, self._explicit_rows, k_explicit, k_implicit)
        return super().step(implicit_field, t0, y0, k_explicit + k_implicit, h, error_norm, state, explicit=term)

    def dense_coefficients(self, func, t0, y0, h, outcome, f1) -> list:
        """Kennedy and Carpenter's continuous extension on the summed stage derivatives (order 2 for kencarp3, 3 for
        kencarp4 and kencarp5), or the cubic Hermite where the pair has none."""
        if not self._pair_dense_rows:
            return super().dense_coefficients(func, t0, y0, h, outcome, f1)
        ks = outcome.stages[1]
        return [y0] + [linear_combination(None, h, ks, terms) for terms in self._pair_dense_rows]


def _check_terms(y0, k_explicit, k_implicit) -> None:
    for label, value in (("explicit", k_explicit), ("implicit", k_implicit)):
        if not isinstance(value, torch.Tensor) or value.shape != y0.shape or value.dtype != y0.dtype:
            got = (f"shape {tuple(value.shape)} and dtype {value.dtype}" if isinstance(value, torch.Tensor)
                   else type(value).__name__)
            raise ValueError(f"the SplitField's {label} term returned {got}, but the state has shape "
                             f"{tuple(y0.shape)} and dtype {y0.dtype} (flattened): each term must return dy/dt in "
                             "y0's structure, shapes and dtype, not only their sum")


__all__ = ["AdditiveRungeKutta", "AdditiveState", "ExplicitTerm"]
