"""The snapshotter interface, after containerd's ``core/snapshots/snapshotter.go``.

Terms:

* A **key** names an active snapshot or a view; a **name** names a committed snapshot. Keys and names
  share one key space in a snapshotter.
* **Prepare(key, parent)** makes an *active* snapshot: a writable filesystem whose initial content is
  the committed snapshot ``parent`` (empty when ``parent`` is ``""``). It returns the mounts that
  give access to it.
* **View(key, parent)** makes a read-only *view* of ``parent``; a view can never be committed.
* **Commit(name, key)** turns the active snapshot ``key`` into the committed snapshot ``name``
  (with the same parent); ``key`` is gone afterwards. Only committed snapshots can be parents.
* **Remove(key)** removes a snapshot that has no children.
* Parents form chains; a chain of layers is unpacked as Prepare → apply the layer → Commit, each
  commit being the next layer's parent.

Every method is a coroutine; filesystem work runs in worker threads. Errors:
:class:`~berth.core.errdefs.NotFound` for a missing key, :class:`~berth.core.errdefs.AlreadyExists`
for a key in use, :class:`~berth.core.errdefs.FailedPrecondition` for a wrong kind (committing a view,
a parent that is not committed, removing a snapshot with children),
:class:`~berth.core.errdefs.InvalidArgument` for an update of anything but labels.
"""

from __future__ import annotations

import enum
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

__all__ = ["Info", "Kind", "Mount", "Snapshotter", "Usage"]


class Kind(enum.StrEnum):
    VIEW = "view"
    ACTIVE = "active"
    COMMITTED = "committed"


@dataclass(frozen=True, slots=True, kw_only=True)
class Mount:
    """One mount(2) call: ``type``, ``source``, ``options`` (``-o``); ``target`` is relative to the
    mount point ("" for the mount point itself)."""

    type: str
    source: str
    options: tuple[str, ...] = ()
    target: str = ""

    def to_wire(self) -> dict[str, Any]:
        return {"type": self.type, "source": self.source, "options": list(self.options), "target": self.target}

    @classmethod
    def from_wire(cls, wire: Mapping[str, Any]) -> Mount:
        return cls(type=wire["type"], source=wire["source"], options=tuple(wire.get("options", ())),
                   target=wire.get("target", ""))


@dataclass(frozen=True, slots=True, kw_only=True)
class Info:
    """A snapshot: ``name`` is its key (or committed name), ``parent`` the committed parent's name."""

    name: str
    kind: Kind
    parent: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    created_at: float = 0.0
    updated_at: float = 0.0

    def to_wire(self) -> dict[str, Any]:
        return {"name": self.name, "kind": str(self.kind), "parent": self.parent, "labels": dict(self.labels),
                "created_at": self.created_at, "updated_at": self.updated_at}

    def filter_target(self) -> dict[str, Any]:
        """Fields list filters match on: ``name``, ``parent``, ``kind``, ``labels.<key>``."""
        return {"name": self.name, "parent": self.parent, "kind": str(self.kind), "labels": self.labels}


@dataclass(frozen=True, slots=True, kw_only=True)
class Usage:
    """Disk used by one snapshot alone (not its parents): bytes and inodes."""

    size: int = 0
    inodes: int = 0

    def to_wire(self) -> dict[str, int]:
        return {"size": self.size, "inodes": self.inodes}


class Snapshotter(Protocol):
    """See the module docstring for the terms and the errors."""

    async def stat(self, key: str) -> Info: ...

    async def update(self, info: Info, fieldpaths: Sequence[str] = ()) -> Info:
        """Change labels only (no fieldpaths or ``labels``: replace all; ``labels.<k>``: one key)."""

    async def usage(self, key: str) -> Usage: ...

    async def mounts(self, key: str) -> list[Mount]:
        """The mounts of an active snapshot or a view."""

    async def prepare(self, key: str, parent: str = "", labels: Mapping[str, str] | None = None) -> list[Mount]: ...

    async def view(self, key: str, parent: str = "", labels: Mapping[str, str] | None = None) -> list[Mount]: ...

    async def commit(self, name: str, key: str, labels: Mapping[str, str] | None = None) -> None: ...

    async def remove(self, key: str) -> None: ...

    def walk(self, filters: Sequence[str] = ()) -> AsyncIterator[Info]:
        """Every snapshot matching any filter (fields ``name``, ``parent``, ``kind``, ``labels.<k>``)."""

    async def aclose(self) -> None:
        """Release resources; idempotent (containerd's Close)."""
