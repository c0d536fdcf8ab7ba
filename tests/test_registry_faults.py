"""The registry client under faults, injected by a small proxy in front of a real registry: 5xx and 429
answers and connection resets are retried with backoff (a bounded number of times), a blob cut mid-body
resumes with Range, a registry that ignores Range is handled, and corrupted bytes are detected."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from imagebuild import Image, generated_image, push_image
from registry_fixture import FaultyProxy, FaultyProxyFactory, RegistryServer

from berth.core.errdefs import FailedPrecondition, Unavailable
from berth.plugins.images.hosts import RegistryHosts
from berth.plugins.images.registry import Resolver, RetryPolicy, verify_stream

FAST = RetryPolicy(attempts=4, base_delay=0.01, max_delay=0.05)


@pytest.fixture(scope="module")
def image() -> Image:
    return generated_image(seed=31, layers=2, max_size=512 << 10)


@pytest.fixture
async def proxy(registry: RegistryServer, image: Image, faulty_proxy_factory: FaultyProxyFactory) -> FaultyProxy:
    async with Resolver(RegistryHosts(), plain_http=True, retry=FAST) as r:
        await push_image(r.pusher(registry.ref("faults/app", "v1")), image, tag="v1")
    return faulty_proxy_factory.start(registry.host)


def resolver() -> Resolver:
    return Resolver(RegistryHosts(), plain_http=True, retry=FAST)


def biggest_layer(image: Image) -> tuple[bytes, int]:
    blob = max((layer.blob for layer in image.layers), key=lambda b: b.size)
    return blob.data, blob.size


@pytest.mark.parametrize("status", [500, 502, 503, 504, 429])
async def test_transient_errors_are_retried(proxy: FaultyProxy, image: Image, status: int) -> None:
    proxy.fail_next, proxy.fail_status = 3, status
    async with resolver() as r:
        _, desc = await r.resolve(f"{proxy.host}/faults/app:v1")
    assert desc == image.descriptor
    assert proxy.fail_next == 0
    assert [method for method, _, _ in proxy.requests] == ["HEAD"] * 4


async def test_retries_are_bounded(proxy: FaultyProxy) -> None:
    proxy.fail_next = 10
    async with resolver() as r:
        with pytest.raises(Unavailable, match=r"registry unavailable \(HTTP 503"):
            await r.resolve(f"{proxy.host}/faults/app:v1")
    assert len(proxy.requests) == FAST.attempts


async def test_connection_resets_are_retried(proxy: FaultyProxy, image: Image) -> None:
    proxy.reset_next = 2
    async with resolver() as r:
        _, desc = await r.resolve(f"{proxy.host}/faults/app:v1")
        proxy.reset_next = 2
        layer = image.layers[0].blob
        assert await r.fetcher(f"{proxy.host}/faults/app:v1").fetch_bytes(layer.descriptor()) == layer.data
    assert desc == image.descriptor


async def test_blob_cut_mid_body_resumes_with_range(proxy: FaultyProxy, image: Image) -> None:
    blob = max((layer.blob for layer in image.layers), key=lambda b: b.size)
    proxy.cut_blobs, proxy.cut_after = 2, 100_000
    async with resolver() as r:
        data = await r.fetcher(f"{proxy.host}/faults/app:v1").fetch_bytes(blob.descriptor())
    assert data == blob.data
    ranges = [rng for method, path, rng in proxy.requests if blob.digest in path]
    assert ranges == ["", "bytes=100000-", "bytes=200000-"]


async def test_registry_ignoring_range_is_skipped_forward(proxy: FaultyProxy, image: Image) -> None:
    blob = max((layer.blob for layer in image.layers), key=lambda b: b.size)
    proxy.ignore_range = True
    async with resolver() as r:
        fetcher = r.fetcher(f"{proxy.host}/faults/app:v1")
        tail = b"".join([chunk async for chunk in fetcher.fetch(blob.descriptor(), offset=12345)])
        proxy.cut_blobs, proxy.cut_after = 1, 50_000
        whole = await fetcher.fetch_bytes(blob.descriptor())
    assert tail == blob.data[12345:]
    assert whole == blob.data


async def test_resets_mid_body_are_bounded(proxy: FaultyProxy, image: Image) -> None:
    blob = max((layer.blob for layer in image.layers), key=lambda b: b.size)
    proxy.cut_blobs, proxy.cut_after = 100, 1000
    async with resolver() as r:
        with pytest.raises(Unavailable, match=f"{blob.digest}.*failed at byte"):
            await r.fetcher(f"{proxy.host}/faults/app:v1").fetch_bytes(blob.descriptor())


async def test_corrupted_bytes_are_detected(proxy: FaultyProxy, image: Image) -> None:
    """The proxy flips a byte of every blob: fetch_bytes refuses it, and a caller streaming with
    verify_stream gets the error at the end of the stream (before it commits anything)."""
    blob = image.layers[0].blob
    proxy.corrupt_blobs = True
    async with resolver() as r:
        fetcher = r.fetcher(f"{proxy.host}/faults/app:v1")
        with pytest.raises(FailedPrecondition, match=f"{blob.digest}: content digest mismatch"):
            await fetcher.fetch_bytes(blob.descriptor())
        received = bytearray()

        async def consume() -> None:
            async for chunk in verify_stream(blob.descriptor(), fetcher.fetch(blob.descriptor())):
                received.extend(chunk)

        with pytest.raises(FailedPrecondition, match="digest mismatch"):
            await consume()
        assert len(received) == blob.size
        assert bytes(received) != blob.data


async def test_streamed_upload_is_not_replayed(proxy: FaultyProxy) -> None:
    """A 5xx on a streamed PUT cannot be retried (the body was consumed): Unavailable, once."""
    image = generated_image(seed=32, layers=1)
    blob = image.layers[0].blob
    async with resolver() as r:
        pusher = r.pusher(f"{proxy.host}/faults/upload:v1")
        assert not await pusher.exists(blob.descriptor())
        proxy.requests.clear()

        async def chunks() -> AsyncIterator[bytes]:
            yield blob.data

        proxy.fail_next, proxy.fail_methods = 5, {"PUT"}
        with pytest.raises(Unavailable, match="registry unavailable"):
            await pusher.push_blob(blob.descriptor(), chunks())
        assert not await pusher.exists(blob.descriptor())
    assert [method for method, _, _ in proxy.requests] == ["POST", "PUT", "HEAD"]


def test_retry_policy_backoff() -> None:
    policy = RetryPolicy(attempts=5, base_delay=0.1, max_delay=1.0)
    assert [policy.delay(n) for n in (1, 2, 3, 4, 5)] == [0.1, 0.2, 0.4, 0.8, 1.0]
    assert policy.delay(1, "0") == 0.0
    assert policy.delay(1, " 3 ") == 1.0
    assert policy.delay(2, "Wed, 21 Oct 2015 07:28:00 GMT") == 0.2
