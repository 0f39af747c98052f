"""Experiment configurations: dataclasses overridable from the command line.

Every experiment declares a ``Config`` dataclass that extends :class:`RunConfig`.
``neuralode run NAME --set key=value`` parses ``value`` into the declared type of
``key`` with :func:`apply_overrides`; the resolved config is what the run directory's
``config.json`` records.

Supported field types: ``int``, ``float``, ``bool``, ``str``, ``typing.Literal[...]``
(a closed set of choices), ``tuple[T, ...]`` / ``list[T]`` of those (comma separated,
brackets optional) and ``Optional[T]`` (``none`` for ``None``).

Every field's value is checked against its declared type whenever a config is made (``--set``,
``config.json`` on ``--resume``, ``dataclasses.replace`` in ``resolve``): a float must be a finite
number, an int an int (not a bool), a ``Literal`` one of its choices. A field declares its range
once, with ``typing.Annotated`` and a :class:`Range` (or :data:`NON_EMPTY`); the aliases
:data:`PosInt`, :data:`NonNegInt`, :data:`PosFloat`, :data:`NonNegFloat` and :data:`Fraction`
cover most fields, e.g. ``hidden: PosInt = 20`` or ``odenet_sweep: tuple[PosFloat, ...] = ()``.
A value outside its field's type or range raises :class:`FieldError` naming the field.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import types
import typing
from typing import Annotated, Any, Literal, Optional, Union

__all__ = [
    "NON_EMPTY",
    "CheckpointError",
    "ConfigError",
    "DataError",
    "FieldError",
    "Fraction",
    "NonNegFloat",
    "NonNegInt",
    "PosFloat",
    "PosInt",
    "Range",
    "RunConfig",
    "apply_overrides",
    "check_fields",
    "config_from_dict",
    "config_to_dict",
    "max_steps_field",
    "parse_value",
    "solve_cap",
]


class ConfigError(ValueError):
    """A user-facing configuration error; the message says what to change.

    ``neuralode run`` prints it as one line and exits with status 2. Its subclasses say which
    kind of fault it was, so that tests (and callers of :func:`neuralode.experiments.train`)
    can tell them apart; the command treats them all alike.
    """


class DataError(ConfigError):
    """An experiment's data set is missing, unreadable or malformed (the message names the file)."""


class CheckpointError(ConfigError):
    """A run directory's files cannot be resumed from: a damaged checkpoint, ``config.json`` or
    ``metrics.jsonl`` (the message names the file and what to do)."""


class FieldError(ConfigError):
    """A config field holds a value of the wrong type or outside its declared range.

    ``field`` names the field, ``value`` is the value and ``problem`` says what it must be
    (``"must be a positive integer"``); ``--set`` and ``config.json`` errors quote them."""

    def __init__(self, field: str, value: Any, problem: str, message: Optional[str] = None):
        self.field, self.value, self.problem = field, value, problem
        super().__init__(message or f"{field}={value!r}: {problem}")


@dataclasses.dataclass(frozen=True)
class Range:
    """The values a numeric field (or each item of a tuple field) may take: ``low``/``high``
    bounds, excluded where ``low_open``/``high_open``. Floats must be finite whatever the range.
    ``nonempty`` (strings, tuples) refuses an empty value instead."""

    low: Optional[float] = None
    high: Optional[float] = None
    low_open: bool = False
    high_open: bool = False
    nonempty: bool = False

    def holds(self, value: Any) -> bool:
        if self.nonempty:
            return len(value) > 0
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)

    def describe(self, integer: bool) -> str:
        if self.nonempty:
            return "must not be empty"
        if integer and self.high is None and not self.low_open and self.low in (0, 1):
            return "must be a positive integer" if self.low == 1 else "must be a non-negative integer"
        kind = "an integer" if integer else "a finite number"

        def bound(v: float) -> str:  # an integer's bound in full (2**32 - 1, not 4.29497e+09)
            return str(int(v)) if integer and float(v).is_integer() else f"{v:g}"

        if self.high is None:
            return f"must be {kind} {'>' if self.low_open else '>='} {bound(self.low)}"
        if self.low is None:
            return f"must be {kind} {'<' if self.high_open else '<='} {bound(self.high)}"
        return (f"must be {kind} in {'(' if self.low_open else '['}{bound(self.low)}, "
                f"{bound(self.high)}{')' if self.high_open else ']'}")


NON_EMPTY = Range(nonempty=True)
#: An int >= 1 (sizes, counts, steps).
PosInt = Annotated[int, Range(1)]
#: An int >= 0 (seeds, counts where 0 means "none" or "all").
NonNegInt = Annotated[int, Range(0)]
#: A finite float > 0 (step sizes, scales, standard deviations).
PosFloat = Annotated[float, Range(0, low_open=True)]
#: A finite float >= 0 (weights, noise levels that may be off).
NonNegFloat = Annotated[float, Range(0)]
#: A finite float strictly between 0 and 1.
Fraction = Annotated[float, Range(0, 1, low_open=True, high_open=True)]

#: Metadata of a field added after runs were written: a ``config.json`` without it resumes with
#: its default (every other field must be present, see :func:`config_from_dict`).
_ADDED_LATER = "added_later"


def added_later(default: Any) -> Any:
    """A config field added after runs were written: a ``config.json`` without it resumes (and rebuilds) with
    ``default``, which must be the behaviour those runs had."""
    return dataclasses.field(default=default, metadata={_ADDED_LATER: True})


def max_steps_field(default: int = 2000) -> Any:
    """The ``max_steps`` field of experiments that train through adaptive solves: the most steps
    one such solve may take (``options={"max_num_steps": ...}``, see :func:`solve_cap`).

    The solver's own default (100,000) is for a user's one solve; in training, a model that
    diverges (a far too large ``lr``) makes every step smaller and direct backprop keeps the graph
    of each, so the solve ran for many minutes and GBs before it failed. The experiments' solves
    take tens to hundreds of steps (docs/experiments.md), so 2000 stops a diverging model within
    seconds, with the one-line "training stopped, a solve failed" error, and touches no normal run.
    Runs written before the field existed resume with the default."""
    return added_later(default)


def solve_cap(method: str, max_steps: int) -> dict[str, int]:
    """``{"max_num_steps": max_steps}`` for an adaptive ``method``, else ``{}``: a fixed-step
    method takes the steps its grid has, which the config already fixed."""
    from ..methods import REGISTRY

    spec = REGISTRY.get(method)
    return {"max_num_steps": max_steps} if spec is not None and spec.adaptive else {}


@dataclasses.dataclass
class RunConfig:
    """Fields every experiment has.

    Attributes
    ----------
    seed : int
        Seeds torch, numpy and Python's ``random`` before the data and model are built. At most
        ``2**32 - 1``: torch takes 64-bit seeds, and the experiments derive per-model and per-step
        seeds as ``seed * 1_000_003 + crc32(...) + step``, which must stay below ``2**63`` too.
    log_every : int
        Write a training record to ``metrics.jsonl`` every this many optimiser steps.
    eval_every : int
        Call the experiment's evaluation every this many steps (0: only at the end).
    checkpoint_every : int
        Write ``checkpoints/last.pt`` every this many steps (and always at the end).
    threads : int
        Intra-op CPU threads for torch during the run (0: torch's default). The
        experiments' tensors are tiny, so threads only add synchronisation; on a busy
        machine two threads per process ran a spiral step 20-40x slower than one. Being
        part of the config also pins the reduction order, which exact resume relies on.
        At most 1024: torch's thread pool crashed the process (SIGSEGV) asked for 100,000.
    """

    seed: Annotated[int, Range(0, 2**32 - 1)] = 0
    log_every: PosInt = 10
    eval_every: int = 0
    checkpoint_every: PosInt = 100
    threads: Annotated[int, Range(0, 1024)] = 1

    def __post_init__(self):
        """Reject values no run can use, before anything is written (``--set`` errors stay one line).

        Every field is checked against its declared type and range (:func:`check_fields`, which
        also applies the ranges a base class declares for a field a subclass declares again).
        Checks by field name apply to every experiment's config: learning rates (``lr``, ``*_lr``)
        must be finite and positive, tolerances (``rtol``, ``atol``) finite, non-negative and not
        both 0, and ``method`` one of :data:`neuralode.METHODS`.
        """
        from ..methods import METHODS

        check_fields(self)
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, bool) or value is None:
                continue
            if (field.name == "lr" or field.name.endswith("_lr")) and isinstance(value, (int, float)):
                if not math.isfinite(value) or value <= 0:
                    raise FieldError(field.name, value, "must be a finite number > 0 (a learning rate)")
            if field.name in ("rtol", "atol") and isinstance(value, (int, float)):
                if not math.isfinite(value) or value < 0:
                    raise FieldError(field.name, value, "must be a finite number >= 0 (a tolerance)")
            if field.name == "method" and isinstance(value, str) and value not in METHODS:
                close = difflib.get_close_matches(value, METHODS, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise FieldError("method", value, f"is not a solver method{hint}; choose one of {list(METHODS)}")
        if getattr(self, "rtol", None) == 0 and getattr(self, "atol", None) == 0:
            raise FieldError("atol", 0.0, "rtol and atol are both 0; at least one tolerance must be > 0")


@functools.lru_cache(maxsize=None)
def _declared(cls: type) -> dict[str, list[Any]]:
    """Field name -> its declared types (with their ``Annotated`` ranges), the class's own first,
    then those of every base class that declares the field too."""
    out: dict[str, list[Any]] = {}
    for klass in cls.__mro__:
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            hints = typing.get_type_hints(klass, include_extras=True)
        except (NameError, TypeError):  # an annotation only a type checker can evaluate: not checked here
            continue
        for name in getattr(klass, "__annotations__", {}):
            if name in hints:
                out.setdefault(name, []).append(hints[name])
    return out


def check_fields(config: Any) -> None:
    """Raise :class:`FieldError` for the first field whose value does not fit its declared type
    and range (see the module docstring)."""
    declared = _declared(type(config))
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        for tp in declared.get(field.name, ()):
            problem = _problem(value, tp)
            if problem is not None:
                raise FieldError(field.name, value, problem)


def _problem(value: Any, tp: Any) -> Optional[str]:
    """What is wrong with ``value`` as a value of ``tp`` (``None``: nothing)."""
    ranges = []
    while typing.get_origin(tp) is Annotated:
        ranges += [m for m in tp.__metadata__ if isinstance(m, Range)]
        tp = typing.get_args(tp)[0]
    if _is_optional(tp):
        if value is None:
            return None
        tp = _strip_optional(tp)
        while typing.get_origin(tp) is Annotated:
            ranges += [m for m in tp.__metadata__ if isinstance(m, Range)]
            tp = typing.get_args(tp)[0]
    origin = typing.get_origin(tp)
    integer = tp is int
    if origin is Literal:
        choices = typing.get_args(tp)
        if not any(value == c and type(value) is type(c) for c in choices):
            return f"must be one of {', '.join(map(str, choices))}"
    elif origin in (tuple, list):
        if not isinstance(value, (tuple, list)):
            return f"expected {_type_name(tp)}"
        args = typing.get_args(tp)
        inner = args[0] if args else Any
        for item in value:
            problem = _problem(item, inner)
            if problem is not None:
                return f"item {item!r}: {problem}"
    elif tp is bool:
        if not isinstance(value, bool):
            return "expected true or false"
    elif tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            return "expected int"
    elif tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return "expected a number"
        if not math.isfinite(value):
            return ranges[0].describe(False) if ranges else "must be a finite number"
    elif tp is str:
        if not isinstance(value, str):
            return "expected a string"
    for r in ranges:
        if not r.holds(value):
            return r.describe(integer)
    return None


def config_to_dict(config: Any) -> dict[str, Any]:
    """The config as a JSON-friendly dict (tuples become lists)."""
    return dataclasses.asdict(config)


def config_from_dict(cls: type, data: dict[str, Any], *, strict: bool = False) -> Any:
    """Rebuild a config written by :func:`config_to_dict` (used by ``--resume``).

    Values are checked like ``--set`` values (:class:`FieldError` names the field). With
    ``strict=True`` (``--resume``) every field must be present and no other key: a config that
    lost a field would otherwise resume with that field's default, which is not what was trained.

    Raises
    ------
    ConfigError
        ``data`` is not a dict, misses a field or has an unknown key (strict), or a value does
        not fit its field (:class:`FieldError`).
    """
    if not isinstance(data, dict):
        raise ConfigError(f"expected an object of fields, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = [field.name for field in dataclasses.fields(cls)]
    if strict:
        optional = {f.name for f in dataclasses.fields(cls) if f.metadata.get(_ADDED_LATER)}
        missing = [n for n in names if n not in data and n not in optional]
        if missing:
            raise ConfigError(f"field {missing[0]} is missing" + (f" (and {len(missing) - 1} more)"
                                                                  if len(missing) > 1 else ""))
        unknown = [k for k in data if k not in names]
        if unknown:
            raise ConfigError(f"unknown field {unknown[0]!r}")
    kwargs = {}
    for name in names:
        if name in data:
            kwargs[name] = _coerce_json(data[name], hints[name])
    try:
        return cls(**kwargs)
    except FieldError as exc:
        raise ConfigError(f"field {exc.field}: {exc.problem}, got {exc.value!r}") from None


def _coerce_json(value: Any, tp: Any) -> Any:
    """A JSON value as the field type holds it: lists as tuples, ints as floats for float fields."""
    if _is_optional(tp):
        return None if value is None else _coerce_json(value, _strip_optional(tp))
    origin = typing.get_origin(tp)
    if origin in (tuple, list) and isinstance(value, list):
        args = typing.get_args(tp)
        items = [_coerce_json(v, args[0]) for v in value] if args else value
        return tuple(items) if origin is tuple else list(items)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def apply_overrides(config: Any, overrides: list[str]) -> Any:
    """Return a copy of ``config`` with ``key=value`` overrides parsed into field types.

    Raises
    ------
    ConfigError
        For a malformed override, an unknown key (the closest known key is suggested)
        or a value that does not parse to the field's type.
    """
    hints = typing.get_type_hints(type(config))
    names = [f.name for f in dataclasses.fields(config)]
    changes: dict[str, Any] = {}
    raws: dict[str, str] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"--set expects key=value, got {item!r}; for example --set seed=1")
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1, cutoff=0.5)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ConfigError(
                f"unknown config key {key!r}.{hint} Known keys: {', '.join(sorted(names))}"
            )
        try:
            changes[key] = parse_value(raw.strip(), hints[key])
        except ValueError as exc:
            raise ConfigError(
                f"--set {key}={raw}: {exc} (field {key!r} has type {_type_name(hints[key])}, "
                f"current value {getattr(config, key)!r})"
            ) from None
        raws[key] = raw.strip()
    try:
        return dataclasses.replace(config, **changes)
    except FieldError as exc:
        field = exc.field if exc.field in raws or exc.field != "atol" else "rtol"  # the pair's check
        if field in raws:
            raise FieldError(exc.field, exc.value, exc.problem,
                             f"--set {field}={raws[field]}: {exc.problem}") from None
        raise


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def parse_value(raw: str, tp: Any) -> Any:
    """Parse the command-line string ``raw`` into type ``tp`` (ValueError if it does not)."""
    if _is_optional(tp):
        if raw.lower() in {"none", "null"}:
            return None
        return parse_value(raw, _strip_optional(tp))
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        for choice in choices:
            if raw == str(choice):
                return choice
        close = difflib.get_close_matches(raw, [str(c) for c in choices], n=1, cutoff=0.5)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"{raw!r} is not one of {', '.join(map(str, choices))}{hint}")
    if origin in (tuple, list):
        args = typing.get_args(tp)
        inner = args[0] if args else str
        text = raw.strip()
        if text[:1] in "([" and text[-1:] in ")]":
            text = text[1:-1]
        items = [p.strip() for p in text.split(",") if p.strip()]
        values = [parse_value(p, inner) for p in items]
        return tuple(values) if origin is tuple else values
    if tp is bool:
        low = raw.lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
        raise ValueError(f"{raw!r} is not a boolean (use true or false)")
    if tp is int:
        try:
            return int(raw)
        except ValueError:
            raise ValueError(f"{raw!r} is not an integer") from None
    if tp is float:
        try:
            return float(raw)
        except ValueError:
            raise ValueError(f"{raw!r} is not a number") from None
    if tp is str:
        return raw
    raise ValueError(f"fields of type {_type_name(tp)} cannot be set from the command line")


def _is_optional(tp: Any) -> bool:
    origin = typing.get_origin(tp)
    return origin in (Union, types.UnionType) and type(None) in typing.get_args(tp)


def _strip_optional(tp: Any) -> Any:
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    return args[0] if len(args) == 1 else Union[tuple(args)]


def _type_name(tp: Any) -> str:
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")
