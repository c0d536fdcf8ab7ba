"""containerd's content testsuite (:mod:`berth.conformance.content`) on the three ways berth serves content.

* the local store with in-memory labels (not namespaced: the cross-namespace cases are skipped, as
  containerd skips them for its ``fs`` store);
* the metadata store over a local store and a fresh database (all 16 cases; the shared policy for
  the plain and ``CrossNamespace{Append,Share}`` cases, isolated for the other two);
* the same store seen through a real ``berthd`` over RPC (:class:`RemoteContentStore`): one daemon per
  sharing policy for the module. As containerd's client suite does, every case works under a lease
  (``conformance``) so the daemon's garbage collector leaves its blobs alone, and each case cleans
  up its namespaces afterwards.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from berth.client.aio import AsyncClient, open_client
from berth.client.content import RemoteContentStore
from berth.conformance.content import (
    NAMESPACE,
    NamespacedStore,
    OpenNamespacedStore,
    OpenStore,
    SharingPolicy,
    check_content_store,
    create_content,
)
from berth.conformance.pytest_plugin import content_store_tests
from berth.core.content import Store
from berth.core.errdefs import AlreadyExists, BerthError, NotFound, Unavailable
from berth.core.metadata.content import NamespacedContentStore
from berth.core.metadata.db import MetadataDB
from berth.core.metadata.namespaces import NamespaceStore
from berth.core.namespaces import with_namespace
from berth.plugins.content.local.store import LocalStore, MemoryLabelStore

READY_TIMEOUT = 20.0
STOP_TIMEOUT = 10.0
LEASE = "conformance"
#: The namespaces the cases use.
CASE_NAMESPACES = (NAMESPACE, "ns1", "ns2")


# ------------------------------------------------------------------------------ (a) local store


@asynccontextmanager
async def open_local_store(root: Path) -> AsyncIterator[LocalStore]:
    yield LocalStore(root, labels=MemoryLabelStore())


test_local_store = content_store_tests(open_local_store)


# --------------------------------------------------------------------------- (b) metadata store


@asynccontextmanager
async def open_metadata_store(root: Path, policy: SharingPolicy) -> AsyncIterator[NamespacedStore]:
    db = await MetadataDB.open(root / "meta.db", no_sync=True)
    try:
        namespaces = NamespaceStore(db)

        async def label_namespace(name: str, labels: Mapping[str, str]) -> None:
            try:
                await namespaces.create(name, labels)
            except AlreadyExists:
                await namespaces.update(name, labels, [f"labels.{key}" for key in labels])

        store = NamespacedContentStore(db, LocalStore(root / "content"), policy=policy)
        yield NamespacedStore(store=store, label_namespace=label_namespace)
    finally:
        await db.aclose()


@asynccontextmanager
async def open_metadata_store_shared(root: Path) -> AsyncIterator[Store]:
    async with open_metadata_store(root, "shared") as namespaced:
        yield namespaced.store


test_metadata_store = content_store_tests(open_metadata_store_shared, open_namespaced_store=open_metadata_store)


# ------------------------------------------------------------------------------ (c) over RPC


class Berthd:
    """A berthd subprocess with its own root, state, config and short socket path."""

    def __init__(self, base: Path, policy: SharingPolicy) -> None:
        self.base = base
        self.socket_dir = Path(tempfile.mkdtemp(prefix="b"))
        self.address = str(self.socket_dir / "s.sock")
        config = base / "config.toml"
        config.write_text(f'version = 1\n\n[plugins."io.berth.metadata.v1.sqlite"]\n'
                          f'content_sharing_policy = "{policy}"\nno_sync = true\n')
        self.log = base / "berthd.log"
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "berth.plugins.berthd", "--config", str(config), "--root", str(base / "root"),
                 "--state", str(base / "state"), "--address", self.address],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, cwd=base,
                env={k: v for k, v in os.environ.items() if k not in ("BERTH_ADDRESS", "BERTH_NAMESPACE")})

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def wait_ready(self) -> None:
        async def probe() -> bool:
            with contextlib.suppress(BerthError):
                async with open_client(self.address) as client:
                    await client.version()
                    return True
            return False

        deadline = time.monotonic() + READY_TIMEOUT
        while not (Path(self.address).is_socket() and trio.run(probe)):
            if self.proc.poll() is not None:
                pytest.fail(f"berthd exited with {self.proc.returncode} before it was ready:\n{self.log_text()}")
            if time.monotonic() > deadline:
                pytest.fail(f"berthd was not ready within {READY_TIMEOUT} s:\n{self.log_text()}")
            time.sleep(0.02)

    def stop(self) -> None:
        """SIGTERM by PID, wait, then SIGKILL."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=STOP_TIMEOUT)
        shutil.rmtree(self.socket_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def berthds(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[SharingPolicy, Berthd]]:
    """One daemon per sharing policy, started together, stopped by PID at the end of the module."""
    daemons: dict[SharingPolicy, Berthd] = {}
    try:
        for policy in ("shared", "isolated"):
            daemons[policy] = Berthd(tmp_path_factory.mktemp(f"berthd-{policy}"), policy)
        for daemon in daemons.values():
            daemon.wait_ready()
        yield daemons
    finally:
        for daemon in daemons.values():
            daemon.stop()


async def _label_namespace(client: AsyncClient, name: str, labels: Mapping[str, str]) -> None:
    try:
        await client.call("namespaces.create", {"name": name, "labels": dict(labels)})
    except AlreadyExists:
        await client.call("namespaces.update", {"name": name, "labels": dict(labels),
                                                "update_mask": [f"labels.{key}" for key in labels]})


async def _clean(client: AsyncClient) -> None:
    """Remove what a case left in its namespaces: content, ingests, lease, the namespace itself.

    NotFound is fine throughout: the daemon's garbage collector may get there first.
    """
    for namespace in CASE_NAMESPACES:
        for info in (await client.call("content.list", namespace=namespace))["infos"]:
            with contextlib.suppress(NotFound):
                await client.call("content.delete", {"digest": info["digest"]}, namespace=namespace)
        for status in (await client.call("content.list_statuses", namespace=namespace))["statuses"]:
            with contextlib.suppress(NotFound):
                await client.call("content.abort", {"ref": status["ref"]}, namespace=namespace)
        with contextlib.suppress(NotFound):
            await client.call("leases.delete", {"id": LEASE}, namespace=namespace)
        with contextlib.suppress(NotFound):
            await client.call("namespaces.delete", {"name": namespace})


@asynccontextmanager
async def _remote(daemon: Berthd) -> AsyncIterator[tuple[AsyncClient, RemoteContentStore]]:
    """A connection and a store on it, under the lease ``conformance`` in every case namespace."""
    async with open_client(daemon.address) as client:
        for namespace in CASE_NAMESPACES:
            await client.call("leases.create", {"id": LEASE}, namespace=namespace)
        try:
            yield client, RemoteContentStore(client, lease=LEASE)
        except BaseException:
            with trio.CancelScope(shield=True), contextlib.suppress(Exception):
                await _clean(client)  # the case's failure matters, not the cleanup's
            raise
        await _clean(client)


@pytest.fixture(scope="module")
def remote_open_store(berthds: dict[SharingPolicy, Berthd]) -> OpenStore:
    @asynccontextmanager
    async def open_store(root: Path) -> AsyncIterator[RemoteContentStore]:
        async with _remote(berthds["shared"]) as (_, store):
            yield store

    return open_store


@pytest.fixture(scope="module")
def remote_open_namespaced_store(berthds: dict[SharingPolicy, Berthd]) -> OpenNamespacedStore:
    @asynccontextmanager
    async def open_namespaced_store(root: Path, policy: SharingPolicy) -> AsyncIterator[NamespacedStore]:
        async with _remote(berthds[policy]) as (client, store):
            async def label_namespace(name: str, labels: Mapping[str, str]) -> None:
                await _label_namespace(client, name, labels)

            yield NamespacedStore(store=store, label_namespace=label_namespace)

    return open_namespaced_store


test_remote_store = content_store_tests("remote_open_store", open_namespaced_store="remote_open_namespaced_store")


# ------------------------------------------------------- what the suite cannot see over one connection


async def test_a_ref_is_locked_across_connections(berthds: dict[SharingPolicy, Berthd]) -> None:
    """The suite's Unavailable checks run on one connection (the client refuses a second writer);
    here the daemon itself refuses a writer on a ref another connection holds, then resumes it."""
    data, digest = create_content(300)
    daemon = berthds["shared"]
    async with _remote(daemon) as (_, first), open_client(daemon.address) as other:
        second = RemoteContentStore(other, lease=LEASE)
        with with_namespace(NAMESPACE):
            writer = await first.writer("locked-ref", total=len(data), expected=digest)
            try:
                await writer.write(data[:100])
                with pytest.raises(Unavailable):
                    await second.writer("locked-ref")
            finally:
                await writer.close()
            resumed = await second.writer("locked-ref", total=len(data), expected=digest)
            try:
                assert resumed.status().offset == 100
                await resumed.write(data[100:])
                await resumed.commit(len(data), digest)
            finally:
                await resumed.close()
            assert (await first.info(digest)).size == len(data)


async def test_one_connection_writes_the_same_ref_in_two_namespaces(berthds: dict[SharingPolicy, Berthd]) -> None:
    """The daemon keeps a connection's ingests per namespace and ref, so these are two ingests."""
    one, d1 = create_content(200)
    two, d2 = create_content(300)
    async with _remote(berthds["isolated"]) as (_, store):
        with with_namespace("ns1"):
            w1 = await store.writer("same-ref", total=len(one))
        with with_namespace("ns2"):
            w2 = await store.writer("same-ref", total=len(two))
        try:
            await w1.write(one)
            await w2.write(two)
            assert (w1.status().offset, w2.status().offset) == (len(one), len(two))
            await w1.commit(len(one), d1)
            await w2.commit(len(two), d2)
        finally:
            await w1.close()
            await w2.close()
        with with_namespace("ns1"):
            assert [info.digest async for info in store.walk()] == [d1]
        with with_namespace("ns2"):
            assert [info.digest async for info in store.walk()] == [d2]


# ------------------------------------------------------------------------------ the runner itself


async def test_check_content_store_reports_each_case(tmp_path: Path) -> None:
    outcomes = await check_content_store(open_local_store, tmp_path, ["SmallBlob", "CrossNamespaceShare"])
    assert outcomes["SmallBlob"] == "passed"
    assert outcomes["CrossNamespaceShare"].startswith("skipped: multiple namespaces not supported")


class _UnlockedStore(LocalStore):
    """A store that forgets to lock refs."""

    def _lock(self, ref: str) -> None:
        pass


async def test_check_content_store_raises_the_failures_by_case(tmp_path: Path) -> None:
    @asynccontextmanager
    async def open_unlocked(root: Path) -> AsyncIterator[LocalStore]:
        yield _UnlockedStore(root, labels=MemoryLabelStore())

    with pytest.raises(ExceptionGroup) as caught:
        await check_content_store(open_unlocked, tmp_path, ["SmallBlob", "CommitErrorState"])
    assert "1 case(s) failed: CommitErrorState" in str(caught.value)
    [failure] = caught.value.exceptions
    assert isinstance(failure, AssertionError)
    assert "expected it to be in use" in str(failure)
    assert "content conformance case CommitErrorState" in getattr(failure, "__notes__", [])
