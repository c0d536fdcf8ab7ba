"""Expired leases are collected while the daemon is idle (containerd leaves them until the next
mutation, #6294): a real berthd, real time, and no call after the lease is made."""

from __future__ import annotations

import hashlib
import time

from conftest import BerthdFactory, BerthdProcess

BLOBS = "io.berth.content.v1.local/blobs/sha256"


def test_expired_lease_is_collected_while_idle(berthd: BerthdProcess) -> None:
    data = b"held only by a lease that expires in a second"
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    with berthd.client() as client:
        client.call("leases.create", {"id": "short", "expires_in": 1.0})
        for action, extra in (("stat", {"total": len(data)}), ("write", {"offset": 0, "data": data}),
                              ("commit", {"total": len(data), "expected": digest})):
            client.call("content.write", {"action": action, "ref": "held", **extra}, lease="short")
        assert client.call("content.info", {"digest": digest})["info"]["size"] == len(data)
    blob = berthd.root / BLOBS / digest.removeprefix("sha256:")
    assert blob.exists()
    deadline = time.monotonic() + 15  # bounds the wait; the expiry wake-up comes ~1 s after creation
    while blob.exists():
        assert time.monotonic() < deadline, "the expired lease's blob was not collected while idle"
        time.sleep(0.05)
    with berthd.client() as client:
        assert client.call("leases.list", {})["leases"] == []
        assert client.call("content.list", {})["infos"] == []


def test_deleting_a_lease_frees_what_it_alone_held_without_sync(berthd: BerthdProcess) -> None:
    data = b"held by a lease that is deleted"
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    with berthd.client() as client:
        client.call("leases.create", {"id": "gone"})
        for action, extra in (("stat", {"total": len(data)}), ("write", {"offset": 0, "data": data}),
                              ("commit", {"total": len(data), "expected": digest})):
            client.call("content.write", {"action": action, "ref": "held", **extra}, lease="gone")
        client.call("leases.delete", {"id": "gone"})  # not sync: the deletion schedules a collection
    blob = berthd.root / BLOBS / digest.removeprefix("sha256:")
    deadline = time.monotonic() + 15
    while blob.exists():
        assert time.monotonic() < deadline, "deleting the lease did not lead to a collection"
        time.sleep(0.05)


def test_sync_lease_delete_does_not_wait_for_the_startup_delay(berthd_factory: BerthdFactory) -> None:
    daemon = berthd_factory.start({"plugins": {"io.berth.gc.v1.scheduler": {"startup_delay": "1h"}}})
    with daemon.client(timeout=20) as client:  # the call's deadline: it must not wait out the hour
        client.call("leases.create", {"id": "quick"})
        client.call("leases.delete", {"id": "quick", "sync": True})
        assert client.call("leases.list", {})["leases"] == []
