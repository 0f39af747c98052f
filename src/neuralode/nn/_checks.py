"""Argument checks shared by the layers and blocks of :mod:`neuralode.nn`.

Every helper raises :class:`ValueError` or :class:`TypeError` whose message names the
argument, shows the value received and says how to fix it (see STYLE.md, principle 7).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch


def positive_int(name: str, value: object, *, allow_zero: bool = False) -> int:
    """Return ``value`` as an ``int``, checking that it is a positive (or non-negative) integer."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} ({value!r}).")
    value = int(value)
    lower = 0 if allow_zero else 1
    if value < lower:
        kind = "a non-negative" if allow_zero else "a positive"
        raise ValueError(f"{name} must be {kind} integer, got {value}.")
    return value


def axis(name: str, value: object) -> int:
    """Return ``value`` as an ``int`` dimension index (negative allowed); ``True`` or ``"1"`` is a TypeError."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} ({value!r}).")
    return int(value)


def positive_float(name: str, value: object) -> float:
    """Return ``value`` as a ``float``, checking that it is finite and strictly positive."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a positive float, got {type(value).__name__} ({value!r}).")
    value = float(value)
    if not math.isfinite(value) or value <= 0.0:
        raise ValueError(f"{name} must be a finite positive float, got {value}.")
    return value


def tolerance(name: str, value: object) -> float:
    """Return a solver tolerance as a ``float``: finite and non-negative, as ``neuralode.solve`` takes it."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a non-negative float, got {type(value).__name__} ({value!r}).")
    value = float(value)
    if not math.isfinite(value) or value < 0.0:
        raise ValueError(f"{name} must be a finite non-negative float, got {value}.")
    return value


def one_of(name: str, value: object, choices: Sequence[str]) -> str:
    """Check that ``value`` is one of the strings in ``choices``."""
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, one of {list(choices)}, got {type(value).__name__}.")
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}.")
    return value


def time_points(name: str, value: object) -> tuple[float, ...]:
    """Normalise an integration interval ``(t0, t1)`` or a sequence of output times.

    Returns a tuple of at least two Python floats, strictly increasing or strictly decreasing.
    Times are kept as Python floats (double precision) and turned into a tensor of the state's
    dtype and device at every call, so moving or casting a module never loses them.
    """
    if not isinstance(value, (torch.Tensor, Sequence)) and hasattr(value, "__array__"):
        value = torch.as_tensor(value)   # a NumPy array of times
    if isinstance(value, torch.Tensor):
        if value.is_complex():
            raise TypeError(f"{name} must hold real times, got a complex tensor ({value.dtype}); its imaginary part "
                            f"would be dropped: pass {name}.real if that is what you mean.")
        if value.requires_grad:
            raise ValueError(f"{name} requires grad, but the layer keeps its times as fixed numbers and its gradient "
                             f"would be dropped without a word; pass {name}.detach(), or call neuralode.solve(func, "
                             f"x, {name}), which differentiates with respect to the times")
        if value.device.type == "meta":
            raise ValueError(f"{name} is on the 'meta' device, whose tensors hold no values; give the times as numbers "
                             f"or a tensor on 'cpu' (the layer keeps them as Python floats)")
        if value.dim() != 1:
            raise ValueError(
                f"{name} must be a 1-D tensor of times or a pair (t0, t1), got a tensor of shape "
                f"{tuple(value.shape)}."
            )
        if not value.is_floating_point():
            value = value.to(torch.float64)
        values = tuple(float(v) for v in value.detach().cpu().tolist())
    elif isinstance(value, Sequence) and not isinstance(value, str):
        values = []
        for v in value:
            if isinstance(v, torch.Tensor) and v.requires_grad:
                raise ValueError(f"{name} holds a tensor that requires grad, but the layer keeps its times as fixed "
                                 f"numbers and its gradient would be dropped without a word; pass plain numbers, or "
                                 f"call neuralode.solve(func, x, t), which differentiates with respect to the times")
            if isinstance(v, torch.Tensor) and v.numel() == 1:
                v = v.item()
            if isinstance(v, bool) or not isinstance(v, numbers.Real):
                raise TypeError(f"{name} must contain real numbers, got {v!r} of type {type(v).__name__}.")
            values.append(float(v))
        values = tuple(values)
    else:
        raise TypeError(
            f"{name} must be a pair (t0, t1) or a 1-D sequence/tensor of output times, got "
            f"{type(value).__name__} ({value!r})."
        )
    if len(values) < 2:
        raise ValueError(
            f"{name} needs at least two times (start and end), got {len(values)}: {values}. "
            "Pass e.g. (0.0, 1.0)."
        )
    if not all(math.isfinite(v) for v in values):
        raise ValueError(f"{name} must contain finite times, got {values}.")
    diffs = [b - a for a, b in zip(values[:-1], values[1:])]
    if not (all(d > 0 for d in diffs) or all(d < 0 for d in diffs)):
        raise ValueError(
            f"{name} must be strictly increasing or strictly decreasing, got {values}."
        )
    return values
