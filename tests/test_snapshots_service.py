"""Snapshots through a live berthd: the RPC service and the CLI, namespaces, GC of backend snapshots,
and a daemon killed in the middle of prepare/commit/remove."""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import sqlite3
import threading
import time
from pathlib import Path

import pytest
from conftest import BerthdFactory, BerthdProcess

from berth.client.sync import Client
from berth.core.errdefs import AlreadyExists, BerthError, FailedPrecondition, NotFound
from berth.core.snapshots.mount import mount_all, unmount_all
from berth.core.snapshots.snapshotter import Mount

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="snapshots mount filesystems: run as root")

OVERLAY = "io.berth.snapshotter.v1.overlayfs"
LABELS = {"berth.io/gc.root": "1"}
ROOT = "berth.io/gc.root=1"


def overlay_dirs(daemon: BerthdProcess) -> set[str]:
    return {p.name for p in (daemon.root / OVERLAY / "snapshots").iterdir() if p.name.isdigit()}


def metastore_ids(daemon: BerthdProcess) -> set[str]:
    conn = sqlite3.connect(daemon.root / OVERLAY / "metadata.db")
    try:
        return {str(row[0]) for row in conn.execute("SELECT id FROM snapshots")}
    finally:
        conn.close()


def test_cli_prepare_commit_tree_and_remove(berthd: BerthdProcess) -> None:
    def cli(*args: str) -> str:
        result = berthd.cli("snapshots", *args)
        assert result.returncode == 0, result.stderr
        return result.stdout

    # Unreferenced snapshots are garbage (as in containerd): label them as GC roots.
    cli("prepare", "--label", ROOT, "base-active")
    cli("commit", "--label", ROOT, "base", "base-active")
    out = cli("prepare", "--label", ROOT, "--mounts", "--target", "/mnt", "child", "base")
    assert out.startswith("mount -t overlay overlay /mnt -o ")
    assert "lowerdir=" in out
    assert "index=off" in out
    rows = {line.split()[0]: line.split() for line in cli("ls").splitlines()[1:]}
    assert rows["base"][1:] == ["committed"]
    assert rows["child"][1:] == ["base", "active"]
    assert cli("tree").splitlines() == ["base", "  \\_ child"]
    info = json.loads(cli("info", "child"))
    assert (info["name"], info["parent"], info["kind"]) == ("child", "base", "active")
    assert cli("label", "child", "a=b") == f"a=b,{ROOT}\n"
    assert "child" in cli("usage", "child")
    refused = berthd.cli("snapshots", "rm", "base")
    assert refused.returncode == 1
    assert "has children" in refused.stderr
    cli("rm", "child", "base")
    assert cli("ls").splitlines()[1:] == []


def test_namespaces_keep_keys_apart_and_gc_frees_the_backend(berthd: BerthdProcess) -> None:
    with berthd.client() as client:
        for namespace in ("ns1", "ns2"):
            client.call("snapshots.prepare", {"key": "same", "labels": LABELS}, namespace=namespace)
        with pytest.raises(AlreadyExists):
            client.call("snapshots.prepare", {"key": "same", "labels": LABELS}, namespace="ns1")
        with pytest.raises(NotFound):
            client.call("snapshots.stat", {"key": "same"}, namespace="other")
        assert len(overlay_dirs(berthd)) == 2
        client.call("snapshots.remove", {"key": "same"}, namespace="ns1")
        # The record is gone at once; the backend snapshot at the next collection (a deletion schedules one).
        deadline = time.monotonic() + 10
        while len(overlay_dirs(berthd)) != 1:
            assert time.monotonic() < deadline, "GC did not free the removed backend snapshot"
            time.sleep(0.05)
        assert client.call("snapshots.stat", {"key": "same"}, namespace="ns2")["info"]["kind"] == "active"
        with pytest.raises(FailedPrecondition, match="snapshots"):
            client.call("namespaces.delete", {"name": "ns2"})


def test_a_prepared_snapshot_mounts_for_real(berthd: BerthdProcess, tmp_path: Path) -> None:
    target = tmp_path / "mnt"
    target.mkdir()
    with berthd.client() as client:
        mounts = [Mount.from_wire(m)
                  for m in client.call("snapshots.prepare", {"key": "live", "labels": LABELS})["mounts"]]
        mount_all(mounts, target)
        try:
            (target / "hello").write_text("hi")
        finally:
            unmount_all(target)
        client.call("snapshots.commit", {"name": "live-c", "key": "live", "labels": LABELS})
        view = [Mount.from_wire(m) for m in client.call(
            "snapshots.view", {"key": "v", "parent": "live-c", "labels": LABELS})["mounts"]]
        mount_all(view, target)
        try:
            assert (target / "hello").read_text() == "hi"
        finally:
            unmount_all(target)


def test_daemon_killed_during_snapshot_work_leaves_a_consistent_store(berthd_factory: BerthdFactory) -> None:
    """SIGKILL while a client prepares, commits and removes; after each restart the metastore and the
    directories agree once cleanup has run, and nothing committed is lost."""
    config = {"plugins": {OVERLAY: {"sync_remove": True}}}
    daemon = berthd_factory.start(config, name="crash")
    survivors: set[str] = set()
    rng = random.Random(7)
    for round_ in range(5):
        stop = threading.Event()

        def hammer(address: Path = daemon.address, n: int = round_, stop: threading.Event = stop) -> None:
            with contextlib.suppress(BerthError), Client(str(address), timeout=10) as client:
                i = 0
                while not stop.is_set():
                    key = f"r{n}-{i}"
                    client.call("snapshots.prepare", {"key": f"{key}-a", "labels": LABELS})
                    client.call("snapshots.commit", {"name": key, "key": f"{key}-a", "labels": LABELS})
                    if i % 2:
                        client.call("snapshots.remove", {"key": key})
                    i += 1

        worker = threading.Thread(target=hammer)
        worker.start()
        time.sleep(rng.uniform(0.2, 0.6))
        daemon.stop(signal.SIGKILL)
        stop.set()
        worker.join(timeout=20)
        daemon = berthd_factory.start(config, name="crash")  # the same root
        daemon.wait_log("gc_collected")  # the startup collection frees orphans; compare after it
        with daemon.client() as client:
            infos = client.call("snapshots.list", {})["infos"]
            committed = {i["name"] for i in infos if i["kind"] == "committed"}
            assert survivors <= committed, f"lost committed snapshots: {survivors - committed}"
            survivors = {name for name in committed if name.startswith(f"r{round_}-")} | survivors
            client.call("snapshots.cleanup", {})
            for info in infos:  # every listed snapshot is usable
                client.call("snapshots.usage", {"key": info["name"]})
        assert overlay_dirs(daemon) == metastore_ids(daemon)
    assert survivors, "no snapshot was committed before the kills: the test exercised nothing"
    conn = sqlite3.connect(daemon.root / "io.berth.metadata.v1.sqlite" / "meta.db")
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    finally:
        conn.close()
