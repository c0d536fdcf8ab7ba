"""berthd killed with SIGKILL at awkward moments, then restarted on the same root.

Complements tests/test_store_faults.py (kill between chunks, kills while hammering) and
tests/test_daemon.py (stale socket): here the kill lands while a chunk is in flight, again and again
on one ingest; deletions made before a kill are freed by the collection after the restart; and a
client connected across a kill sees Unavailable, then works against the next daemon.
"""

from __future__ import annotations

import contextlib
import hashlib
import random
import signal
import sqlite3
import threading
import time
from pathlib import Path

import pytest
from conftest import BerthdFactory, BerthdProcess

from berth.client.sync import Client
from berth.core.errdefs import BerthError, NotFound, Unavailable

META = "io.berth.metadata.v1.sqlite/meta.db"
CONTENT = "io.berth.content.v1.local"
BLOBS = f"{CONTENT}/blobs/sha256"
CHUNK = 64 * 1024
WAIT = 15.0


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def write(client: Client, ref: str, action: str, **fields: object) -> dict[str, object]:
    result: dict[str, object] = client.call("content.write", {"action": action, "ref": ref, **fields})
    return result


def put(client: Client, ref: str, data: bytes, labels: dict[str, str] | None = None,
        lease: str | None = None) -> str:
    digest = sha(data)
    for action, fields in (("stat", {"total": len(data)}), ("write", {"offset": 0, "data": data}),
                           ("commit", {"total": len(data), "expected": digest, "labels": labels or {}})):
        client.call("content.write", {"action": action, "ref": ref, **fields}, lease=lease)
    return digest


def check_store(root: Path) -> None:
    """sqlite's integrity check passes, every blob hashes to its name, and every record has its blob."""
    conn = sqlite3.connect(root / META)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        recorded = {row[0] for row in conn.execute("SELECT digest FROM content")}
    finally:
        conn.close()
    blobs = root / BLOBS
    on_disk = set()
    for blob in blobs.iterdir() if blobs.exists() else ():
        assert hashlib.sha256(blob.read_bytes()).hexdigest() == blob.name, f"half-written blob {blob.name}"
        on_disk.add(f"sha256:{blob.name}")
    assert recorded <= on_disk, f"records without bytes: {recorded - on_disk}"


def ingest_bytes(root: Path, ref: str) -> bytes:
    """The data file of the backend ingest whose ref ends with ``/<ref>`` (the namespaced store's)."""
    matches = [d for d in (root / CONTENT / "ingest").iterdir()
               if (d / "ref").exists() and (d / "ref").read_text().endswith(f"/{ref}")]
    assert len(matches) == 1, matches
    return (matches[0] / "data").read_bytes()


def wait_until_gone(paths: list[Path], timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while any(p.exists() for p in paths):
        assert time.monotonic() < deadline, f"still present after {timeout} s: {[p for p in paths if p.exists()]}"
        time.sleep(0.02)


def test_one_ingest_survives_kills_with_chunks_in_flight(berthd_factory: BerthdFactory) -> None:
    """Kill while the next chunk is on its way, three times; each restart reports exactly what is on
    disk (a prefix of the blob, at least what was acknowledged), and resuming from there commits the
    right digest."""
    rng = random.Random(7)
    data = rng.randbytes(6 * 1024 * 1024 + 4321)
    digest = sha(data)
    ref = "layer-under-fire"
    daemon = berthd_factory.start(name="inflight")
    for _ in range(3):
        acked = [0]
        target = rng.randrange(CHUNK, len(data) - 8 * CHUNK)

        def writer(daemon: BerthdProcess = daemon, acked: list[int] = acked) -> None:
            with contextlib.suppress(BerthError), daemon.client() as client:
                offset = int(write(client, ref, "stat", total=len(data))["offset"])
                acked[0] = offset
                while offset < len(data):
                    reply = write(client, ref, "write", offset=offset, data=data[offset:offset + CHUNK])
                    offset = int(reply["offset"])  # type: ignore[call-overload]
                    acked[0] = offset

        thread = threading.Thread(target=writer)
        thread.start()
        try:
            deadline = time.monotonic() + WAIT
            while acked[0] < target and thread.is_alive():
                assert time.monotonic() < deadline, "the writer made no progress"
                time.sleep(0.001)
        finally:
            daemon.stop(signal.SIGKILL)  # the next chunk is (most likely) in flight
            thread.join(WAIT)
        assert not thread.is_alive()
        before_kill = acked[0]
        assert before_kill < len(data)

        daemon = berthd_factory.start(name="inflight")  # the same root
        check_store(daemon.root)
        with daemon.client() as client:
            status = write(client, ref, "stat", total=len(data))
            offset = int(status["offset"])  # type: ignore[call-overload]
            assert status["total"] == len(data)
            assert before_kill <= offset <= before_kill + CHUNK
            assert ingest_bytes(daemon.root, ref) == data[:offset]
            assert status["digest"] == sha(data[:offset])
            # The lock of the killed daemon's writer is gone with it: this connection holds the ref now.
            write(client, ref, "close")

    with daemon.client() as client:
        offset = int(write(client, ref, "stat", total=len(data))["offset"])  # type: ignore[call-overload]
        while offset < len(data):
            offset = int(write(client, ref, "write", offset=offset,  # type: ignore[call-overload]
                               data=data[offset:offset + 4 * CHUNK])["offset"])
        committed = write(client, ref, "commit", total=len(data), expected=digest)
        assert committed["digest"] == digest
        read = b"".join(chunk["data"] for chunk in client.stream("content.read", {"digest": digest}))
        assert read == data
        with pytest.raises(NotFound):
            client.call("content.status", {"ref": ref})
    check_store(daemon.root)


def test_deletions_before_a_kill_are_freed_after_the_restart(berthd_factory: BerthdFactory) -> None:
    """The scheduler's count of deletions dies with the daemon; the collection after the restart
    still frees what was deleted (records and leases) before the kill, and only that."""
    slow = {"plugins": {"io.berth.gc.v1.scheduler": {"startup_delay": "0s", "schedule_delay": "1h"}}}
    daemon = berthd_factory.start(slow, name="dirty")
    daemon.wait_log("gc_collected")  # the startup collection is over; the next waits an hour
    root = daemon.root
    with daemon.client() as client:
        kept = put(client, "kept", b"kept: labelled root", {"berth.io/gc.root": "1"})
        dropped = put(client, "dropped", b"dropped: record deleted", {"berth.io/gc.root": "1"})
        client.call("leases.create", {"id": "pull"})
        leased = put(client, "leased", b"leased: lease deleted", lease="pull")
        client.call("leases.create", {"id": "stays"})
        held = put(client, "held", b"held by a lease that stays", lease="stays")
        client.call("content.delete", {"digest": dropped})
        client.call("leases.delete", {"id": "pull"})  # not sync
        assert [i["digest"] for i in client.call("content.list", {})["infos"]] == sorted([kept, leased, held])
    blob = {d: root / BLOBS / d.removeprefix("sha256:") for d in (kept, dropped, leased, held)}
    assert blob[dropped].exists()  # deleting frees no bytes; the collection is an hour away
    assert blob[leased].exists()
    daemon.stop(signal.SIGKILL)

    daemon = berthd_factory.start(name="dirty")  # default scheduler: startup collection after 100 ms
    wait_until_gone([blob[dropped], blob[leased]])
    assert blob[kept].exists()
    assert blob[held].exists()
    check_store(root)
    with daemon.client() as client:
        assert sorted(i["digest"] for i in client.call("content.list", {})["infos"]) == sorted([kept, held])
        assert [le["id"] for le in client.call("leases.list", {})["leases"]] == ["stays"]


def test_client_across_a_kill_and_the_stale_socket(berthd_factory: BerthdFactory) -> None:
    first = berthd_factory.start(name="socket")
    address = first.address
    client = Client(str(address), timeout=5.0)
    try:
        assert client.server()["pid"] == first.pid
        first.stop(signal.SIGKILL)
        assert address.is_socket()  # the killed daemon left it behind
        with pytest.raises(Unavailable):  # the open connection is gone: an error, not a hang
            client.version()
        with pytest.raises(Unavailable, match=str(address)):  # and nobody answers on the stale socket
            client.version()

        second = berthd_factory.start({"rpc": {"address": str(address)}}, name="socket")
        assert address.is_socket()
        assert client.server()["pid"] == second.pid  # the same client object reconnects
        assert second.pid != first.pid
        client.namespace_create("after-restart")
        assert "after-restart" in [n["name"] for n in client.namespace_list()]
    finally:
        client.close()
    check_store(second.root)
