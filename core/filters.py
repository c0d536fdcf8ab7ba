"""containerd's filter syntax, for list calls and event subscriptions.

A filter string is a comma-separated list of selectors, all of which must match (AND); several
filter strings match when any one does (OR)::

    selectors := selector ("," selector)*
    selector  := fieldpath [operator value]
    fieldpath := field ("." field)*
    field     := quoted | [A-Za-z_][A-Za-z0-9_]*
    operator  := "==" | "!=" | "~="
    value     := quoted | [^\\s,]+
    quoted    := "..." or '...' (and /.../ or |...| after ~=), with backslash escapes

A bare field path tests presence. Examples: ``topic=="/tasks/exit"``,
``topic~="/images/",namespace==k8s.io``, ``labels."berth.io/gc.root"``.

Objects are matched through an adaptor: a callable that takes a field path and returns
``(value, present)``. :func:`mapping_adaptor` serves plain nested maps.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from berth.core.errdefs import InvalidArgument

__all__ = ["Adaptor", "Filter", "mapping_adaptor", "parse_filters"]

Adaptor = Callable[[Sequence[str]], tuple[str, bool]]

_FIELD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_VALUE = re.compile(r"[^\s,]+")
_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\", '"': '"', "'": "'", "/": "/", "|": "|"}


@dataclass(frozen=True, slots=True)
class _Selector:
    fieldpath: tuple[str, ...]
    operator: str | None  # None: presence
    value: str = ""
    regex: re.Pattern[str] | None = None

    def match(self, adaptor: Adaptor) -> bool:
        value, present = adaptor(self.fieldpath)
        if self.operator is None:
            return present
        if self.operator == "==":
            return present and value == self.value
        if self.operator == "!=":
            return value != self.value
        assert self.regex is not None
        return self.regex.search(value) is not None


@dataclass(frozen=True, slots=True)
class Filter:
    """A parsed set of filter strings: matches when any string's selectors all match."""

    alternatives: tuple[tuple[_Selector, ...], ...]

    def match(self, adaptor: Adaptor) -> bool:
        if not self.alternatives:
            return True
        return any(all(s.match(adaptor) for s in selectors) for selectors in self.alternatives)

    def match_mapping(self, obj: Mapping[str, Any]) -> bool:
        """Match a plain nested map (see :func:`mapping_adaptor`)."""
        return self.match(mapping_adaptor(obj))


def mapping_adaptor(obj: Mapping[str, Any]) -> Adaptor:
    """An adaptor over nested maps: each path part selects a key; scalars compare as strings."""

    def field(path: Sequence[str]) -> tuple[str, bool]:
        current: Any = obj
        for part in path:
            if not isinstance(current, Mapping) or part not in current:
                return "", False
            current = current[part]
        if current is None:
            return "", False
        if isinstance(current, bool):
            return ("true" if current else "false"), True
        if isinstance(current, str | int | float):
            return str(current), True
        return "", True

    return field


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def error(self, message: str) -> InvalidArgument:
        return InvalidArgument(f"filter {self.text!r}: {message} at position {self.pos}")

    def skip_space(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos].isspace():
            self.pos += 1

    def peek(self) -> str:
        self.skip_space()
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def selectors(self) -> tuple[_Selector, ...]:
        out = [self.selector()]
        while self.peek() == ",":
            self.pos += 1
            out.append(self.selector())
        if self.peek():
            raise self.error(f"unexpected {self.peek()!r}")
        return tuple(out)

    def selector(self) -> _Selector:
        path = [self.field()]
        while self.peek() == ".":
            self.pos += 1
            path.append(self.field())
        if self.peek() in ("", ","):
            return _Selector(tuple(path), None)
        operator = self.text[self.pos : self.pos + 2]
        if operator not in ("==", "!=", "~="):
            raise self.error('expected an operator ("==", "!=" or "~=")')
        self.pos += 2
        value = self.value(regex=operator == "~=")
        if operator != "~=":
            return _Selector(tuple(path), operator, value)
        try:
            return _Selector(tuple(path), operator, value, re.compile(value))
        except re.error as err:
            raise self.error(f"bad regular expression {value!r}: {err.msg}") from None

    def field(self) -> str:
        char = self.peek()
        if char in ('"', "'"):
            return self.quoted(char)
        match = _FIELD.match(self.text, self.pos)
        if match is None:
            raise self.error("expected a field name or a quoted string")
        self.pos = match.end()
        return match.group()

    def value(self, *, regex: bool) -> str:
        char = self.peek()
        if char in ('"', "'") or (regex and char in ("/", "|")):
            return self.quoted(char)
        match = _VALUE.match(self.text, self.pos)
        if match is None:
            raise self.error("expected a value")
        self.pos = match.end()
        return match.group()

    def quoted(self, quote: str) -> str:
        self.pos += 1
        out: list[str] = []
        while self.pos < len(self.text):
            char = self.text[self.pos]
            self.pos += 1
            if char == quote:
                return "".join(out)
            if char == "\\" and self.pos < len(self.text):
                escaped = self.text[self.pos]
                self.pos += 1
                out.append(_ESCAPES.get(escaped, "\\" + escaped))
            else:
                out.append(char)
        raise self.error(f"unterminated quoted string (missing {quote})")


def parse_filters(filters: Sequence[str]) -> Filter:
    """Parse filter strings; no strings, or only empty ones, match everything.

    Raises:
        InvalidArgument: a string is not valid filter syntax (the message shows where).
    """
    alternatives = tuple(_Parser(text).selectors() for text in filters if text.strip())
    if len(alternatives) < len(filters):
        return Filter(())
    return Filter(alternatives)
