"""The store under a killed daemon: an ingest interrupted by SIGKILL resumes after a restart, and
repeated kills during writes never corrupt the database or expose a half-written blob."""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import signal
import sqlite3
import threading
import time
from pathlib import Path

from conftest import BerthdFactory, BerthdProcess

from berth.client.sync import Client
from berth.core.errdefs import BerthError

META = "io.berth.metadata.v1.sqlite/meta.db"
BLOBS = "io.berth.content.v1.local/blobs/sha256"
CHUNK = 1 << 20


def write(client: Client, ref: str, action: str, **fields: object) -> dict[str, object]:
    result: dict[str, object] = client.call("content.write", {"action": action, "ref": ref, **fields})
    return result


def check_store(daemon: BerthdProcess) -> None:
    """The database passes sqlite's integrity check and every visible blob hashes to its name."""
    conn = sqlite3.connect(daemon.root / META)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    finally:
        conn.close()
    blobs = daemon.root / BLOBS
    for blob in blobs.iterdir() if blobs.exists() else ():
        try:
            data = blob.read_bytes()
        except FileNotFoundError:  # the restarted daemon's collector removed an unreferenced blob meanwhile
            continue
        assert hashlib.sha256(data).hexdigest() == blob.name, f"half-written blob {blob.name}"


def test_ingest_killed_mid_way_resumes_after_restart(berthd_factory: BerthdFactory) -> None:
    data = os.urandom(6 * CHUNK + 12345)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    daemon = berthd_factory.start(name="resume")
    with daemon.client() as client:
        client.call("leases.create", {"id": "pull"})
        write(client, "layer-1", "stat", total=len(data))
        for offset in range(0, 3 * CHUNK, CHUNK):
            write(client, "layer-1", "write", offset=offset, data=data[offset:offset + CHUNK])
    daemon.stop(signal.SIGKILL)

    daemon = berthd_factory.start(name="resume")  # the same root
    check_store(daemon)
    with daemon.client() as client:
        status = write(client, "layer-1", "stat", total=len(data))
        assert status["offset"] == 3 * CHUNK  # what reached the disk before the kill is kept
        for offset in range(3 * CHUNK, len(data), CHUNK):
            write(client, "layer-1", "write", offset=offset, data=data[offset:offset + CHUNK])
        committed = write(client, "layer-1", "commit", total=len(data), expected=digest,
                          labels={"berth.io/gc.root": "1"})
        assert committed["digest"] == digest
        read = b"".join(chunk["data"] for chunk in client.stream("content.read", {"digest": digest}))
    assert read == data
    check_store(daemon)


def test_repeated_kills_during_writes_leave_a_consistent_store(berthd_factory: BerthdFactory) -> None:
    rng = random.Random(11)
    daemon = berthd_factory.start(name="kills")
    committed = 0
    for round_ in range(8):
        stop = threading.Event()
        done: list[int] = []

        def hammer(address: Path = daemon.address, n: int = round_, stop: threading.Event = stop,
                   done: list[int] = done) -> None:
            with contextlib.suppress(BerthError), Client(str(address), timeout=10) as client:
                i = 0
                while not stop.is_set():
                    client.call("namespaces.create", {"name": f"ns-{n}-{i}"})
                    client.call("leases.create", {"id": f"l-{n}-{i}", "expires_in": 3600.0})
                    blob = os.urandom(rng.randrange(1, 3 * CHUNK))
                    digest = "sha256:" + hashlib.sha256(blob).hexdigest()
                    ref = f"r-{n}-{i}"
                    write(client, ref, "stat", total=len(blob))
                    for offset in range(0, len(blob), CHUNK):
                        write(client, ref, "write", offset=offset, data=blob[offset:offset + CHUNK])
                    write(client, ref, "commit", total=len(blob), expected=digest, labels={"berth.io/gc.root": "1"})
                    done.append(i)
                    i += 1

        worker = threading.Thread(target=hammer)
        worker.start()
        time.sleep(rng.uniform(0.3, 0.9))
        daemon.stop(signal.SIGKILL)
        stop.set()
        worker.join(timeout=20)
        committed += len(done)
        daemon = berthd_factory.start(name="kills")
        check_store(daemon)
        with daemon.client() as client:  # every blob the database lists is readable and whole
            for info in client.call("content.list", {})["infos"]:
                data = b"".join(c["data"] for c in client.stream("content.read", {"digest": info["digest"]}))
                assert "sha256:" + hashlib.sha256(data).hexdigest() == info["digest"]
    assert committed, "no write completed before the kills: the test exercised nothing"
