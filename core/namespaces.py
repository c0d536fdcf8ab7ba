"""The namespace (and lease) a piece of work runs in, carried in context variables.

As containerd carries them in a ``context.Context``: the RPC server sets both from each call's meta,
and namespaced stores read them. trio copies the context into tasks spawned afterwards, so a
background task inherits its spawner's namespace.
"""

from __future__ import annotations

import contextvars
from collections.abc import Iterator
from contextlib import contextmanager

from berth.core.errdefs import FailedPrecondition
from berth.core.identifiers import validate_identifier

__all__ = ["current_lease", "current_namespace", "namespace_required", "with_lease", "with_namespace"]

_namespace: contextvars.ContextVar[str | None] = contextvars.ContextVar("berth_namespace", default=None)
_lease: contextvars.ContextVar[str | None] = contextvars.ContextVar("berth_lease", default=None)


def current_namespace() -> str | None:
    """The namespace of the current work, or ``None``."""
    return _namespace.get()


def namespace_required() -> str:
    """The namespace of the current work.

    Raises:
        FailedPrecondition: no namespace is set.
    """
    namespace = _namespace.get()
    if namespace is None:
        raise FailedPrecondition("namespace is required")
    return namespace


def current_lease() -> str | None:
    """The lease the current work's new objects join, or ``None``."""
    return _lease.get()


@contextmanager
def with_namespace(namespace: str) -> Iterator[str]:
    """Run the block in ``namespace``.

    Raises:
        InvalidArgument: the name is not a valid identifier.
    """
    token = _namespace.set(validate_identifier(namespace, "namespace"))
    try:
        yield namespace
    finally:
        _namespace.reset(token)


@contextmanager
def with_lease(lease: str | None) -> Iterator[str | None]:
    """Make objects created in the block join ``lease`` (``None``: no lease)."""
    token = _lease.set(lease)
    try:
        yield lease
    finally:
        _lease.reset(token)
