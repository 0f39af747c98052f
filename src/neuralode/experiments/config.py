"""Experiment configurations: dataclasses overridable from the command line.

Every experiment declares a ``Config`` dataclass that extends :class:`RunConfig`.
``neuralode run NAME --set key=value`` parses ``value`` into the declared type of
``key`` with :func:`apply_overrides`; the resolved config is what the run directory's
``config.json`` records.

Supported field types: ``int``, ``float``, ``bool``, ``str``, ``typing.Literal[...]``
(a closed set of choices), ``tuple[T, ...]`` / ``list[T]`` of those (comma separated,
brackets optional) and ``Optional[T]`` (``none`` for ``None``).
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from typing import Any, Literal, Union

__all__ = [
    "CheckpointError",
    "ConfigError",
    "DataError",
    "RunConfig",
    "apply_overrides",
    "config_from_dict",
    "config_to_dict",
    "parse_value",
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


@dataclasses.dataclass
class RunConfig:
    """Fields every experiment has.

    Attributes
    ----------
    seed : int
        Seeds torch, numpy and Python's ``random`` before the data and model are built.
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
    """

    seed: int = 0
    log_every: int = 10
    eval_every: int = 0
    checkpoint_every: int = 100
    threads: int = 1

    def __post_init__(self):
        """Reject values no run can use, before anything is written (``--set`` errors stay one line).

        Checks by field name apply to every experiment's config: learning rates (``lr``, ``*_lr``)
        must be finite and positive, tolerances (``rtol``, ``atol``) finite and non-negative, and
        ``method`` one of :data:`neuralode.METHODS`.
        """
        import math

        from ..methods import METHODS

        # eval_every is left to each experiment: the classification ones read -1 as "every epoch".
        for name, low in (("log_every", 1), ("checkpoint_every", 1), ("threads", 0)):
            if getattr(self, name) < low:
                raise ConfigError(f"{name}={getattr(self, name)} is invalid; it must be >= {low}")
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, bool) or value is None:
                continue
            if (field.name == "lr" or field.name.endswith("_lr")) and isinstance(value, (int, float)):
                if not math.isfinite(value) or value <= 0:
                    raise ConfigError(f"{field.name}={value} is invalid; a learning rate must be finite and > 0")
            if field.name in ("rtol", "atol") and isinstance(value, (int, float)):
                if not math.isfinite(value) or value < 0:
                    raise ConfigError(f"{field.name}={value} is invalid; tolerances must be finite and >= 0")
            if field.name == "method" and isinstance(value, str) and value not in METHODS:
                close = difflib.get_close_matches(value, METHODS, n=1)
                hint = f" Did you mean {close[0]!r}?" if close else ""
                raise ConfigError(f"method={value!r} is not a solver method.{hint} Choose one of {list(METHODS)}")


def config_to_dict(config: Any) -> dict[str, Any]:
    """The config as a JSON-friendly dict (tuples become lists)."""
    return dataclasses.asdict(config)


def config_from_dict(cls: type, data: dict[str, Any]) -> Any:
    """Rebuild a config written by :func:`config_to_dict` (used by ``--resume``)."""
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for field in dataclasses.fields(cls):
        if field.name in data:
            kwargs[field.name] = _coerce_json(data[field.name], hints[field.name])
    return cls(**kwargs)


def _coerce_json(value: Any, tp: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin is tuple and isinstance(value, list):
        return tuple(value)
    if _is_optional(tp) and value is not None:
        return _coerce_json(value, _strip_optional(tp))
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
    return dataclasses.replace(config, **changes)


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
