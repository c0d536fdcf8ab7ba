"""Containers: the metadata store (create, get, list with filters, update with field paths, delete,
events, namespaces), the RPC service and CLI through a live berthd, and GC (a container holds its
snapshot; deleting it with snapshot_cleanup frees it)."""

from __future__ import annotations

import itertools
import json
import sqlite3
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from conftest import BerthdProcess

from berth.client.aio import open_client
from berth.core.errdefs import AlreadyExists, InvalidArgument, NotFound
from berth.core.metadata.containers import Container, ContainerStore, Runtime
from berth.core.metadata.db import MetadataDB
from berth.core.metadata.gc import mark, scan
from berth.core.namespaces import with_namespace

RUNC = "io.berth.runtime.v1.runc"
SPEC = {"ociVersion": "1.0.2-dev", "process": {"args": ["/bin/true"], "cwd": "/"}, "root": {"path": "rootfs"}}
Events = list[tuple[str, str, dict[str, Any]]]


@pytest.fixture
async def db(tmp_path: Path) -> AsyncIterator[MetadataDB]:
    database = await MetadataDB.open(tmp_path / "meta.db")
    try:
        yield database
    finally:
        await database.aclose()


@pytest.fixture
def events() -> Events:
    return []


@pytest.fixture
def store(db: MetadataDB, events: Events) -> ContainerStore:
    return ContainerStore(db, lambda ns, topic, event: events.append((ns, topic, event)))


def container(cid: str, **fields: Any) -> Container:
    fields.setdefault("runtime", Runtime(name=RUNC, options={"binary": "runc"}))
    fields.setdefault("spec", SPEC)
    return Container(id=cid, **fields)


async def test_create_get_and_delete(store: ContainerStore, events: Events) -> None:
    with with_namespace("ns1"):
        created = await store.create(container("web", labels={"a": "1"}, image="docker.io/library/busybox:latest",
                                               snapshotter="overlayfs", snapshot_key="web",
                                               extensions={"ext": {"x": [1, 2]}}))
        assert created.created_at == created.updated_at > 0
        got = await store.get("web")
        assert got == created
        assert got.to_wire() == {
            "id": "web", "labels": {"a": "1"}, "image": "docker.io/library/busybox:latest",
            "runtime": {"name": RUNC, "options": {"binary": "runc"}}, "spec": SPEC, "snapshotter": "overlayfs",
            "snapshot_key": "web", "extensions": {"ext": {"x": [1, 2]}}, "created_at": created.created_at,
            "updated_at": created.updated_at}
        with pytest.raises(AlreadyExists):
            await store.create(container("web"))
    with with_namespace("ns2"), pytest.raises(NotFound):
        await store.get("web")  # namespaces keep containers apart
    with with_namespace("ns1"):
        deleted = await store.delete("web")
        assert deleted.snapshot_key == "web"
        with pytest.raises(NotFound):
            await store.get("web")
        with pytest.raises(NotFound):
            await store.delete("web")
    assert [(ns, topic) for ns, topic, _ in events] == [("ns1", "/containers/create"), ("ns1", "/containers/delete")]
    assert events[0][2] == {"id": "web", "image": "docker.io/library/busybox:latest",
                            "runtime": {"name": RUNC, "options": {"binary": "runc"}}}
    assert events[1][2] == {"id": "web"}


@pytest.mark.parametrize(("bad", "message"), [
    (container("bad/id"), "container id"),
    (container("x", runtime=Runtime(name="")), "runtime"),
    (container("x", spec={}), "spec"),
    (container("x", snapshot_key="k"), "snapshotter"),
    (container("x", labels={"k": "v" * 5000}), "exceed"),
    (container("x", spec={"bad": float("nan")}), "JSON"),
    (container("x", extensions={"": 1}), "extension"),
])
async def test_create_validates(store: ContainerStore, bad: Container, message: str) -> None:
    with with_namespace("default"), pytest.raises(InvalidArgument, match=message):
        await store.create(bad)


async def test_list_filters(store: ContainerStore) -> None:
    with with_namespace("default"):
        await store.create(container("a1", image="img:1", labels={"tier": "web"}, snapshotter="native",
                                     snapshot_key="a1"))
        await store.create(container("a2", image="img:2", labels={"tier": "db"}))
        await store.create(container("b1", image="img:1", runtime=Runtime(name="io.berth.runtime.v1.builtin")))

        async def ids(*filters: str) -> list[str]:
            return [c.id for c in await store.list_all(filters)]

        assert await ids() == ["a1", "a2", "b1"]
        assert await ids("id==a2") == ["a2"]
        assert await ids("image==img:1") == ["a1", "b1"]
        assert await ids("runtime.name==io.berth.runtime.v1.builtin") == ["b1"]
        assert await ids("labels.tier==web", "labels.tier==db") == ["a1", "a2"]
        assert await ids("labels.tier") == ["a1", "a2"]
        assert await ids("snapshotter==native") == ["a1"]
        assert await ids('id~="^a",image==img:1') == ["a1"]
        with pytest.raises(InvalidArgument):
            await store.list_all(["id=="])
    with with_namespace("other"):
        assert await store.list_all() == []


async def test_update_field_paths(store: ContainerStore, events: Events) -> None:
    with with_namespace("default"):
        original = await store.create(container("u", labels={"a": "1", "b": "2"}, image="img:1",
                                                 snapshotter="native", snapshot_key="u",
                                                 extensions={"e1": 1, "e2": 2}))
        change = container("u", labels={"b": "3", "c": "4"}, image="img:2", spec={**SPEC, "hostname": "h"},
                           snapshotter="native", snapshot_key="u2", extensions={"e2": 5},
                           runtime=Runtime(name="io.berth.runtime.v1.builtin", options={"o": True}))
        one = await store.update(change, ["labels.b", "labels.a"])
        assert one.labels == {"b": "3"}  # a absent from the change: removed
        assert (one.image, one.spec, one.snapshot_key) == ("img:1", SPEC, "u")
        assert one.updated_at >= original.updated_at
        assert one.created_at == original.created_at
        two = await store.update(change, ["image", "spec", "snapshot_key", "extensions.e1", "runtime.options"])
        assert (two.image, two.spec["hostname"], two.snapshot_key) == ("img:2", "h", "u2")
        assert two.extensions == {"e2": 2}
        assert two.runtime == Runtime(name=RUNC, options={"o": True})
        three = await store.update(change, ["runtime", "labels"])
        assert three.runtime.name == "io.berth.runtime.v1.builtin"
        assert three.labels == {"b": "3", "c": "4"}
        assert await store.get("u") == three
        with pytest.raises(InvalidArgument, match="runtime name"):
            await store.update(container("u", snapshotter="native"))  # full replace with another runtime
        with pytest.raises(InvalidArgument, match="snapshotter"):
            await store.update(container("u", runtime=Runtime(name="io.berth.runtime.v1.builtin")))
        full = await store.update(container("u", runtime=Runtime(name="io.berth.runtime.v1.builtin"),
                                            snapshotter="native", labels={"z": "9"}, image="img:3"))
        assert (full.labels, full.image, full.snapshot_key, full.extensions) == ({"z": "9"}, "img:3", "", {})
        with pytest.raises(InvalidArgument, match="cannot update field 'snapshotter'"):
            await store.update(change, ["snapshotter"])
        with pytest.raises(InvalidArgument, match="spec is required"):
            await store.update(container("u", spec={}), ["spec"])
        with pytest.raises(NotFound):
            await store.update(container("missing"), ["labels"])
    updates = [event for _, topic, event in events if topic == "/containers/update"]
    assert len(updates) == 4
    assert updates[-1] == {"id": "u", "image": "img:3", "labels": {"z": "9"}, "snapshot_key": ""}


async def test_a_container_holds_its_snapshot_for_gc(store: ContainerStore, db: MetadataDB) -> None:
    def add_snapshot(conn: sqlite3.Connection) -> None:
        now = time.time()
        conn.execute("INSERT INTO snapshots(namespace, snapshotter, key, backend_key, parent, labels, created_at, "
                     "updated_at) VALUES ('default', 'native', 'root', 'default/1/root', '', '{}', ?, ?)", (now, now))

    with with_namespace("default"):
        await store.create(container("holder", snapshotter="native", snapshot_key="root"))
    await db.write(add_snapshot)
    graph = await db.read(scan)
    assert ("snapshot", "default", "native/root") in mark(graph)
    with with_namespace("default"):
        await store.delete("holder")
    graph = await db.read(scan)
    assert ("snapshot", "default", "native/root") not in mark(graph)


# ------------------------------------------------------------------------------------- through berthd


def _wire(cid: str, **fields: Any) -> dict[str, Any]:
    return {"id": cid, "runtime": {"name": RUNC}, "spec": SPEC, **fields}


def test_rpc_and_client(berthd: BerthdProcess) -> None:
    with berthd.client() as client:
        created = client.containers_create(_wire("c1", labels={"a": "1"}, image="img"))
        assert created["id"] == "c1"
        assert created["runtime"] == {"name": RUNC, "options": {}}
        assert client.containers_get("c1") == created
        client.containers_create(_wire("c2"), namespace="other")
        assert [c["id"] for c in client.containers_list()] == ["c1"]
        assert [c["id"] for c in client.containers_list(["labels.a==1"])] == ["c1"]
        assert client.containers_list(["labels.a==2"]) == []
        updated = client.containers_update({"id": "c1", "labels": {"b": "2"}}, ["labels.b"])
        assert updated["labels"] == {"a": "1", "b": "2"}
        with pytest.raises(AlreadyExists):
            client.containers_create(_wire("c1"))
        with pytest.raises(InvalidArgument, match=r"containers\.create"):
            client.call("containers.create", {"container": {"id": "c3", "spec": "not a map"}})
        with pytest.raises(InvalidArgument, match="runtime"):
            client.containers_create({"id": "c3", "spec": SPEC})
        client.containers_delete("c1")
        with pytest.raises(NotFound):
            client.containers_get("c1")
        with pytest.raises(NotFound):
            client.containers_delete("c1")
        assert [c["id"] for c in client.containers_list(namespace="other")] == ["c2"]


async def test_async_client(berthd: BerthdProcess) -> None:
    async with open_client(str(berthd.address)) as client:
        await client.containers_create(_wire("a1", labels={"k": "v"}))
        assert (await client.containers_get("a1"))["labels"] == {"k": "v"}
        assert [c["id"] for c in await client.containers_list(["id==a1"])] == ["a1"]
        assert (await client.containers_update({"id": "a1", "image": "i"}, ["image"]))["image"] == "i"
        await client.containers_delete("a1")
        assert await client.containers_list() == []


def test_events_are_published(berthd: BerthdProcess) -> None:
    ready = threading.Event()

    def probe() -> None:  # until the subscription is seen to be live
        with berthd.client() as prober:
            while not ready.wait(0.05):
                prober.publish("/probe/ready")

    with berthd.client() as watcher, berthd.client() as client:
        events = watcher.subscribe(['topic~="^/(containers|probe)/"'])
        thread = threading.Thread(target=probe)
        thread.start()
        try:
            assert next(events)["topic"] == "/probe/ready"
        finally:
            ready.set()
            thread.join()
        client.containers_create(_wire("e1"))
        client.containers_update({"id": "e1", "labels": {"x": "y"}}, ["labels"])
        client.containers_delete("e1")
        topics = [e["topic"] for e in itertools.islice((e for e in events if e["topic"] != "/probe/ready"), 3)]
        assert topics == ["/containers/create", "/containers/update", "/containers/delete"]
        events.close()


def _native_dirs(daemon: BerthdProcess) -> set[str]:
    directory = daemon.root / "io.berth.snapshotter.v1.native" / "snapshots"
    return {p.name for p in directory.iterdir()} if directory.exists() else set()


def test_a_container_holds_its_snapshot_and_snapshot_cleanup_frees_it(berthd: BerthdProcess) -> None:
    with berthd.client() as client:
        # No gc.root label: only the containers hold these snapshots.
        for key in ("kept", "freed"):
            client.call("snapshots.prepare", {"key": key, "snapshotter": "native"})
            client.containers_create(_wire(key, snapshotter="native", snapshot_key=key))
        client.lease_create("trigger")
        client.lease_delete("trigger", sync=True)  # a synchronous collection
        for key in ("kept", "freed"):
            assert client.call("snapshots.stat", {"key": key, "snapshotter": "native"})["info"]["kind"] == "active"
        assert len(_native_dirs(berthd)) == 2
        client.containers_delete("kept")  # the snapshot stays until a collection finds it unreferenced
        client.containers_delete("freed", snapshot_cleanup=True)
        with pytest.raises(NotFound):
            client.call("snapshots.stat", {"key": "freed", "snapshotter": "native"})
        client.lease_create("trigger2")
        client.lease_delete("trigger2", sync=True)
        with pytest.raises(NotFound):  # unreferenced now: collected
            client.call("snapshots.stat", {"key": "kept", "snapshotter": "native"})
        assert _native_dirs(berthd) == set()


def test_cli(berthd: BerthdProcess) -> None:
    with berthd.client() as client:
        client.containers_create(_wire("cli1", image="docker.io/library/busybox:latest", labels={"a": "1"}))
        client.containers_create(_wire("cli2"))

    def cli(*args: str) -> str:
        result = berthd.cli("containers", *args)
        assert result.returncode == 0, result.stderr
        return result.stdout

    lines = cli("ls").splitlines()
    assert lines[0].split() == ["CONTAINER", "IMAGE", "RUNTIME"]
    assert lines[1].split() == ["cli1", "docker.io/library/busybox:latest", RUNC]
    assert lines[2].split() == ["cli2", "-", RUNC]
    assert cli("ls", "-q").splitlines() == ["cli1", "cli2"]
    assert cli("ls", "-q", "labels.a==1").splitlines() == ["cli1"]
    info = json.loads(cli("info", "cli1"))
    assert (info["id"], info["spec"]) == ("cli1", SPEC)
    assert cli("label", "cli1", "b=2", "a=") == "b=2\n"
    assert cli("rm", "cli1", "cli2") == "cli1\ncli2\n"
    missing = berthd.cli("containers", "rm", "nope")
    assert missing.returncode == 1
    assert "not_found" in missing.stderr
    assert cli("ls", "-q") == ""


def test_cli_rm_removes_the_snapshot_unless_told_not_to(berthd: BerthdProcess) -> None:
    with berthd.client() as client:
        for key in ("s1", "s2"):
            client.call("snapshots.prepare", {"key": key, "snapshotter": "native", "labels": {"berth.io/gc.root": "1"}})
            client.containers_create(_wire(key, snapshotter="native", snapshot_key=key))
        for args in (("s1",), ("--no-snapshot-cleanup", "s2")):
            result = berthd.cli("containers", "rm", *args)
            assert result.returncode == 0, result.stderr
        with pytest.raises(NotFound):
            client.call("snapshots.stat", {"key": "s1", "snapshotter": "native"})
        assert client.call("snapshots.stat", {"key": "s2", "snapshotter": "native"})["info"]["name"] == "s2"
