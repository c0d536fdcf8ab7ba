"""JSON for ``berth-runtime`` through CPython's ``_json`` accelerator, without importing :mod:`json`.

:mod:`json` imports :mod:`re`, which imports ``enum``, ``functools`` and ``collections``: about 6 ms of
every runtime command, more than a third of the interpreter's own start-up. The parsing and encoding
here are the C code :mod:`json` itself uses (``_json.make_scanner`` and ``_json.make_encoder``), so the
results are the same; only a failure imports :mod:`json`, to raise its :class:`json.JSONDecodeError`
(a :class:`ValueError`) with its usual message.

Used on the runtime's hot paths (the bundle, the state file, the channel to the container process,
JSON logs). ``berth-runtime`` runs on CPython, whose ``_json`` these are.
"""

from __future__ import annotations

import _json

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

__all__ = ["dumps", "loads"]

_WHITESPACE = " \t\n\r"


class _ScannerContext:
    """The attributes ``_json.make_scanner`` reads: :class:`json.JSONDecoder`'s defaults."""

    strict = True
    object_hook = None
    object_pairs_hook = None
    parse_float = float
    parse_int = int
    parse_constant = {"-Infinity": float("-inf"), "Infinity": float("inf"), "NaN": float("nan")}.__getitem__


def _not_serializable(value: object) -> None:
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


_context: Any = _ScannerContext()
_scan = _json.make_scanner(_context)
# (markers, default, encoder, indent, key_separator, item_separator, sort_keys, skipkeys, allow_nan):
# json.dumps's defaults.
_encode = _json.make_encoder({}, _not_serializable, _json.encode_basestring_ascii, None, ": ", ", ", False, False,
                             True)


def loads(text: str | bytes) -> Any:
    """Parse one JSON document, as :func:`json.loads` does; raise :class:`ValueError` (a
    :class:`json.JSONDecodeError`, :class:`UnicodeDecodeError` for bytes that are not UTF-8, or a plain
    one for arrays and objects nested too deeply to parse, where :func:`json.loads` raises
    :class:`RecursionError`)."""
    try:
        return _loads(text)
    except RecursionError:
        raise ValueError("arrays or objects nested too deeply") from None


def _loads(text: str | bytes) -> Any:
    if not isinstance(text, str):
        if isinstance(text, bytes) and not text.startswith((b"\xef\xbb\xbf", b"\xff", b"\xfe")):
            return _loads(text.decode())  # UTF-8 (json.loads also detects UTF-16/32 and a BOM: that path)
        return _json_module().loads(text)
    start = len(text) - len(text.lstrip(_WHITESPACE))
    try:
        value, end = _scan(text, start)
    except (StopIteration, ValueError):
        value, end = None, -1
    if end < 0 or text[end:].strip(_WHITESPACE):
        return _json_module().loads(text)  # raises with json's own message
    return value


def dumps(value: Any, *, indent: int | None = None) -> str:
    """Encode ``value`` as :func:`json.dumps` does with its defaults (ASCII output, ``", "`` and
    ``": "`` separators) or, with ``indent``, one item per line; raise :class:`TypeError` for a value
    JSON cannot hold and :class:`ValueError` for a circular reference."""
    if indent is None:
        return "".join(_encode(value, 0))
    return _indented(value, indent, 0)


def _indented(value: Any, indent: int, level: int) -> str:
    inner = " " * (level + indent)
    if isinstance(value, dict) and value:
        items = [f"{inner}{_encode(str(key), 0)[0]}: {_indented(item, indent, level + indent)}"
                 for key, item in value.items()]
    elif isinstance(value, (list, tuple)) and value:
        items = [inner + _indented(item, indent, level + indent) for item in value]
    else:
        return "".join(_encode(value, 0))
    opening, closing = ("{", "}") if isinstance(value, dict) else ("[", "]")
    return opening + "\n" + ",\n".join(items) + "\n" + " " * level + closing


def _json_module() -> Any:
    import json

    return json
