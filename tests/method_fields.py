"""A field as a method takes it: the sweeps over every method hand the IMEX methods a SplitField.

An IMEX method ('kencarp3', ...) refuses a field given whole (tests/test_imex.py). The sweeps that run every method on
one field split it as diffrax's own order test does, ``0.3 f`` explicit and ``0.7 f`` implicit: the sum is the same
field, so every expectation of the sweep holds, and both terms are exercised.
"""

import torch
import torch.utils._pytree as pytree

import neuralode
from neuralode.tableaus.additive import ADDITIVE_TABLEAUS

IMEX = tuple(ADDITIVE_TABLEAUS)


class _Scaled(torch.nn.Module):
    """``factor * func`` (a module, so that a module ``func``'s parameters stay the field's)."""

    def __init__(self, func, factor):
        super().__init__()
        self.func, self.factor = func, factor

    def forward(self, t, y, *args):
        return pytree.tree_map(lambda x: self.factor * x, self.func(t, y, *args))


def _scaled(func, factor):
    return _Scaled(func, factor)


def field_for(method, func):
    """``func`` itself, or for an IMEX method ``SplitField(0.3 func, 0.7 func)``."""
    if method not in IMEX:
        return func
    return neuralode.SplitField(explicit=_scaled(func, 0.3), implicit=_scaled(func, 0.7))
