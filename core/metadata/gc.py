"""Garbage collection: mark everything reachable from the roots, delete the rest, then free the bytes.

**Roots** (per namespace): leases that have not expired (and, through them, their resources), images
whose ``berth.io/gc.expire`` is not past, containers, content and snapshots labelled
``berth.io/gc.root``, and ingests that have not expired or are held by a lease.

**References**: an image references its target blob; a container its snapshot; a snapshot its
parent; an ingest with an expected digest that blob; and any object's labels
``berth.io/gc.ref.content[.<suffix>] = <digest>``, ``berth.io/gc.ref.snapshot.<snapshotter>[/<suffix>]
= <key>`` and ``berth.io/gc.ref.image[.<suffix>] = <name>`` reference objects of its namespace.
**Back-references** ``berth.io/gc.bref.{content,image,container}[.<suffix>]`` and
``berth.io/gc.bref.snapshot.<snapshotter>[/<suffix>]`` on an object X make X reachable whenever the
object they name is. A lease labelled ``berth.io/gc.flat`` holds its resources but not what they reference.

:class:`GarbageCollector` marks and sweeps the records in one write transaction (under the database's
write lock: readers go on), then, outside the lock, removes backend blobs no record names and backend
ingests no record owns. One failing backend removal is logged and skipped; it never stops the rest.
"""

from __future__ import annotations

import sqlite3
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import structlog
import trio

from berth.core.content import Store
from berth.core.errdefs import BerthError
from berth.core.metadata.content import NamespacedContentStore
from berth.core.metadata.db import MetadataDB, load_labels
from berth.core.metadata.leases import LABEL_GC_EXPIRE, parse_expiry
from berth.core.metadata.snapshots import NamespacedSnapshotter, collect_backend

__all__ = [
    "LABEL_GC_FLAT",
    "LABEL_GC_ROOT",
    "GCResult",
    "GarbageCollector",
    "Node",
    "mark",
    "scan",
    "sweep",
]

log = structlog.get_logger("berth.gc")

LABEL_GC_ROOT = "berth.io/gc.root"
LABEL_GC_FLAT = "berth.io/gc.flat"
_REF = "berth.io/gc.ref."
_BREF = "berth.io/gc.bref."

#: ``(kind, namespace, key)``: kind is content, snapshot, image, container, lease or ingest; a
#: snapshot's key is ``<snapshotter>/<key>``.
Node = tuple[str, str, str]
Publish = Callable[[str, str, dict[str, Any]], object]


@dataclass
class Graph:
    """What :func:`scan` read: every object, the roots, and the edges between objects."""

    objects: set[Node] = field(default_factory=set)
    roots: set[Node] = field(default_factory=set)
    refs: dict[Node, set[Node]] = field(default_factory=lambda: defaultdict(set))
    #: Flat leases: what they hold is marked, but its references are not followed from there (the
    #: same object reached another way still has its references followed).
    flat: set[Node] = field(default_factory=set)


def _label_refs(namespace: str, labels: dict[str, str], prefix: str) -> Iterable[Node]:
    """Nodes named by ``<prefix>content|image|container|snapshot.<sn>`` labels."""
    for key, value in labels.items():
        if not key.startswith(prefix) or not value:
            continue
        kind = key[len(prefix):]
        for name in ("content", "image", "container"):
            if kind == name or kind.startswith(name + "."):
                yield (name, namespace, value)
                break
        else:
            if kind.startswith("snapshot."):
                snapshotter = kind[len("snapshot."):].split("/", 1)[0]
                if snapshotter:
                    yield ("snapshot", namespace, f"{snapshotter}/{value}")


def scan(conn: sqlite3.Connection, now: float | None = None) -> Graph:
    """Read every object and edge from the database (inside a transaction)."""
    now = time.time() if now is None else now
    graph = Graph()
    backrefs: list[tuple[Node, dict[str, str]]] = []

    def add(node: Node, labels: dict[str, str]) -> None:
        graph.objects.add(node)
        if labels.get(LABEL_GC_ROOT) is not None and node[0] in ("content", "snapshot"):
            graph.roots.add(node)
        graph.refs[node].update(_label_refs(node[1], labels, _REF))
        backrefs.append((node, labels))

    for row in conn.execute("SELECT namespace, digest, labels FROM content"):
        add(("content", row[0], row[1]), load_labels(row[2]))
    for row in conn.execute("SELECT namespace, snapshotter, key, parent, labels FROM snapshots"):
        node = ("snapshot", row[0], f"{row[1]}/{row[2]}")
        add(node, load_labels(row[4]))
        if row[3]:
            graph.refs[node].add(("snapshot", row[0], f"{row[1]}/{row[3]}"))
    for row in conn.execute("SELECT namespace, name, target, labels FROM images"):
        node = ("image", row[0], row[1])
        labels = load_labels(row[3])
        add(node, labels)
        target_digest = _target_digest(row[2])
        if target_digest:
            graph.refs[node].add(("content", row[0], target_digest))
        expiry = parse_expiry(labels[LABEL_GC_EXPIRE]) if LABEL_GC_EXPIRE in labels else None
        if expiry is None or expiry > now:
            graph.roots.add(node)
    for row in conn.execute("SELECT namespace, id, record, labels FROM containers"):
        node = ("container", row[0], row[1])
        add(node, load_labels(row[3]))
        graph.roots.add(node)
        snapshotter, key = _container_snapshot(row[2])
        if snapshotter and key:
            graph.refs[node].add(("snapshot", row[0], f"{snapshotter}/{key}"))
    for row in conn.execute("SELECT namespace, id, labels FROM leases"):
        node = ("lease", row[0], row[1])
        labels = load_labels(row[2])
        graph.objects.add(node)
        expiry = parse_expiry(labels[LABEL_GC_EXPIRE]) if LABEL_GC_EXPIRE in labels else None
        if expiry is None or expiry > now:
            graph.roots.add(node)
        if LABEL_GC_FLAT in labels:
            graph.flat.add(node)
        for resource in conn.execute("SELECT type, id FROM lease_resources WHERE namespace = ? AND lease = ?",
                                     (row[0], row[1])):
            kind, key = resource[0], resource[1]
            if kind.startswith("snapshots/"):
                target: Node = ("snapshot", row[0], f"{kind[len('snapshots/'):]}/{key}")
            else:
                target = ({"content": "content", "images": "image", "ingests": "ingest"}[kind], row[0], key)
            graph.refs[node].add(target)
    for row in conn.execute("SELECT namespace, ref, expected, expire_at FROM ingests"):
        node = ("ingest", row[0], row[1])
        graph.objects.add(node)
        if row[2]:
            graph.refs[node].add(("content", row[0], row[2]))
        # An ingest opened under a lease has no expiry of its own: the lease alone holds it.
        if row[3] is not None and row[3] > now:
            graph.roots.add(node)

    for node, labels in backrefs:
        for parent in _label_refs(node[1], labels, _BREF):
            graph.refs[parent].add(node)
    return graph


def _target_digest(target: str) -> str:
    import json

    try:
        value = json.loads(target)
    except ValueError:
        return ""
    digest = value.get("digest") if isinstance(value, dict) else None
    return digest if isinstance(digest, str) else ""


def _container_snapshot(record: str) -> tuple[str, str]:
    import json

    try:
        value = json.loads(record)
    except ValueError:
        return "", ""
    if not isinstance(value, dict):
        return "", ""
    return str(value.get("snapshotter") or ""), str(value.get("snapshot_key") or "")


def mark(graph: Graph) -> set[Node]:
    """Every object reachable from the roots (depth-first). What a flat lease holds is marked without
    following its references, unless it is also reached another way."""
    reachable: set[Node] = set()
    expanded: set[Node] = set()
    stack: list[tuple[Node, bool]] = [(node, True) for node in graph.roots]
    while stack:
        node, follow = stack.pop()
        reachable.add(node)
        if not follow or node in expanded:
            continue
        expanded.add(node)
        follow_children = node not in graph.flat
        stack.extend((n, follow_children) for n in graph.refs.get(node, ()) if n not in expanded)
    return reachable & graph.objects


def sweep(conn: sqlite3.Connection, graph: Graph, reachable: set[Node]) -> list[Node]:
    """Delete the records of every unreachable object (inside the write transaction); return them."""
    removed = sorted(graph.objects - reachable)
    for kind, namespace, key in removed:
        if kind == "content":
            conn.execute("DELETE FROM content WHERE namespace = ? AND digest = ?", (namespace, key))
        elif kind == "snapshot":
            snapshotter, _, name = key.partition("/")
            conn.execute("DELETE FROM snapshots WHERE namespace = ? AND snapshotter = ? AND key = ?",
                         (namespace, snapshotter, name))
        elif kind == "image":
            conn.execute("DELETE FROM images WHERE namespace = ? AND name = ?", (namespace, key))
        elif kind == "lease":
            conn.execute("DELETE FROM leases WHERE namespace = ? AND id = ?", (namespace, key))
        elif kind == "ingest":
            conn.execute("DELETE FROM ingests WHERE namespace = ? AND ref = ?", (namespace, key))
        elif kind == "container":  # containers are always roots; listed for completeness
            continue
        if kind in ("content", "image", "ingest"):
            resource_type = {"content": "content", "image": "images", "ingest": "ingests"}[kind]
            conn.execute("DELETE FROM lease_resources WHERE namespace = ? AND type = ? AND id = ?",
                         (namespace, resource_type, key))
    return removed


@dataclass(frozen=True, kw_only=True)
class GCResult:
    """One collection: what it removed and how long it held the write lock (``pause``, seconds)."""

    removed: list[Node]
    blobs_removed: int
    ingests_aborted: int
    snapshots_removed: int
    pause: float
    duration: float
    errors: list[str]


class GarbageCollector:
    """Collects the metadata database and the content backend; one collection at a time."""

    def __init__(self, db: MetadataDB, content: NamespacedContentStore | None = None,
                 publish: Publish | None = None,
                 snapshotters: Mapping[str, NamespacedSnapshotter] | None = None) -> None:
        self.db = db
        self.content = content
        #: Namespaced snapshotters by name, whose backends are cleaned after each sweep.
        self.snapshotters: dict[str, NamespacedSnapshotter] = dict(snapshotters or {})
        self._publish = publish or (lambda *_: None)
        self._running = trio.Lock()
        self.last: GCResult | None = None

    async def collect(self) -> GCResult:
        """Run one collection. Cancellation is deferred until it finishes (it is shielded)."""
        with trio.CancelScope(shield=True):
            async with self._running:
                result = await self._collect()
        return result

    async def _collect(self) -> GCResult:
        started = time.monotonic()
        async with self.db.write_lock:
            locked = time.monotonic()

            def mark_and_sweep(conn: sqlite3.Connection) -> list[Node]:
                graph = scan(conn)
                return sweep(conn, graph, mark(graph))

            removed = await self.db.write_locked(mark_and_sweep)
            pause = time.monotonic() - locked
        for kind, namespace, key in removed:
            topic = {"content": "/content/delete", "image": "/images/delete", "snapshot": "/snapshot/remove"}
            if kind in topic:
                field_name = {"content": "digest", "image": "name", "snapshot": "key"}[kind]
                self._publish(namespace, topic[kind], {field_name: key})
        errors: list[str] = []
        blobs = aborted = 0
        if self.content is not None:
            blobs, aborted = await self._clean_content(self.content, errors)
        snapshots = 0
        for snapshotter in self.snapshotters.values():
            snapshots += await collect_backend(snapshotter, errors)
        result = GCResult(removed=removed, blobs_removed=blobs, ingests_aborted=aborted,
                          snapshots_removed=snapshots, pause=pause, duration=time.monotonic() - started,
                          errors=errors)
        self.last = result
        log.info("gc_collected", records=len(removed), blobs=blobs, ingests=aborted, snapshots=snapshots,
                 pause_ms=round(pause * 1000, 3), errors=len(errors))
        return result

    async def _clean_content(self, content: NamespacedContentStore, errors: list[str]) -> tuple[int, int]:
        """Free backend blobs and ingests no record names, with new ingests and commits held off."""

        def live(conn: sqlite3.Connection) -> tuple[set[str], set[str]]:
            digests = {r[0] for r in conn.execute("SELECT DISTINCT digest FROM content")}
            digests |= {r[0] for r in conn.execute("SELECT expected FROM ingests WHERE expected != ''")}
            refs = {r[0] for r in conn.execute("SELECT backend_ref FROM ingests")}
            return digests, refs

        backend = content.backend
        blobs = aborted = 0
        async with content.gc_lock.exclusive():
            live_digests, live_refs = await self.db.read(live)
            stale = [info.digest async for info in backend.walk() if info.digest not in live_digests]
            blobs = await self._remove_blobs(backend, stale, errors)
            for status in await backend.list_statuses():
                if status.ref in live_refs:
                    continue
                try:
                    await backend.abort(status.ref)
                    aborted += 1
                except (BerthError, OSError) as err:
                    errors.append(f"ingest {status.ref}: {err}")
                    log.warning("gc_abort_failed", ref=status.ref, error=str(err))
        return blobs, aborted

    async def _remove_blobs(self, backend: Store, digests: list[str], errors: list[str]) -> int:
        removed = 0
        for digest in digests:
            try:
                await backend.delete(digest)
                removed += 1
            except (BerthError, OSError) as err:
                errors.append(f"content {digest}: {err}")
                log.warning("gc_remove_failed", digest=digest, error=str(err))
        return removed
