"""What the public API takes as a number: Python's, numpy's, and one-element tensors and arrays.

torchdiffeq accepts ``rtol=np.float32(1e-6)``, ``step_size=np.float32(0.1)`` and ``max_num_steps=1e5``: the
values are only compared and multiplied. These helpers turn each into a Python ``float`` or ``int`` once, where
the options are checked, so that every check accepts the same things. ``bool`` (Python's or numpy's) is never a
number here: ``rtol=True`` is a mistake, not 1.0.
"""

from __future__ import annotations

import math
import numbers

import numpy as np
import torch


def real_number(value) -> float | None:
    """``float(value)`` for a real number of any of those kinds; ``None`` for anything else."""
    if isinstance(value, (bool, np.bool_)):
        return None
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return None if value.dtype == torch.bool or value.is_complex() else float(value.item())
    if isinstance(value, np.ndarray) and value.size == 1:
        return float(value.item()) if value.dtype.kind in "iuf" else None
    return None


def whole_number(value) -> int | None:
    """``int(value)`` for an integer of any kind, or a float without a fraction (``1e5``); ``None`` otherwise."""
    if isinstance(value, (bool, np.bool_)):
        return None
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real) and math.isfinite(value) and float(value).is_integer():
        return int(value)
    return None
