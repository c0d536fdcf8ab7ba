"""The registry client against a real ``docker-registry``: resolve tags and digests, OCI and Docker media
types, indexes, blob fetches with Range resume, limits and errors. Images are built by
``tests/imagebuild.py`` and pushed with skopeo."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from imagebuild import Image, ImageIndex, skopeo_copy, write_oci_layout
from registry_fixture import FaultyProxyFactory, PushedImages, standard_images

from berth.core.content import new_hasher
from berth.core.errdefs import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    OutOfRange,
    ResourceExhausted,
    Unavailable,
    Unimplemented,
)
from berth.core.oci import (
    DOCKER_CONFIG,
    DOCKER_LAYER_GZIP,
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
    OCI_INDEX,
    OCI_MANIFEST,
    Descriptor,
)
from berth.plugins.images.hosts import RegistryHosts
from berth.plugins.images.registry import Resolver, RetryPolicy, verify_stream

FAST = RetryPolicy(attempts=3, base_delay=0.01, max_delay=0.05)


@pytest.fixture(scope="module")
def pushed(registry_images: PushedImages) -> PushedImages:
    """The standard images, plus busybox converted to Docker media types by skopeo."""
    registry = registry_images.registry
    layout = write_oci_layout(registry.root / "busybox-layout", {"busybox": registry_images.images["busybox"]})
    skopeo_copy(layout, "busybox", registry.ref("busybox-v2s2", "v1"), docker_format=True)
    return registry_images


def resolver(**kwargs: object) -> Resolver:
    return Resolver(RegistryHosts(), plain_http=True, retry=FAST, **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("repository", sorted(standard_images()))
async def test_resolve_tag_gives_the_pushed_root(pushed: PushedImages, repository: str) -> None:
    image = pushed.images[repository]
    async with resolver() as r:
        name, desc = await r.resolve(pushed.ref(repository))
    assert name == pushed.ref(repository)
    assert desc == image.descriptor


async def test_resolve_digest_and_tag_with_digest(pushed: PushedImages) -> None:
    image = pushed.images["busybox"]
    by_digest = pushed.registry.ref("busybox", "@" + image.descriptor.digest)
    async with resolver() as r:
        name, desc = await r.resolve(by_digest)
        assert (name, desc) == (by_digest, image.descriptor)
        name, desc = await r.resolve(f"{pushed.ref('busybox')}@{image.descriptor.digest}")
        assert desc == image.descriptor
        other = pushed.images["zstd"].descriptor.digest
        with pytest.raises(NotFound, match="busybox"):
            await r.resolve(pushed.registry.ref("busybox", "@" + other))


async def test_docker_media_types_from_skopeo_conversion(pushed: PushedImages) -> None:
    async with resolver() as r:
        name, desc = await r.resolve(pushed.ref("busybox-v2s2"))
        assert desc.media_type == DOCKER_MANIFEST
        manifest = json.loads(await r.fetcher(name).fetch_bytes(desc))
    assert manifest["config"]["mediaType"] == DOCKER_CONFIG
    assert [layer["mediaType"] for layer in manifest["layers"]] == [DOCKER_LAYER_GZIP]
    # The conversion keeps the layer bytes.
    assert manifest["layers"][0]["digest"] == pushed.images["busybox"].layers[0].blob.digest  # type: ignore[union-attr]


@pytest.mark.parametrize(("repository", "index_type", "manifest_type"), [
    ("multi", OCI_INDEX, OCI_MANIFEST), ("multi-docker", DOCKER_MANIFEST_LIST, DOCKER_MANIFEST)])
async def test_index_and_platform_manifests(pushed: PushedImages, repository: str, index_type: str,
                                            manifest_type: str) -> None:
    index = pushed.images[repository]
    assert isinstance(index, ImageIndex)
    async with resolver() as r:
        name, desc = await r.resolve(pushed.ref(repository))
        assert desc.media_type == index_type
        fetcher = r.fetcher(name)
        entries = [Descriptor.from_wire(m) for m in json.loads(await fetcher.fetch_bytes(desc))["manifests"]]
        assert [str(e.platform) for e in entries] == ["linux/amd64", "linux/arm64"]
        markers = []
        for entry, image in zip(entries, index.images, strict=True):
            assert entry.media_type == manifest_type
            assert await fetcher.fetch_bytes(entry) == image.manifest.data
            last_layer = image.layers[-1].blob
            assert await fetcher.fetch_bytes(last_layer.descriptor()) == last_layer.data
            markers.append(last_layer.digest)
    assert markers[0] != markers[1]


async def test_fetch_every_blob_verified(pushed: PushedImages) -> None:
    async with resolver() as r:
        for repository, image in pushed.images.items():
            if not isinstance(image, Image):
                continue
            fetcher = r.fetcher(pushed.ref(repository))
            for blob in image.blobs().values():
                assert await fetcher.fetch_bytes(blob.descriptor()) == blob.data


async def test_fetch_stopped_mid_blob_resumes_from_offset(pushed: PushedImages) -> None:
    """A consumer that stops part-way keeps its bytes and hasher; a new fetch from that offset completes
    the blob, and the digest verifies over both parts."""
    layer = pushed.images["busybox"].layers[0].blob  # type: ignore[union-attr]
    desc = layer.descriptor()
    async with resolver() as r:
        fetcher = r.fetcher(pushed.ref("busybox"))
        hasher = new_hasher(desc.digest)
        first = bytearray()
        async for chunk in fetcher.fetch(desc):
            first += chunk
            hasher.update(chunk)
            if len(first) > 100_000:
                break
        assert 100_000 < len(first) < desc.size
        rest = bytearray()
        async for chunk in verify_stream(desc, fetcher.fetch(desc, offset=len(first)), hasher=hasher,
                                         offset=len(first)):
            rest += chunk
    assert bytes(first + rest) == layer.data


async def test_fetch_offsets_at_the_edges(pushed: PushedImages) -> None:
    blob = pushed.images["plain"].layers[0].blob  # type: ignore[union-attr]
    desc = blob.descriptor()
    async with resolver() as r:
        fetcher = r.fetcher(pushed.ref("plain"))
        assert [c async for c in fetcher.fetch(desc, offset=desc.size)] == []
        assert b"".join([c async for c in fetcher.fetch(desc, offset=desc.size - 1)]) == blob.data[-1:]
        with pytest.raises(OutOfRange):
            _ = [c async for c in fetcher.fetch(desc, offset=desc.size + 1)]


async def test_verify_stream_refuses_a_mismatch(pushed: PushedImages) -> None:
    blob = pushed.images["plain"].layers[0].blob  # type: ignore[union-attr]
    async with resolver() as r:
        fetcher = r.fetcher(pushed.ref("plain"))
        wrong_digest = Descriptor(media_type=blob.media_type, digest="sha256:" + "0" * 64, size=blob.size)
        with pytest.raises(FailedPrecondition, match="digest mismatch"):
            _ = [c async for c in verify_stream(wrong_digest, fetcher.fetch(blob.descriptor()))]
        too_small = Descriptor(media_type=blob.media_type, digest=blob.digest, size=blob.size - 1)
        with pytest.raises(FailedPrecondition, match="more than"):
            _ = [c async for c in verify_stream(too_small, fetcher.fetch(blob.descriptor()))]


async def test_not_found_names_the_reference_or_blob(pushed: PushedImages) -> None:
    async with resolver() as r:
        with pytest.raises(NotFound, match="busybox:nope"):
            await r.resolve(pushed.registry.ref("busybox", "nope"))
        with pytest.raises(NotFound, match="no-such-repo"):
            await r.resolve(pushed.registry.ref("no-such-repo"))
        missing = Descriptor(media_type="application/octet-stream", digest="sha256:" + "1" * 64, size=10)
        with pytest.raises(NotFound, match="sha256:1111"):
            await r.fetcher(pushed.ref("busybox")).fetch_bytes(missing)


async def test_manifest_size_limit(pushed: PushedImages) -> None:
    async with resolver(max_manifest_size=100) as r:
        with pytest.raises(ResourceExhausted, match="limit"):
            await r.resolve(pushed.ref("busybox"))
        desc = pushed.images["busybox"].descriptor
        with pytest.raises(ResourceExhausted, match="limit"):
            await r.fetcher(pushed.ref("busybox")).fetch_bytes(desc)


async def test_resolve_without_digest_header_computes_it(pushed: PushedImages,
                                                         faulty_proxy_factory: FaultyProxyFactory) -> None:
    """A registry (here a proxy) that sends no Docker-Content-Digest: the client GETs the manifest and
    hashes it."""
    proxy = faulty_proxy_factory.start(pushed.registry.host)
    proxy.drop_headers = {"docker-content-digest"}
    image = pushed.images["multi"]
    async with resolver() as r:
        _, desc = await r.resolve(f"{proxy.host}/multi:v1")
    assert desc == image.descriptor
    assert [method for method, path, _ in proxy.requests if "/manifests/" in path] == ["HEAD", "GET"]


async def test_list_tags(pushed: PushedImages) -> None:
    async with resolver() as r:
        assert await r.list_tags(pushed.ref("busybox")) == ["v1"]
        with pytest.raises(NotFound):
            await r.list_tags(pushed.registry.ref("no-such-repo"))


async def test_plain_http_only_for_loopback_or_configured(pushed: PushedImages, tmp_path: Path) -> None:
    async with Resolver(RegistryHosts(), plain_http=True, retry=FAST) as r:
        with pytest.raises(InvalidArgument, match="only allowed for a loopback"):
            await r.resolve("registry.example.com/app:v1")
    # Without plain_http the client speaks TLS, which a plain-HTTP registry cannot answer.
    async with Resolver(RegistryHosts(), retry=FAST) as r:
        with pytest.raises(Unavailable, match="unreachable"):
            await r.resolve(pushed.ref("busybox"))


async def test_closed_resolver_refuses_work(pushed: PushedImages) -> None:
    r = resolver()
    await r.aclose()
    with pytest.raises(Unavailable, match="closed"):
        await r.resolve(pushed.ref("busybox"))


async def test_schema1_manifests_are_refused(pushed: PushedImages, faulty_proxy_factory: FaultyProxyFactory) -> None:
    proxy = faulty_proxy_factory.start(pushed.registry.host)
    proxy.override_headers = {"content-type": "application/vnd.docker.distribution.manifest.v1+prettyjws"}
    async with resolver() as r:
        with pytest.raises(Unimplemented, match="schema 1"):
            await r.resolve(f"{proxy.host}/busybox:v1")


async def test_generic_content_type_reads_the_media_type_from_the_body(
        pushed: PushedImages, faulty_proxy_factory: FaultyProxyFactory) -> None:
    proxy = faulty_proxy_factory.start(pushed.registry.host)
    proxy.override_headers = {"content-type": "application/json"}
    async with resolver() as r:
        for repository in ("busybox", "multi", "multi-docker"):
            _, desc = await r.resolve(f"{proxy.host}/{repository}:v1")
            assert desc == pushed.images[repository].descriptor


async def test_manifest_bytes_are_checked_against_digests(pushed: PushedImages,
                                                          faulty_proxy_factory: FaultyProxyFactory) -> None:
    """A registry serving manifest bytes that are not what their digest says: refused when resolving
    through GET (against the header or the pinned digest) and when fetching by digest."""
    proxy = faulty_proxy_factory.start(pushed.registry.host)
    proxy.override_headers = {"content-type": "application/json"}
    proxy.corrupt_manifests = True
    image = pushed.images["busybox"]
    async with resolver() as r:
        with pytest.raises(FailedPrecondition, match="the registry named it"):
            await r.resolve(f"{proxy.host}/busybox:v1")
        with pytest.raises(FailedPrecondition, match="content digest mismatch"):
            await r.resolve(f"{proxy.host}/busybox@{image.descriptor.digest}")
        with pytest.raises(FailedPrecondition, match="content digest mismatch"):
            await r.fetcher(f"{proxy.host}/busybox").fetch_bytes(image.descriptor)
