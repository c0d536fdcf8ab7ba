"""The image store over a real metadata database and local content store: records, validation, filters,
field paths, events, leases, and garbage collection of what a deleted image kept."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio

from berth.core.errdefs import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from berth.core.metadata.content import NamespacedContentStore
from berth.core.metadata.db import MetadataDB
from berth.core.metadata.gc import GarbageCollector
from berth.core.metadata.images import MAX_IMAGE_NAME_LENGTH, ImageStore
from berth.core.metadata.leases import LABEL_GC_EXPIRE, LeaseManager, Resource, format_expiry
from berth.core.namespaces import with_lease, with_namespace
from berth.core.oci import OCI_CONFIG, OCI_INDEX, OCI_LAYER, OCI_MANIFEST, Descriptor
from berth.plugins.content.local.store import LocalStore

WAIT = 10.0
REF = "berth.io/gc.ref.content"


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def desc(data: bytes, media_type: str = OCI_MANIFEST) -> Descriptor:
    return Descriptor(media_type=media_type, digest=sha(data), size=len(data))


Event = tuple[str, str, dict[str, Any]]


@dataclass
class Env:
    db: MetadataDB
    backend: LocalStore
    content: NamespacedContentStore
    gc: GarbageCollector
    leases: LeaseManager
    images: ImageStore
    events: list[Event]
    deletions: list[str]

    async def put(self, data: bytes, labels: Mapping[str, str] | None = None) -> str:
        digest = sha(data)
        writer = await self.content.writer(f"put-{digest}", total=len(data))
        await writer.write(data)
        await writer.commit(len(data), digest, labels)
        return digest

    def on_disk(self, digest: str) -> bool:
        return self.backend.blob_path(digest).exists()

    async def collect(self) -> None:
        with trio.fail_after(WAIT):
            await self.gc.collect()

    async def tree(self) -> tuple[Descriptor, list[str]]:
        """An OCI manifest with a config and a layer, labelled as a pull labels it (in the current
        namespace, held by a lease while it is written). Returns the manifest and every digest."""
        layer = b"layer bytes"
        config = json.dumps({"architecture": "amd64", "os": "linux",
                             "rootfs": {"type": "layers", "diff_ids": [sha(layer)]}}).encode()
        manifest = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                               "config": desc(config, OCI_CONFIG).to_wire(),
                               "layers": [desc(layer, OCI_LAYER).to_wire()]}).encode()
        await self.leases.create("writing")
        with with_lease("writing"):
            await self.put(layer)
            await self.put(config)
            await self.put(manifest, {f"{REF}.config": sha(config), f"{REF}.l.0": sha(layer)})
        return desc(manifest), [sha(manifest), sha(config), sha(layer)]


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[Env]:
    db = await MetadataDB.open(tmp_path / "meta.db")
    backend = LocalStore(tmp_path / "content")
    content = NamespacedContentStore(db, backend)
    gc = GarbageCollector(db, content)
    events: list[Event] = []
    deletions: list[str] = []
    images = ImageStore(db, lambda ns, topic, event: events.append((ns, topic, event)), collect=gc.collect,
                        on_delete=lambda: deletions.append("deleted"))
    try:
        yield Env(db, backend, content, gc, LeaseManager(db, collect=gc.collect), images, events, deletions)
    finally:
        await db.aclose()


# ---------------------------------------------------------------- records


async def test_create_get_list_delete(env: Env) -> None:
    target = desc(b"manifest")
    with with_namespace("ns"):
        image = await env.images.create("docker.io/library/busybox:1.36", target, {"a": "1", "empty": ""})
        assert image.labels == {"a": "1"}  # empty values are not stored
        got = await env.images.get("docker.io/library/busybox:1.36")
        assert got.target == target
        assert got.labels == {"a": "1"}
        assert got.created_at == got.updated_at == image.created_at
        assert got.to_wire()["target"] == {"mediaType": OCI_MANIFEST, "digest": target.digest, "size": 8}
        with pytest.raises(AlreadyExists, match=re.escape("image docker.io/library/busybox:1.36 already exists")):
            await env.images.create("docker.io/library/busybox:1.36", target)
        await env.images.create("a/b", target)
        assert [i.name for i in await env.images.list_all()] == ["a/b", "docker.io/library/busybox:1.36"]
    with with_namespace("other"):
        assert await env.images.list_all() == []
        with pytest.raises(NotFound, match="image a/b not found"):
            await env.images.get("a/b")
        with pytest.raises(NotFound):
            await env.images.delete("a/b")
    with with_namespace("ns"):
        await env.images.delete("a/b")
        assert env.deletions == ["deleted"]  # the GC scheduler hears of it
        with pytest.raises(NotFound):
            await env.images.get("a/b")
        with pytest.raises(NotFound):
            await env.images.delete("a/b")
        assert env.deletions == ["deleted"]
        assert [i.name for i in await env.images.list_all()] == ["docker.io/library/busybox:1.36"]


@pytest.mark.parametrize(("name", "message"), [
    ("", "must not be empty"),
    ("x" * (MAX_IMAGE_NAME_LENGTH + 1), "longer than 512"),
    ("has space:1", "invalid"),
    ("tab\there", "invalid"),
    ("/leading/slash", "invalid"),
    (":tag", "invalid"),
    ("nul\x00", "invalid"),
])
async def test_bad_names_are_refused(env: Env, name: str, message: str) -> None:
    with with_namespace("ns"), pytest.raises(InvalidArgument, match=message):
        await env.images.create(name, desc(b"m"))


async def test_bad_targets_and_labels_are_refused(env: Env) -> None:
    with with_namespace("ns"):
        with pytest.raises(InvalidArgument, match="media type"):
            await env.images.create("x", Descriptor(media_type="", digest=sha(b"m"), size=1))
        with pytest.raises(InvalidArgument, match="invalid digest"):
            await env.images.create("x", Descriptor(media_type=OCI_MANIFEST, digest="sha256:nothex", size=1))
        with pytest.raises(InvalidArgument, match="non-negative integer size"):
            await env.images.create("x", Descriptor(media_type=OCI_MANIFEST, digest=sha(b"m"), size=-1))
        with pytest.raises(InvalidArgument, match="invalid digest"):
            await env.images.update("x", target=Descriptor(media_type=OCI_MANIFEST, digest="md5:0", size=1))
        with pytest.raises(InvalidArgument, match="exceed 4096 bytes"):
            await env.images.create("x", desc(b"m"), {"k": "v" * 4096})
        with pytest.raises(InvalidArgument, match="invalid digest"):
            await env.images.delete("x", target="md5:abc")
        assert await env.images.list_all() == []


async def test_filters(env: Env) -> None:
    index = desc(b"index", OCI_INDEX)
    manifest = desc(b"manifest")
    with with_namespace("ns"):
        await env.images.create("docker.io/library/busybox:1", index, {"env": "prod"})
        await env.images.create("docker.io/library/alpine:3", manifest, {"env": "dev", "berth.io/x": "y"})
        await env.images.create("local/app:latest", manifest)

        async def names(*filters: str) -> list[str]:
            return [i.name for i in await env.images.list_all(filters)]

        assert await names() == ["docker.io/library/alpine:3", "docker.io/library/busybox:1", "local/app:latest"]
        assert await names("name==local/app:latest") == ["local/app:latest"]
        assert await names('name~="^docker.io/"') == ["docker.io/library/alpine:3", "docker.io/library/busybox:1"]
        assert await names(f"target.digest=={manifest.digest}") == ["docker.io/library/alpine:3", "local/app:latest"]
        assert await names(f"target.mediatype=={OCI_INDEX}") == ["docker.io/library/busybox:1"]
        assert await names("labels.env==prod", "labels.env==dev") == ["docker.io/library/alpine:3",
                                                                      "docker.io/library/busybox:1"]
        assert await names('labels."berth.io/x"') == ["docker.io/library/alpine:3"]
        assert await names("labels.env!=prod,name~=docker") == ["docker.io/library/alpine:3"]
        with pytest.raises(InvalidArgument, match=re.escape("filter 'labels.env==': expected a value")):
            await names("labels.env==")


async def test_update_with_fieldpaths(env: Env) -> None:
    first, second = desc(b"first"), desc(b"second", OCI_INDEX)
    with with_namespace("ns"):
        created = await env.images.create("img", first, {"a": "1", "b": "2"})
        # One label set, one removed (absent from labels), the rest kept.
        image = await env.images.update("img", labels={"c": "3"}, fieldpaths=["labels.c", "labels.a"])
        assert image.labels == {"b": "2", "c": "3"}
        assert image.target == first
        assert image.created_at == created.created_at
        assert image.updated_at >= created.updated_at
        # An empty value removes too.
        image = await env.images.update("img", labels={"b": ""}, fieldpaths=["labels.b"])
        assert image.labels == {"c": "3"}
        # "labels" replaces them all; the target stays.
        image = await env.images.update("img", labels={"x": "y"}, fieldpaths=["labels"])
        assert image.labels == {"x": "y"}
        # "target" replaces the target only.
        image = await env.images.update("img", target=second, fieldpaths=["target"])
        assert (image.target, image.labels) == (second, {"x": "y"})
        # No field paths: labels replaced, and the target when one is given.
        image = await env.images.update("img", labels={"z": "1"})
        assert (image.target, image.labels) == (second, {"z": "1"})
        image = await env.images.update("img", target=first)
        assert (image.target, image.labels) == (first, {})
        assert await env.images.get("img") == image

        with pytest.raises(InvalidArgument, match="cannot update field 'name' of an image"):
            await env.images.update("img", fieldpaths=["name"])
        with pytest.raises(InvalidArgument, match="needs a target"):
            await env.images.update("img", fieldpaths=["target"])
        with pytest.raises(InvalidArgument, match="media type"):
            await env.images.update("img", target=Descriptor(media_type="", digest=sha(b"q"), size=1))
        with pytest.raises(NotFound):
            await env.images.update("missing", labels={"a": "b"})


async def test_put_creates_or_repoints(env: Env) -> None:
    first, second = desc(b"first"), desc(b"second")
    with with_namespace("ns"):
        await env.images.put("img", first)
        await env.images.update("img", labels={"keep": "me"})
        image = await env.images.put("img", second)
        assert (image.target, image.labels) == (second, {"keep": "me"})
    assert [topic for _, topic, _ in env.events] == ["/images/create", "/images/update", "/images/update"]


async def test_delete_with_target_checks_it(env: Env) -> None:
    with with_namespace("ns"):
        await env.images.create("img", desc(b"first"))
        with pytest.raises(FailedPrecondition, match=f"points at {sha(b'first')}"):
            await env.images.delete("img", target=sha(b"second"))
        await env.images.get("img")
        await env.images.delete("img", target=sha(b"first"))
        with pytest.raises(NotFound):
            await env.images.get("img")


async def test_events(env: Env) -> None:
    with with_namespace("ns"):
        await env.images.create("img", desc(b"m"), {"a": "1"})
        await env.images.update("img", labels={"b": "2"}, fieldpaths=["labels.b"])
        with pytest.raises(AlreadyExists):
            await env.images.create("img", desc(b"m"))
        await env.images.delete("img")
    assert env.events == [
        ("ns", "/images/create", {"name": "img", "labels": {"a": "1"}}),
        ("ns", "/images/update", {"name": "img", "labels": {"a": "1", "b": "2"}}),
        ("ns", "/images/delete", {"name": "img"}),
    ]


# ---------------------------------------------------------------- leases and garbage collection


async def test_image_keeps_its_tree_and_delete_frees_it(env: Env) -> None:
    with with_namespace("ns"):
        manifest, digests = await env.tree()
        await env.images.create("img", manifest)
        await env.leases.delete("writing")
        stray = await env.put(b"stray")
    await env.collect()
    assert all(env.on_disk(d) for d in digests)
    assert not env.on_disk(stray)
    with with_namespace("ns"):
        await env.images.delete("img")
    assert all(env.on_disk(d) for d in digests)  # the record only; the bytes wait for the collector
    await env.collect()
    assert not any(env.on_disk(d) for d in digests)


async def test_shared_content_survives_while_another_image_names_it(env: Env) -> None:
    with with_namespace("ns"):
        manifest, digests = await env.tree()
        await env.images.create("one", manifest)
        await env.images.create("two", manifest)
        await env.leases.delete("writing")
        await env.images.delete("one", sync=True)
    assert all(env.on_disk(d) for d in digests)
    with with_namespace("ns"):
        await env.images.delete("two", sync=True)
    assert not any(env.on_disk(d) for d in digests)


async def test_sync_delete_collects_before_returning(env: Env) -> None:
    with with_namespace("ns"):
        manifest, digests = await env.tree()
        await env.images.create("img", manifest)
        await env.leases.delete("writing")
        with trio.fail_after(WAIT):
            await env.images.delete("img", sync=True)
    assert not any(env.on_disk(d) for d in digests)


async def test_expired_image_is_collected(env: Env) -> None:
    with with_namespace("ns"):
        manifest, digests = await env.tree()
        await env.images.create("img", manifest, {LABEL_GC_EXPIRE: format_expiry(1.0)})
        await env.leases.delete("writing")
    await env.collect()
    assert not any(env.on_disk(d) for d in digests)
    with with_namespace("ns"), pytest.raises(NotFound):
        await env.images.get("img")


async def test_image_created_under_a_lease_joins_it(env: Env) -> None:
    with with_namespace("ns"):
        manifest, digests = await env.tree()
        with with_lease("writing"):
            await env.images.create("img", manifest, {LABEL_GC_EXPIRE: format_expiry(1.0)})
        assert Resource(type="images", id="img") in await env.leases.list_resources("writing")
    await env.collect()
    # Expired, but the lease holds it (and through it, its tree).
    with with_namespace("ns"):
        await env.images.get("img")
    assert all(env.on_disk(d) for d in digests)
    with with_namespace("ns"):
        await env.leases.delete("writing")
    await env.collect()
    assert not any(env.on_disk(d) for d in digests)
    with with_namespace("ns"), with_lease("missing"), pytest.raises(NotFound, match="lease missing not found"):
        await env.images.create("other", manifest)


async def test_delete_drops_the_lease_resource(env: Env) -> None:
    with with_namespace("ns"):
        await env.leases.create("l1")
        with with_lease("l1"):
            await env.images.create("img", desc(b"m"))
        await env.images.delete("img")
        assert await env.leases.list_resources("l1") == []
