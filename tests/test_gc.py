"""Garbage collection over a real metadata database and local content store, and its scheduler."""

from __future__ import annotations

import hashlib
import tempfile
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import hypothesis
import hypothesis.strategies as st
import pytest
import trio
import trio.lowlevel

from berth.core.content import Info
from berth.core.decode import Duration
from berth.core.errdefs import NotFound
from berth.core.metadata import content as content_module
from berth.core.metadata.content import NamespacedContentStore
from berth.core.metadata.db import MetadataDB
from berth.core.metadata.gc import LABEL_GC_FLAT, LABEL_GC_ROOT, GarbageCollector, GCResult
from berth.core.metadata.leases import LABEL_GC_EXPIRE, LeaseManager, Resource, format_expiry
from berth.core.metadata.namespaces import NamespaceStore
from berth.core.namespaces import with_lease, with_namespace
from berth.plugins.content.local.store import LocalStore
from berth.plugins.gc import scheduler as scheduler_module
from berth.plugins.gc.scheduler import Config, Scheduler
from berth.plugins.metadata.plugin import Metadata

WAIT = 10.0
REF = "berth.io/gc.ref.content"
BREF = "berth.io/gc.bref.content"


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass
class Env:
    db: MetadataDB
    backend: LocalStore
    content: NamespacedContentStore
    gc: GarbageCollector
    leases: LeaseManager

    def on_disk(self, digest: str) -> bool:
        return self.backend.blob_path(digest).exists()

    def disk_digests(self) -> set[str]:
        root = self.backend.root / "blobs" / "sha256"
        return {f"sha256:{p.name}" for p in root.iterdir()} if root.exists() else set()

    async def has_record(self, namespace: str, digest: str) -> bool:
        with with_namespace(namespace):
            try:
                await self.content.info(digest)
            except NotFound:
                return False
            return True

    async def put(self, data: bytes, labels: Mapping[str, str] | None = None, ref: str | None = None) -> str:
        """Write ``data`` in the current namespace (under the current lease, if any)."""
        digest = sha(data)
        writer = await self.content.writer(ref or f"put-{digest}", total=len(data))
        await writer.write(data)
        await writer.commit(len(data), digest, labels)
        return digest

    async def collect(self) -> GCResult:
        with trio.fail_after(WAIT):
            return await self.gc.collect()


async def open_env(root: Path) -> Env:
    db = await MetadataDB.open(root / "meta.db")
    backend = LocalStore(root / "content")
    content = NamespacedContentStore(db, backend)
    gc = GarbageCollector(db, content)
    return Env(db, backend, content, gc, LeaseManager(db, collect=gc.collect))


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[Env]:
    environment = await open_env(tmp_path)
    try:
        yield environment
    finally:
        await environment.db.aclose()


# ---------------------------------------------------------------- semantics


async def test_unreferenced_content_is_removed(env: Env) -> None:
    with with_namespace("ns"):
        digest = await env.put(b"nobody wants me")
    assert env.on_disk(digest)
    result = await env.collect()
    assert ("content", "ns", digest) in result.removed
    assert result.blobs_removed == 1
    assert result.errors == []
    assert not await env.has_record("ns", digest)
    assert not env.on_disk(digest)
    # A second collection has nothing left to do.
    again = await env.collect()
    assert again.removed == []
    assert again.blobs_removed == 0


async def test_gc_root_keeps_content(env: Env) -> None:
    with with_namespace("ns"):
        root = await env.put(b"root", {LABEL_GC_ROOT: "2024-01-01T00:00:00Z"})
        loose = await env.put(b"loose")
    result = await env.collect()
    assert [n for n in result.removed if n[0] == "content"] == [("content", "ns", loose)]
    assert await env.has_record("ns", root)
    assert env.on_disk(root)
    assert not env.on_disk(loose)


async def test_deleted_record_frees_bytes_only_at_gc(env: Env) -> None:
    with with_namespace("ns"):
        digest = await env.put(b"rooted", {LABEL_GC_ROOT: "x"})
        await env.content.delete(digest)
    assert env.on_disk(digest)  # delete drops the record; the bytes wait for the collector
    await env.collect()
    assert not env.on_disk(digest)


async def test_ref_chains_keep_children(env: Env) -> None:
    with with_namespace("ns"):
        leaf = await env.put(b"leaf")
        middle = await env.put(b"middle", {f"{REF}.l.0": leaf})
        other = await env.put(b"other")
        top = await env.put(b"top", {LABEL_GC_ROOT: "1", f"{REF}.m.0": middle, REF: other,
                                     f"{REF}.missing": sha(b"never written")})
        orphan_child = await env.put(b"orphan child")
        await env.put(b"orphan parent", {f"{REF}.x": orphan_child})
    result = await env.collect()
    assert result.errors == []
    for digest in (top, middle, leaf, other):
        assert await env.has_record("ns", digest)
        assert env.on_disk(digest)
    assert not env.on_disk(orphan_child)
    assert not env.on_disk(sha(b"orphan parent"))
    # Cutting the chain at the top frees everything below.
    with with_namespace("ns"):
        await env.content.update(Info(digest=top, size=0, created_at=0, updated_at=0), ["labels." + LABEL_GC_ROOT])
    await env.collect()
    assert env.disk_digests() == set()


async def test_refs_do_not_cross_namespaces(env: Env) -> None:
    with with_namespace("a"):
        child = await env.put(b"child in a")
    with with_namespace("b"):
        await env.put(b"root in b", {LABEL_GC_ROOT: "1", REF: child})
    await env.collect()
    assert not await env.has_record("a", child)
    assert not env.on_disk(child)


async def test_back_references(env: Env) -> None:
    with with_namespace("ns"):
        parent = await env.put(b"parent", {LABEL_GC_ROOT: "1"})
        child = await env.put(b"child", {f"{BREF}.parent": parent})
        grandchild = await env.put(b"grandchild", {BREF: child})
        stray = await env.put(b"stray", {BREF: sha(b"parent that does not exist yet")})
    await env.collect()
    assert env.on_disk(parent)
    assert env.on_disk(child)
    assert env.on_disk(grandchild)
    assert not env.on_disk(stray)
    with with_namespace("ns"):
        await env.content.delete(parent)
    await env.collect()
    assert env.disk_digests() == set()


async def test_lease_keeps_its_resources_until_deleted(env: Env) -> None:
    with with_namespace("ns"):
        await env.leases.create("pull")
        with with_lease("pull"):
            child = sha(b"child")
            parent = await env.put(b"parent", {REF: child})
        await env.put(b"child")  # not leased itself: held through the leased parent's label
    for _ in range(2):
        result = await env.collect()
        assert result.removed == []
        assert env.on_disk(parent)
        assert env.on_disk(child)
    with with_namespace("ns"):
        await env.leases.delete("pull")
    result = await env.collect()
    assert {n for n in result.removed if n[0] == "content"} == {("content", "ns", parent), ("content", "ns", child)}
    assert env.disk_digests() == set()


async def test_lease_resource_added_explicitly(env: Env) -> None:
    with with_namespace("ns"):
        digest = await env.put(b"added later")
        await env.leases.create("l1")
        await env.leases.add_resource("l1", Resource(type="content", id=digest))
        await env.collect()
        assert env.on_disk(digest)
        await env.leases.delete_resource("l1", Resource(type="content", id=digest))
    await env.collect()
    assert not env.on_disk(digest)


async def test_sync_lease_delete_collects(env: Env) -> None:
    with with_namespace("ns"):
        await env.leases.create("l1")
        with with_lease("l1"):
            digest = await env.put(b"short lived")
        with trio.fail_after(WAIT):
            await env.leases.delete("l1", sync=True)
    assert not env.on_disk(digest)


async def test_expired_lease_does_not_hold(env: Env) -> None:
    with with_namespace("ns"):
        soon = await env.leases.create("soon", expires_in=0.05)
        with with_lease("soon"):
            a = await env.put(b"held by soon")
        await env.leases.create("past", {LABEL_GC_EXPIRE: format_expiry(time.time() - 60)})
        with with_lease("past"):
            b = await env.put(b"held by past")
        await env.leases.create("future", {LABEL_GC_EXPIRE: format_expiry(time.time() + 3600)})
        with with_lease("future"):
            c = await env.put(b"held by future")
        await env.leases.create("never", {LABEL_GC_EXPIRE: "not a time"})  # never expires
        with with_lease("never"):
            d = await env.put(b"held by never")
    assert soon.expires_at is not None
    with trio.fail_after(WAIT):
        while time.time() <= soon.expires_at:  # noqa: ASYNC110 - waits on the wall clock, not an event
            await trio.sleep(0.01)
    result = await env.collect()
    assert ("lease", "ns", "soon") in result.removed
    assert ("lease", "ns", "past") in result.removed
    assert not env.on_disk(a)
    assert not env.on_disk(b)
    assert env.on_disk(c)
    assert env.on_disk(d)
    with with_namespace("ns"):
        assert [le.id for le in await env.leases.list_all()] == ["future", "never"]


async def test_flat_lease_keeps_the_object_not_its_refs(env: Env) -> None:
    with with_namespace("ns"):
        child = await env.put(b"child")
        await env.leases.create("flat", {LABEL_GC_FLAT: "1"})
        with with_lease("flat"):
            parent = await env.put(b"parent", {REF: child})
    await env.collect()
    assert env.on_disk(parent)
    assert not env.on_disk(child)


async def test_flat_lease_does_not_flatten_other_holds(env: Env) -> None:
    """An object held by a flat lease and also reachable another way keeps its references."""
    with with_namespace("ns"):
        rooted_child = await env.put(b"rooted child")
        leased_child = await env.put(b"leased child")
        await env.leases.create("flat", {LABEL_GC_FLAT: "1"})
        await env.leases.create("deep")
        with with_lease("flat"):
            rooted = await env.put(b"rooted", {LABEL_GC_ROOT: "1", REF: rooted_child})
            leased = await env.put(b"leased", {REF: leased_child})
        await env.leases.add_resource("deep", Resource(type="content", id=leased))
    await env.collect()
    for digest in (rooted, rooted_child, leased, leased_child):
        assert env.on_disk(digest), digest


async def test_ingest_before_expiry_is_kept(env: Env) -> None:
    with with_namespace("ns"):
        writer = await env.content.writer("ingest-1", total=100)
        await writer.write(b"x" * 40)
        await writer.close()
    result = await env.collect()
    assert result.ingests_aborted == 0
    assert result.removed == []
    with with_namespace("ns"):
        status = await env.content.status("ingest-1")
        assert status.offset == 40
        assert len(await env.backend.list_statuses()) == 1


async def test_expired_ingest_is_aborted(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(content_module, "INGEST_EXPIRY", -1.0)
    with with_namespace("ns"):
        writer = await env.content.writer("ingest-1", total=100)
        await writer.write(b"x" * 40)
        await writer.close()
    backend_dirs = list((env.backend.root / "ingest").iterdir())
    assert len(backend_dirs) == 1
    result = await env.collect()
    assert ("ingest", "ns", "ingest-1") in result.removed
    assert result.ingests_aborted == 1
    assert not backend_dirs[0].exists()
    assert list((env.backend.root / "ingest").iterdir()) == []
    with with_namespace("ns"), pytest.raises(NotFound):
        await env.content.status("ingest-1")


async def test_ingest_held_by_a_deleted_lease_is_aborted(env: Env) -> None:
    with with_namespace("ns"):
        await env.leases.create("l1")
        with with_lease("l1"):
            writer = await env.content.writer("ingest-1", total=100)
            await writer.write(b"y" * 10)
            await writer.close()
    result = await env.collect()
    assert result.ingests_aborted == 0
    with with_namespace("ns"):
        assert (await env.content.status("ingest-1")).offset == 10
        await env.leases.delete("l1")
    result = await env.collect()
    assert ("ingest", "ns", "ingest-1") in result.removed
    assert result.ingests_aborted == 1
    assert list((env.backend.root / "ingest").iterdir()) == []


async def test_orphan_backend_blob_and_ingest_are_removed(env: Env) -> None:
    data = b"written straight to the backend"
    writer = await env.backend.writer("raw", total=len(data))
    await writer.write(data)
    await writer.commit(len(data), sha(data))
    stray = await env.backend.writer("stray-ingest", total=10)
    await stray.write(b"12345")
    await stray.close()
    result = await env.collect()
    assert result.blobs_removed == 1
    assert result.ingests_aborted == 1
    assert env.disk_digests() == set()
    assert await env.backend.list_statuses() == []


async def test_blob_shared_by_two_namespaces(env: Env) -> None:
    data = b"shared layer" * 1000
    with with_namespace("a"):
        digest = await env.put(data)
    with with_namespace("b"):
        writer = await env.content.writer("ref-b", total=len(data), expected=digest)  # shared: no bytes needed
        await writer.commit(len(data), digest)
    for namespace in ("a", "b"):
        with with_namespace(namespace):
            await env.content.update(Info(digest=digest, size=0, created_at=0, updated_at=0,
                                          labels={LABEL_GC_ROOT: "1"}))
    with with_namespace("a"):
        await env.content.delete(digest)
    result = await env.collect()
    assert result.blobs_removed == 0
    assert env.on_disk(digest)
    assert await env.has_record("b", digest)
    assert not await env.has_record("a", digest)
    with with_namespace("b"):
        reader = await env.content.reader_at(digest)
        assert await reader.read_at(0, len(data)) == data
        await reader.close()
        await env.content.delete(digest)
    result = await env.collect()
    assert result.blobs_removed == 1
    assert not env.on_disk(digest)


async def test_open_shared_ingest_keeps_the_bytes(env: Env) -> None:
    data = b"bytes another namespace is about to link"
    with with_namespace("a"):
        digest = await env.put(data)
    with with_namespace("b"):
        writer = await env.content.writer("ref-b", total=len(data), expected=digest)
    await env.collect()  # a's record goes; b's open ingest still names the blob
    assert not await env.has_record("a", digest)
    assert env.on_disk(digest)
    with with_namespace("b"):
        await writer.commit(len(data), digest)
    assert await env.has_record("b", digest)


async def test_failed_backend_removal_is_reported_and_the_rest_collected(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    with with_namespace("ns"):
        digests = [await env.put(f"blob {i}".encode()) for i in range(4)]
    stuck = digests[2]
    real_delete = env.backend.delete

    async def flaky_delete(digest: str) -> None:
        if digest == stuck:
            raise OSError(f"cannot remove {digest}: device busy")
        await real_delete(digest)

    monkeypatch.setattr(env.backend, "delete", flaky_delete)
    result = await env.collect()
    assert len(result.errors) == 1
    assert stuck in result.errors[0]
    assert "device busy" in result.errors[0]
    assert result.blobs_removed == 3
    assert env.disk_digests() == {stuck}
    for digest in digests:
        assert not await env.has_record("ns", digest)  # every record went
    monkeypatch.setattr(env.backend, "delete", real_delete)
    result = await env.collect()
    assert result.errors == []
    assert result.blobs_removed == 1
    assert env.disk_digests() == set()


async def test_concurrent_writes_during_collection_survive(env: Env) -> None:
    """Blobs committed while collections run are never freed under the writer."""
    kept: list[str] = []

    async def writer_task() -> None:
        with with_namespace("ns"):
            for i in range(15):
                kept.append(await env.put(f"kept {i}".encode() * 50, {LABEL_GC_ROOT: "1"}))
                await env.put(f"garbage {i}".encode())

    async def collector_task() -> None:
        for _ in range(15):
            await env.gc.collect()
            await trio.lowlevel.checkpoint()

    with trio.fail_after(WAIT * 3):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(writer_task)
            nursery.start_soon(collector_task)
    await env.collect()
    assert env.disk_digests() == set(kept)
    for digest in kept:
        assert await env.has_record("ns", digest)


# ---------------------------------------------------------------- property: random graphs


@dataclass(frozen=True)
class LeaseSpec:
    namespace: str
    expired: bool
    flat: bool
    holds: frozenset[int]


@dataclass(frozen=True)
class GraphSpec:
    blobs: int
    records: dict[str, frozenset[int]]  # namespace -> blobs recorded there
    roots: frozenset[tuple[str, int]]
    refs: dict[tuple[str, int], frozenset[int]]  # (namespace, blob) -> blobs its labels name
    leases: list[LeaseSpec]


@st.composite
def graphs(draw: st.DrawFn) -> GraphSpec:
    blobs = draw(st.integers(1, 6))
    indices = st.integers(0, blobs - 1)
    namespaces = ["ns1", "ns2"][: draw(st.integers(1, 2))]
    records = {ns: frozenset(draw(st.sets(indices))) for ns in namespaces}
    roots: set[tuple[str, int]] = set()
    refs: dict[tuple[str, int], frozenset[int]] = {}
    for ns, recorded in records.items():
        for blob in sorted(recorded):
            if draw(st.booleans()):
                roots.add((ns, blob))
            refs[(ns, blob)] = frozenset(draw(st.sets(indices, max_size=3)))
    leases = [LeaseSpec(namespace=draw(st.sampled_from(namespaces)), expired=draw(st.booleans()),
                        flat=draw(st.booleans()), holds=frozenset(draw(st.sets(indices, max_size=3))))
              for _ in range(draw(st.integers(0, 3)))]
    return GraphSpec(blobs, records, frozenset(roots), refs, leases)


def expected_reachable(spec: GraphSpec) -> set[tuple[str, int]]:
    """The GC rules, restated: roots and live leases' holdings, then gc.ref labels within a namespace.

    A flat lease marks what it holds without following that object's labels (another path may).
    """
    recorded = {(ns, b) for ns, blobs in spec.records.items() for b in blobs}
    marked: set[tuple[str, int]] = set()
    expanded: set[tuple[str, int]] = set()
    queue: list[tuple[tuple[str, int], bool]] = [(node, True) for node in spec.roots]
    for lease in spec.leases:
        if not lease.expired:
            queue.extend(((lease.namespace, b), not lease.flat) for b in lease.holds)
    while queue:
        node, follow = queue.pop(0)
        if node not in recorded:
            continue
        marked.add(node)
        if follow and node not in expanded:
            expanded.add(node)
            queue.extend(((node[0], child), True) for child in spec.refs.get(node, ()))
    return marked


async def build_and_collect(spec: GraphSpec, root: Path) -> None:
    env = await open_env(root)
    try:
        data = [f"property blob {i}".encode() * (i + 1) for i in range(spec.blobs)]
        digests = [sha(d) for d in data]
        for i, blob in enumerate(data):  # every blob is in the backend, recorded or not
            writer = await env.backend.writer(f"raw-{i}", total=len(blob))
            await writer.write(blob)
            await writer.commit(len(blob), digests[i])
        for ns, recorded in spec.records.items():
            with with_namespace(ns):
                for blob in sorted(recorded):
                    labels = {f"{REF}.{child}": digests[child] for child in spec.refs[(ns, blob)]}
                    if (ns, blob) in spec.roots:
                        labels[LABEL_GC_ROOT] = "1"
                    await env.put(data[blob], labels, ref=f"ref-{blob}")
        for n, lease in enumerate(spec.leases):
            labels = {}
            if lease.expired:
                labels[LABEL_GC_EXPIRE] = format_expiry(time.time() - 3600)
            if lease.flat:
                labels[LABEL_GC_FLAT] = "1"
            with with_namespace(lease.namespace):
                await env.leases.create(f"lease-{n}", labels)
                for blob in lease.holds:
                    await env.leases.add_resource(f"lease-{n}", Resource(type="content", id=digests[blob]))

        before = {(ns, b) for ns, blobs in spec.records.items() for b in blobs}
        reachable = expected_reachable(spec)
        result = await env.gc.collect()

        assert result.errors == []
        removed_content = {(n[1], digests.index(n[2])) for n in result.removed if n[0] == "content"}
        assert removed_content == before - reachable
        after = await env.db.read(lambda c: {(r[0], r[1]) for r in c.execute("SELECT namespace, digest FROM content")})
        assert after == {(ns, digests[b]) for ns, b in reachable}
        live_blobs = {digests[b] for _, b in reachable}
        assert env.disk_digests() == live_blobs
        assert result.blobs_removed == spec.blobs - len(live_blobs)
        for digest in live_blobs:
            assert hashlib.sha256(env.backend.blob_path(digest).read_bytes()).hexdigest() == digest[7:]
        removed_leases = {n[2] for n in result.removed if n[0] == "lease"}
        assert removed_leases == {f"lease-{n}" for n, lease in enumerate(spec.leases) if lease.expired}
    finally:
        await env.db.aclose()


@hypothesis.settings(max_examples=40, deadline=None,
                     suppress_health_check=[hypothesis.HealthCheck.too_slow])
@hypothesis.given(graphs())
@hypothesis.example(GraphSpec(  # a flat lease on a rooted blob must not stop its references
    blobs=2, records={"ns1": frozenset({0, 1})}, roots=frozenset({("ns1", 0)}),
    refs={("ns1", 0): frozenset({1}), ("ns1", 1): frozenset()},
    leases=[LeaseSpec(namespace="ns1", expired=False, flat=True, holds=frozenset({0}))]))
@hypothesis.example(GraphSpec(  # an expired lease holds nothing, a live flat one only its object
    blobs=3, records={"ns1": frozenset({0, 1, 2}), "ns2": frozenset({1})}, roots=frozenset(),
    refs={("ns1", 0): frozenset({1}), ("ns1", 1): frozenset({2}), ("ns1", 2): frozenset(), ("ns2", 1): frozenset()},
    leases=[LeaseSpec(namespace="ns1", expired=True, flat=False, holds=frozenset({0})),
            LeaseSpec(namespace="ns1", expired=False, flat=True, holds=frozenset({1}))]))
def test_gc_deletes_exactly_the_unreachable(spec: GraphSpec) -> None:
    with tempfile.TemporaryDirectory(prefix="berth-gc-") as tmp:
        trio.run(build_and_collect, spec, Path(tmp))


# ---------------------------------------------------------------- scheduler


class RecordingGC(GarbageCollector):
    """A collector that remembers when (trio time) each collection finished."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.times: list[float] = []
        self._changed = trio.Event()

    async def collect(self) -> GCResult:
        result = await super().collect()
        self.times.append(trio.current_time())
        self._changed.set()
        self._changed = trio.Event()
        return result

    async def wait_for(self, count: int) -> float:
        """Wait until ``count`` collections have finished; return when the last of them did."""
        while len(self.times) < count:
            await self._changed.wait()
        return self.times[count - 1]


async def open_metadata(root: Path) -> tuple[Metadata, RecordingGC]:
    """The pieces plugins/metadata/plugin.py's init builds, with a recording collector."""
    db = await MetadataDB.open(root / "meta.db")
    metadata: Metadata
    content = NamespacedContentStore(db, LocalStore(root / "content"), on_delete=lambda: metadata.notify_deletion())
    gc = RecordingGC(db, content)
    metadata = Metadata(db, content, NamespaceStore(db), gc, {})
    return metadata, gc


@pytest.fixture
async def sched_factory(tmp_path: Path) -> AsyncIterator[object]:
    """``await start(config)`` runs a scheduler on a fresh metadata database until the test ends;
    ``start(config, before)`` first runs ``await before(metadata)``."""
    opened: list[Metadata] = []
    async with trio.open_nursery() as nursery:

        async def start(config: Config, before: object = None) -> tuple[Metadata, RecordingGC, Scheduler]:
            metadata, gc = await open_metadata(tmp_path / f"m{len(opened)}")
            opened.append(metadata)
            if before is not None:
                await before(metadata)  # type: ignore[operator]
            scheduler = Scheduler(metadata, config)
            await nursery.start(scheduler.run)
            return metadata, gc, scheduler

        try:
            yield start
        finally:
            nursery.cancel_scope.cancel()
    for metadata in opened:
        await metadata.aclose()


async def put(content: NamespacedContentStore, data: bytes, labels: Mapping[str, str] | None = None) -> str:
    digest = sha(data)
    writer = await content.writer(f"put-{digest}", total=len(data))
    await writer.write(data)
    await writer.commit(len(data), digest, labels)
    return digest


ROOTED = (b"rooted blob a", b"rooted blob b")


async def put_rooted(metadata: Metadata) -> None:
    """Blobs written before the scheduler starts, so that no ingest (which has an expiry the
    scheduler wakes up for) is open while the virtual clock runs."""
    with with_namespace("ns"):
        for data in ROOTED:
            await put(metadata.content, data, {LABEL_GC_ROOT: "1"})


# These use trio's autojump clock: virtual time jumps whenever every task waits, so the delays
# below cost no real time. The clock also jumps while a worker thread runs (trio cannot see it),
# so these tests keep nothing with a deadline open while they write, wait for collections by
# event rather than by time, and are bounded by the test timeout rather than by trio.fail_after.


@pytest.mark.timeout(60)
async def test_scheduler_first_collection_after_startup_delay(sched_factory, autojump_clock) -> None:  # type: ignore[no-untyped-def]
    digest = sha(b"present at startup")

    async def before(metadata: Metadata) -> None:
        with with_namespace("ns"):
            await put(metadata.content, b"present at startup")

    metadata, gc, scheduler = await sched_factory(Config(startup_delay=Duration(30)), before)
    start = trio.current_time()
    finished = await gc.wait_for(1)
    assert finished >= start + 30
    assert scheduler.collections == 1
    assert not metadata.content.backend.blob_path(digest).exists()
    await trio.sleep(3600)  # idle: no further collections
    assert scheduler.collections == 1


@pytest.mark.timeout(60)
async def test_scheduler_deletion_waits_for_pause_budget(sched_factory, autojump_clock) -> None:  # type: ignore[no-untyped-def]
    # Any pause (>= 1 us) at pause_threshold 1e-9 forbids another collection for >= 1000 s.
    metadata, gc, _ = await sched_factory(Config(startup_delay=Duration(0), pause_threshold=1e-9), put_rooted)
    first = await gc.wait_for(1)
    digest = sha(ROOTED[0])
    with with_namespace("ns"):
        await metadata.content.delete(digest)
    finished = await gc.wait_for(2)
    assert finished >= first + 1000
    assert not metadata.content.backend.blob_path(digest).exists()


@pytest.mark.timeout(60)
async def test_scheduler_mutation_threshold(sched_factory, autojump_clock) -> None:  # type: ignore[no-untyped-def]
    metadata, gc, scheduler = await sched_factory(Config(startup_delay=Duration(0), mutation_threshold=5))
    await gc.wait_for(1)
    for i in range(4):
        await metadata.namespaces.create(f"ns{i}", {})
    await trio.sleep(3600)
    assert scheduler.collections == 1
    await metadata.namespaces.create("ns4", {})
    await gc.wait_for(2)
    assert scheduler.collections == 2
    # The counter restarts after a collection.
    for i in range(4):
        await metadata.namespaces.update(f"ns{i}", {"x": "1"})
    await trio.sleep(3600)
    assert scheduler.collections == 2


@pytest.mark.timeout(60)
async def test_scheduler_collect_now_returns_the_result(sched_factory, autojump_clock) -> None:  # type: ignore[no-untyped-def]
    async def before(metadata: Metadata) -> None:
        with with_namespace("ns"):
            await put(metadata.content, b"collect me now")

    metadata, _, scheduler = await sched_factory(Config(startup_delay=Duration(3600)), before)
    digest = sha(b"collect me now")
    result = await scheduler.collect_now()  # does not wait out the startup delay
    assert ("content", "ns", digest) in result.removed
    assert result.blobs_removed == 1
    assert scheduler.last is result
    assert not metadata.content.backend.blob_path(digest).exists()
    # A synchronous lease delete goes through it.
    leases = LeaseManager(metadata.db, collect=scheduler.collect_now)
    with with_namespace("ns"):
        await leases.create("l1")
        with with_lease("l1"):
            leased = await put(metadata.content, b"leased")
        await leases.delete("l1", sync=True)
    assert not metadata.content.backend.blob_path(leased).exists()
    assert scheduler.collections == 2


@pytest.mark.timeout(60)
async def test_scheduler_concurrent_collect_now_callers(sched_factory, autojump_clock) -> None:  # type: ignore[no-untyped-def]
    _, gc, scheduler = await sched_factory(Config(startup_delay=Duration(0)))
    await gc.wait_for(1)
    results: list[GCResult] = []

    async def call() -> None:
        results.append(await scheduler.collect_now())

    async with trio.open_nursery() as nursery:
        for _ in range(5):
            nursery.start_soon(call)
    assert len(results) == 5
    assert 2 <= scheduler.collections <= 6


@pytest.mark.timeout(60)
async def test_scheduler_deletion_schedules_after_delay(sched_factory, autojump_clock) -> None:  # type: ignore[no-untyped-def]
    metadata, gc, scheduler = await sched_factory(
        Config(startup_delay=Duration(0), schedule_delay=Duration(20)), put_rooted)
    await gc.wait_for(1)
    digest = sha(ROOTED[0])
    with with_namespace("ns"):
        await metadata.namespaces.update("ns", {"a": "b"})
    await trio.sleep(100)
    assert scheduler.collections == 1  # writes alone (under mutation_threshold) do not schedule one
    with with_namespace("ns"):
        deleted_at = trio.current_time()
        await metadata.content.delete(digest)
    finished = await gc.wait_for(2)
    assert finished >= deleted_at + 20
    assert not metadata.content.backend.blob_path(digest).exists()
    await trio.sleep(3600)
    assert scheduler.collections == 2


@pytest.mark.timeout(60)
async def test_scheduler_lease_deletion_schedules_a_collection(sched_factory, autojump_clock) -> None:  # type: ignore[no-untyped-def]
    metadata, gc, scheduler = await sched_factory(Config(startup_delay=Duration(0), schedule_delay=Duration(5)))
    await gc.wait_for(1)
    leases = LeaseManager(metadata.db, collect=scheduler.collect_now, on_delete=metadata.notify_deletion)
    with with_namespace("ns"):
        await leases.create("l1")
        with with_lease("l1"):
            digest = await put(metadata.content, b"held by l1")
        await trio.sleep(100)
        assert scheduler.collections == 1
        deleted_at = trio.current_time()
        await leases.delete("l1")  # not sync
    finished = await gc.wait_for(2)
    assert finished >= deleted_at + 5
    assert not metadata.content.backend.blob_path(digest).exists()


@pytest.mark.timeout(60)
async def test_a_lease_deleted_with_nothing_become_garbage_schedules_no_collection(
        sched_factory, autojump_clock) -> None:  # type: ignore[no-untyped-def]
    metadata, gc, scheduler = await sched_factory(Config(startup_delay=Duration(0), schedule_delay=Duration(5)))
    await gc.wait_for(1)
    leases = LeaseManager(metadata.db, collect=scheduler.collect_now, on_delete=metadata.notify_deletion)
    with with_namespace("ns"):
        await leases.create("handed-over")
        await leases.delete("handed-over", garbage=False)
    await trio.sleep(3600)
    assert scheduler.collections == 1


@pytest.mark.timeout(60)
async def test_scheduler_deletion_threshold_triggers_at_once(sched_factory, autojump_clock) -> None:  # type: ignore[no-untyped-def]
    # Same budget as test_scheduler_deletion_waits_for_pause_budget, where one deletion waits >= 1000 s.
    metadata, gc, _ = await sched_factory(
        Config(startup_delay=Duration(0), pause_threshold=1e-9, deletion_threshold=1), put_rooted)
    first = await gc.wait_for(1)
    digest = sha(ROOTED[0])
    with with_namespace("ns"):
        await metadata.content.delete(digest)
    finished = await gc.wait_for(2)
    assert finished < first + 1000  # the threshold ignores the budget
    assert not metadata.content.backend.blob_path(digest).exists()
    assert metadata.content.backend.blob_path(sha(ROOTED[1])).exists()


@pytest.mark.timeout(60)
async def test_scheduler_collect_now_during_startup_delay(sched_factory, autojump_clock) -> None:  # type: ignore[no-untyped-def]
    _, _, scheduler = await sched_factory(Config(startup_delay=Duration(3600)))
    started = trio.current_time()
    result = await scheduler.collect_now()
    assert result.removed == []
    assert trio.current_time() < started + 3600


async def test_scheduler_collects_an_expiring_lease_while_idle(sched_factory) -> None:  # type: ignore[no-untyped-def]
    """Real time: a lease made after the last collection, expiring in ~1 s, is collected with no
    further activity."""
    metadata, gc, scheduler = await sched_factory(Config(startup_delay=Duration(0)))
    with trio.fail_after(WAIT):
        await gc.wait_for(1)
    leases = LeaseManager(metadata.db, collect=scheduler.collect_now, on_delete=metadata.notify_deletion)
    with with_namespace("ns"):
        lease = await leases.create("short", expires_in=1.0)
        with with_lease("short"):
            digest = await put(metadata.content, b"held briefly")
    path = metadata.content.backend.blob_path(digest)
    assert path.exists()
    assert lease.expires_at is not None
    with trio.fail_after(WAIT):
        while path.exists():
            await gc.wait_for(len(gc.times) + 1)
    assert time.time() >= lease.expires_at
    with with_namespace("ns"):
        assert await leases.list_all() == []


@pytest.mark.timeout(60)
async def test_scheduler_reads_the_next_expiry_again_only_after_writes_to_what_expires(
        sched_factory, autojump_clock, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    reads: list[float | None] = []
    read = trio.Event()

    def counted(conn: object, now: float) -> float | None:  # runs in a worker thread
        reads.append(result := next_expiry(conn, now))  # type: ignore[arg-type]
        trio.from_thread.run_sync(read.set)
        return result

    next_expiry = scheduler_module._next_expiry
    monkeypatch.setattr(scheduler_module, "_next_expiry", counted)
    metadata, gc, scheduler = await sched_factory(Config(startup_delay=Duration(0)))
    await gc.wait_for(1)
    await read.wait()  # the read that follows the collection
    for i in range(5):  # writes to tables without expiries
        await metadata.namespaces.create(f"ns{i}", {})
        assert not scheduler._expiry_stale
    leases = LeaseManager(metadata.db)
    read = trio.Event()
    with with_namespace("ns0"):
        created = time.time()
        await leases.create("soon", expires_in=600)
    assert scheduler._expiry_stale
    await read.wait()
    assert len(reads) == 2
    assert reads[-1] is not None
    assert created + 599 < reads[-1] < time.time() + 601
    woken_at = trio.current_time()
    await gc.wait_for(2)  # the scheduler wakes up for the lease's expiry with nothing else to do
    assert trio.current_time() >= woken_at + 590
    assert scheduler.collections == 2
