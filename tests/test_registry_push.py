"""Pushing with berth's registry client to a real registry: monolithic and chunked uploads, cross-repository
mounts, skipping what exists, manifests by tag and by digest; skopeo then reads what was pushed with the
same digests."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio
from imagebuild import (
    Blob,
    busybox_image,
    generated_image,
    multi_platform_index,
    push_image,
    skopeo_inspect,
)
from registry_fixture import FaultyProxyFactory, RegistryServer

from berth.core.errdefs import FailedPrecondition, InvalidArgument, Unauthenticated
from berth.core.oci import OCI_MANIFEST, Descriptor
from berth.plugins.images.hosts import RegistryHosts
from berth.plugins.images.registry import Resolver, RetryPolicy

FAST = RetryPolicy(attempts=3, base_delay=0.01, max_delay=0.05)


def resolver(hosts: RegistryHosts | None = None) -> Resolver:
    return Resolver(hosts or RegistryHosts(), plain_http=True, retry=FAST)


async def chunks_of(data: bytes, size: int = 100_000) -> AsyncIterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start:start + size]


async def test_push_then_skopeo_reads_the_same_digests(registry: RegistryServer) -> None:
    image = busybox_image()
    ref = registry.ref("push/busybox", "v1")
    async with resolver() as r:
        counts = await push_image(r.pusher(ref), image, tag="v1")
        assert counts == {"pushed": 2, "skipped": 0}
        # Again: everything exists, nothing is uploaded.
        assert await push_image(r.pusher(ref), image, tag="v1") == {"pushed": 0, "skipped": 2}
    assert skopeo_inspect(ref, raw=True) == image.manifest.data
    info = skopeo_inspect(ref)
    assert info["Digest"] == image.manifest.digest
    assert info["Layers"] == [layer.blob.digest for layer in image.layers]
    assert skopeo_inspect(ref, config=True)["rootfs"]["diff_ids"] == [layer.diff_id for layer in image.layers]


async def test_push_index_by_tag_and_manifests_by_digest(registry: RegistryServer, tmp_path: Path) -> None:
    index = multi_platform_index(seed=41)
    ref = registry.ref("push/multi", "v1")
    async with resolver() as r:
        await push_image(r.pusher(ref), index, tag="v1")
        _, desc = await r.resolve(ref)
        assert desc == index.descriptor
        assert await r.list_tags(ref) == ["v1"]
    assert skopeo_inspect(ref, raw=True) == index.index.data
    for image in index.images:
        by_digest = registry.ref("push/multi", "@" + image.manifest.digest)
        assert skopeo_inspect(by_digest, raw=True) == image.manifest.data
    # skopeo copies every platform of it back out.
    await trio.run_process(["skopeo", "--insecure-policy", "copy", "--quiet", "--all", "--src-tls-verify=false",
                            f"docker://{ref}", f"oci:{tmp_path / 'out'}:v1"], capture_stdout=True, capture_stderr=True)
    out_index = json.loads((tmp_path / "out" / "index.json").read_text())
    assert out_index["manifests"][0]["digest"] == index.descriptor.digest


async def test_chunked_upload(registry: RegistryServer, faulty_proxy_factory: FaultyProxyFactory) -> None:
    proxy = faulty_proxy_factory.start(registry.host)
    image = generated_image(seed=42, layers=1, files=4, max_size=400 << 10)
    blob = image.layers[0].blob
    async with resolver() as r:
        pusher = r.pusher(f"{proxy.host}/push/chunked:v1", chunk_size=64 << 10)
        await pusher.push_blob(blob.descriptor(), chunks_of(blob.data, 50_000))
        assert await pusher.exists(blob.descriptor())
        assert await r.fetcher(registry.ref("push/chunked")).fetch_bytes(blob.descriptor()) == blob.data
    methods = [method for method, path, _ in proxy.requests if "/uploads/" in path]
    expected_patches = -(-blob.size // (64 << 10))
    assert methods == ["POST"] + ["PATCH"] * expected_patches + ["PUT"]


async def test_monolithic_upload_is_one_put(registry: RegistryServer, faulty_proxy_factory: FaultyProxyFactory) -> None:
    proxy = faulty_proxy_factory.start(registry.host)
    blob = generated_image(seed=43, layers=1).layers[0].blob
    async with resolver() as r:
        await r.pusher(f"{proxy.host}/push/mono:v1").push_blob(blob.descriptor(), chunks_of(blob.data))
    assert [method for method, path, _ in proxy.requests] == ["POST", "PUT"]


async def test_cross_repository_mount(registry: RegistryServer, faulty_proxy_factory: FaultyProxyFactory) -> None:
    blob = generated_image(seed=44, layers=1).layers[0].blob
    desc = blob.descriptor()
    async with resolver() as r:
        await r.pusher(registry.ref("push/source")).push_blob(desc, chunks_of(blob.data))
        proxy = faulty_proxy_factory.start(registry.host)
        target = r.pusher(f"{proxy.host}/push/target:v1")
        assert not await target.exists(desc)
        await target.push_blob(desc, chunks_of(b"never read"), mount_from="push/source")
        assert await target.exists(desc)
        # A mount from a repository without the blob falls back to an upload.
        other = generated_image(seed=45, layers=1).layers[0].blob
        await target.push_blob(other.descriptor(), chunks_of(other.data), mount_from="push/source")
        assert await target.exists(other.descriptor())
    posts = [path for method, path, _ in proxy.requests if method == "POST"]
    assert len(posts) == 2
    assert all("mount=sha256" in path and "from=push%2Fsource" in path for path in posts)
    assert [method for method, _, _ in proxy.requests].count("PUT") == 1


async def test_mount_with_bearer_tokens(token_registry: RegistryServer) -> None:
    """A mount needs pull on the source repository too: the challenge names it, the token covers it."""
    blob = generated_image(seed=46, layers=1).layers[0].blob
    async with resolver(token_registry.registry_hosts()) as r:
        await r.pusher(token_registry.ref("tok/source")).push_blob(blob.descriptor(), chunks_of(blob.data))
        target = r.pusher(token_registry.ref("tok/target"))
        await target.push_blob(blob.descriptor(), chunks_of(b"never read"), mount_from="tok/source")
        assert await target.exists(blob.descriptor())
    assert token_registry.token_server is not None
    scopes = [sorted(request.scopes) for request in token_registry.token_server.requests]
    assert ["repository:tok/source:pull", "repository:tok/target:pull,push"] in scopes


async def test_push_blob_refuses_bytes_that_do_not_match(registry: RegistryServer) -> None:
    blob = generated_image(seed=47, layers=1).layers[0].blob
    desc = blob.descriptor()
    async with resolver() as r:
        pusher = r.pusher(registry.ref("push/bad"))
        with pytest.raises(FailedPrecondition, match=desc.digest):
            await pusher.push_blob(desc, chunks_of(blob.data[:-1] + b"x"))
        with pytest.raises(FailedPrecondition, match=desc.digest):
            await pusher.push_blob(desc, chunks_of(blob.data + b"extra"))
        chunked = r.pusher(registry.ref("push/bad"), chunk_size=10_000)
        with pytest.raises(FailedPrecondition, match=desc.digest):
            await chunked.push_blob(desc, chunks_of(blob.data[:-1]))
        assert not await pusher.exists(desc)


async def test_push_manifest_errors(registry: RegistryServer) -> None:
    image = generated_image(seed=48, layers=1)
    async with resolver() as r:
        pusher = r.pusher(registry.ref("push/manifests"))
        wrong = Descriptor(media_type=OCI_MANIFEST, digest=image.manifest.digest, size=image.manifest.size + 1)
        with pytest.raises(InvalidArgument, match="does not match"):
            await pusher.push_manifest(wrong, image.manifest.data, tag="v1")
        # The registry refuses a manifest whose blobs it does not have.
        with pytest.raises(InvalidArgument, match="MANIFEST_BLOB_UNKNOWN"):
            await pusher.push_manifest(image.descriptor, image.manifest.data, tag="v1")
        with pytest.raises(InvalidArgument, match="invalid tag"):
            await pusher.push_manifest(image.descriptor, image.manifest.data, tag="-bad")
        # By digest, once the blobs are there.
        for blob in (image.config, image.layers[0].blob):
            await pusher.push_blob(blob.descriptor(), chunks_of(blob.data))
        await pusher.push_manifest(image.descriptor, image.manifest.data)
        assert await pusher.exists(image.descriptor)
        _, desc = await r.resolve(registry.ref("push/manifests", "@" + image.manifest.digest))
        assert desc == image.descriptor


async def test_push_needs_credentials(auth_registry: RegistryServer) -> None:
    blob = Blob("application/octet-stream", b"payload")
    async with resolver() as r:
        with pytest.raises(Unauthenticated, match="push/anonymous"):
            await r.pusher(auth_registry.ref("push/anonymous")).push_blob(blob.descriptor(), chunks_of(blob.data))
