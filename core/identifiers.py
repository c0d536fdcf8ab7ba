"""Validation of names and labels, as containerd's ``identifiers`` and ``labels`` packages do it.

An identifier (namespace, container id, lease id, topic component) is 1-76 characters of
letters and digits, separated by single ``.``, ``_`` or ``-``. A label's key and value together may
hold at most 4096 bytes.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from berth.core.errdefs import InvalidArgument

__all__ = ["MAX_IDENTIFIER_LENGTH", "MAX_LABEL_SIZE", "validate_identifier", "validate_labels"]

MAX_IDENTIFIER_LENGTH = 76
MAX_LABEL_SIZE = 4096
_IDENTIFIER = re.compile(r"[A-Za-z0-9]+(?:[._-][A-Za-z0-9]+)*\Z")


def validate_identifier(value: Any, what: str = "identifier") -> str:
    """Return ``value`` if it is a valid identifier.

    Raises:
        InvalidArgument: naming ``what`` and saying which rule the value breaks.
    """
    if not isinstance(value, str):
        raise InvalidArgument(f"{what} must be a string, got {type(value).__name__}")
    if not value:
        raise InvalidArgument(f"{what} must not be empty")
    if len(value) > MAX_IDENTIFIER_LENGTH:
        raise InvalidArgument(f"{what} {value[:20]!r}... is longer than {MAX_IDENTIFIER_LENGTH} characters")
    if not _IDENTIFIER.match(value):
        raise InvalidArgument(
            f"{what} {value!r} is invalid: use letters and digits separated by single '.', '_' or '-'"
        )
    return value


def validate_labels(labels: Any) -> dict[str, str]:
    """Return ``labels`` if it is a map of strings whose every key+value fits in 4096 bytes.

    Raises:
        InvalidArgument: naming the offending label.
    """
    if not isinstance(labels, Mapping):
        raise InvalidArgument(f"labels must be a map of strings, got {type(labels).__name__}")
    for key, value in labels.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise InvalidArgument(f"label {key!r}: keys and values must be strings")
        if not key:
            raise InvalidArgument("label keys must not be empty")
        if len(key.encode()) + len(value.encode()) > MAX_LABEL_SIZE:
            raise InvalidArgument(f"label {key[:40]!r}: key and value exceed {MAX_LABEL_SIZE} bytes")
    return dict(labels)
