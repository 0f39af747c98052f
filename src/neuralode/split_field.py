"""A vector field given as two terms, ``f = f_E + f_I``: the input of the IMEX methods (diffrax's ``MultiTerm``)."""

from __future__ import annotations

import operator

import torch
import torch.utils._pytree as pytree

__all__ = ["SplitField"]


class SplitField(torch.nn.Module):
    """``f(t, y) = explicit(t, y) + implicit(t, y)``, with the two terms kept apart for the IMEX methods.

    The IMEX methods (``method="kencarp3"``, ``"kencarp4"``, ``"kencarp5"``) integrate ``explicit`` with an explicit
    Runge-Kutta tableau and ``implicit`` with an implicit one, on the same stages: Newton's iteration sees only the
    implicit term's Jacobian, and the step size is limited by the explicit term's accuracy and stability, not by the
    stiffness of the implicit one. Put what is stiff and cheap to differentiate (diffusion, fast linear decay, a
    known stiff operator) in ``implicit``, and what is non-stiff (a neural network, advection, slow reactions) in
    ``explicit``.

    Any other method solves a ``SplitField`` as the sum of its terms, so the same field can be compared across
    methods. diffrax's counterpart is ``MultiTerm(ODETerm(explicit), ODETerm(implicit))``.

    Parameters
    ----------
    explicit, implicit : callable
        ``term(t, y)`` (or ``term(t, y, args)`` when the solve is given ``args``), each returning a derivative of
        ``y``'s structure, shapes and dtype. Modules are registered as submodules, so their parameters are this
        module's (``adjoint_params`` default, ``.parameters()``).

    Example
    -------
    >>> import torch, neuralode
    >>> field = neuralode.SplitField(explicit=lambda t, y: torch.sin(t) * torch.ones_like(y),
    ...                              implicit=lambda t, y: -1000.0 * y)
    >>> sol = neuralode.solve(field, torch.zeros(3, dtype=torch.float64), torch.linspace(0, 1, 5,
    ...                       dtype=torch.float64), method="kencarp4")
    """

    def __init__(self, explicit, implicit):
        super().__init__()
        for label, term in (("explicit", explicit), ("implicit", implicit)):
            if not callable(term):
                raise TypeError(f"SplitField({label}=...) must be callable as {label}(t, y), got "
                                f"{type(term).__name__}")
        self.explicit = explicit
        self.implicit = implicit

    def forward(self, t, y, *args):
        explicit = self.explicit(t, y, *args)
        implicit = self.implicit(t, y, *args)
        if isinstance(explicit, torch.Tensor) and isinstance(implicit, torch.Tensor):
            return explicit + implicit
        # (said here, naming the term: the sum fails first, with torch's "Node type mismatch" or Python's "unsupported
        # operand" that name neither)
        structures = [pytree.tree_structure(value) for value in (explicit, implicit)]
        for label, value in (("explicit", explicit), ("implicit", implicit)):
            leaves = pytree.tree_leaves(value)
            if not leaves or not all(isinstance(leaf, torch.Tensor) for leaf in leaves):
                raise TypeError(f"the SplitField's {label} term returned {type(value).__name__}; each term must return "
                                "dy/dt as a tensor (or tensors in y0's structure for a tuple or PyTree state)")
        if structures[0] != structures[1]:
            raise TypeError(f"the SplitField's terms returned different structures: explicit "
                            f"{pytree.treespec_pprint(structures[0])}, implicit {pytree.treespec_pprint(structures[1])}; "
                            "each must return dy/dt in y0's structure")
        return pytree.tree_map(operator.add, explicit, implicit)


def split_terms(func):
    """``(split_field, args)`` where ``func`` is a :class:`SplitField`, possibly wrapped for ``args``
    (:class:`~neuralode.problem.FieldWithArgs`); ``(None, None)`` otherwise."""
    args = None
    if type(func).__name__ == "FieldWithArgs":
        func, args = func.func, func.args
    return (func, args) if isinstance(func, SplitField) else (None, None)
