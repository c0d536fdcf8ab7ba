"""Expired leases are collected while the daemon is idle (containerd leaves them until the next
mutation, #6294): a real berthd, real time, and no call after the lease is made."""

from __future__ import annotations

import hashlib
import time

from conftest import BerthdProcess

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
