"""Decode plain data (TOML tables, msgpack maps) into typed dataclasses, and back.

One decoder serves the config file and RPC arguments, so both report a bad value the same way: the
path of the key, what was expected and what came. Supported field types: ``str``, ``int``,
``float``, ``bool``, :class:`Duration`, ``bytes``, ``Literal[...]``, enums, ``X | None``,
``list[T]``, ``tuple[T, ...]``, ``dict[str, T]``, nested dataclasses and ``Any``.
A dataclass's ``__post_init__`` may raise ``ValueError`` to refuse a value; the error is reported at
that dataclass's path.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import re
import reprlib
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

__all__ = ["DecodeError", "Duration", "decode", "encode", "format_duration", "parse_duration"]

T = TypeVar("T")


class DecodeError(ValueError):
    """A value that does not fit its declared type. ``path`` locates it (table names then key)."""

    def __init__(self, path: Sequence[str], message: str) -> None:
        super().__init__(message)
        self.path = tuple(path)
        self.message = message

    def __str__(self) -> str:
        where = ".".join(self.path) if self.path else "(top level)"
        return f"{where}: {self.message}"


class Duration(float):
    """A span of seconds, written in config as a Go-style duration: ``"100ms"``, ``"5s"``, ``"1m30s"``.

    A bare number is taken as seconds.
    """


_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_UNIT_SECONDS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(text: str) -> Duration:
    """Parse ``"1h2m3.5s"``, ``"250ms"`` or ``"0"``.

    Raises:
        ValueError: the text is not a duration, or is negative.
    """
    text = text.strip()
    if text in ("0", ""):
        return Duration(0.0)
    pos = 0
    total = 0.0
    while pos < len(text):
        match = _DURATION_PART.match(text, pos)
        if match is None:
            raise ValueError(f"invalid duration {text!r} (use forms like 500ms, 5s, 1m30s)")
        total += float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
        pos = match.end()
    return Duration(total)


def format_duration(seconds: float) -> str:
    """The shortest Go-style form of a duration: 0.1 → ``"100ms"``, 90 → ``"1m30s"``."""
    if seconds == 0:
        return "0s"
    if seconds < 1:
        millis = seconds * 1000
        return f"{_fixed(millis, 6)}ms" if millis >= 1 else f"{_fixed(seconds * 1e6, 3)}us"
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    out = ""
    if hours:
        out += f"{int(hours)}h"
    if minutes:
        out += f"{int(minutes)}m"
    secs_text = _fixed(secs, 9)
    if secs_text != "0" or not out:
        out += f"{secs_text}s"
    return out


def _fixed(value: float, decimals: int) -> str:
    """``value`` to ``decimals`` places (nanoseconds), never in exponent form, trailing zeros dropped."""
    return f"{value:.{decimals}f}".rstrip("0").rstrip(".")


def _describe(value: Any) -> str:
    text = reprlib.repr(value)  # bounded: an RPC argument may nest 1000 deep or be megabytes long
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{_type_name(type(value))} {text}"


def _type_name(tp: Any) -> str:
    names = {str: "string", int: "integer", float: "number", bool: "boolean", list: "array",
             dict: "table", bytes: "bytes", type(None): "nothing", Duration: "duration"}
    if tp in names:
        return names[tp]
    return getattr(tp, "__name__", str(tp))


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def decode(tp: type[T], value: Any, path: Sequence[str] = ()) -> T:
    """Build a ``tp`` from plain data, checking every value.

    Raises:
        DecodeError: a key is unknown or missing, or a value has the wrong type or is refused.
    """
    return _decode(tp, value, tuple(path))  # type: ignore[no-any-return]


def _decode(tp: Any, value: Any, path: tuple[str, ...]) -> Any:
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        return _decode_dataclass(tp, value, path)
    origin = typing.get_origin(tp)
    if origin is typing.Union or origin is types.UnionType:
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _decode(option, value, path)
            except DecodeError as err:
                errors.append(err)
        if len(errors) == 1:
            raise errors[0]
        expected = " or ".join(_type_name(o) for o in options if o is not type(None))
        raise DecodeError(path, f"expected {expected}, got {_describe(value)}")
    if origin is typing.Literal:
        choices = typing.get_args(tp)
        if value not in choices or type(value) not in {type(c) for c in choices}:
            allowed = ", ".join(repr(c) for c in choices)
            raise DecodeError(path, f"must be one of {allowed}, got {_describe(value)}")
        return value
    if origin in (list, tuple, Sequence):
        if not isinstance(value, list | tuple):
            raise DecodeError(path, f"expected array, got {_describe(value)}")
        args = typing.get_args(tp)
        item_tp = args[0] if args else Any
        items = [_decode(item_tp, item, (*path, f"[{i}]")) for i, item in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin in (dict, Mapping):
        if not isinstance(value, dict):
            raise DecodeError(path, f"expected table, got {_describe(value)}")
        key_tp, value_tp = typing.get_args(tp) or (str, Any)
        out = {}
        for key, item in value.items():
            if key_tp is str and not isinstance(key, str):
                raise DecodeError(path, f"keys must be strings, got {_describe(key)}")
            out[key] = _decode(value_tp, item, (*path, str(key)))
        return out
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        try:
            return tp(value)
        except ValueError:
            allowed = ", ".join(repr(m.value) for m in tp)
            raise DecodeError(path, f"must be one of {allowed}, got {_describe(value)}") from None
    if tp is Duration:
        if isinstance(value, str):
            try:
                return parse_duration(value)
            except ValueError as err:
                raise DecodeError(path, str(err)) from None
        if isinstance(value, int | float) and not isinstance(value, bool) and value >= 0:
            return Duration(value)
        raise DecodeError(path, f"expected duration such as \"5s\", got {_describe(value)}")
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        raise DecodeError(path, f"expected number, got {_describe(value)}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise DecodeError(path, f"expected integer, got {_describe(value)}")
    if tp in (str, bool, bytes):
        if type(value) is tp:
            return value
        raise DecodeError(path, f"expected {_type_name(tp)}, got {_describe(value)}")
    raise DecodeError(path, f"berth cannot decode a value of type {tp!r}")


def _decode_dataclass(cls: type, value: Any, path: tuple[str, ...]) -> Any:
    if not isinstance(value, dict):
        raise DecodeError(path, f"expected table, got {_describe(value)}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = _hints(cls)
    kwargs = {}
    for key, item in value.items():
        if key not in fields:
            known = ", ".join(sorted(fields)) or "none"
            raise DecodeError((*path, str(key)), f"unknown key (known keys: {known})")
        kwargs[key] = _decode(hints[key], item, (*path, key))
    for name, field in fields.items():
        missing = field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING
        if missing and name not in kwargs:
            raise DecodeError((*path, name), "required key is missing")
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as err:
        raise DecodeError(path, str(err)) from None


def encode(obj: Any) -> Any:
    """The plain-data form of a decoded value (``None`` fields are left out, as TOML has no null)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        out = {}
        for field in dataclasses.fields(obj):
            item = getattr(obj, field.name)
            if item is not None:
                out[field.name] = encode(item)
        return out
    if isinstance(obj, Duration):
        return format_duration(obj)
    if isinstance(obj, enum.Enum):
        return obj.value
    if isinstance(obj, list | tuple):
        return [encode(item) for item in obj]
    if isinstance(obj, dict):
        return {key: encode(item) for key, item in obj.items()}
    return obj
