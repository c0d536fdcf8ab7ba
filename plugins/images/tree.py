"""Walking an image's tree of blobs in the content store (for export, push and ``images check``)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from berth.core.content import Store
from berth.core.errdefs import InvalidArgument, NotFound
from berth.core.oci import INDEX_MEDIA_TYPES, MANIFEST_MEDIA_TYPES, Descriptor, Platform, chain_ids
from berth.plugins.images.pull import (
    MAX_CONFIG_SIZE,
    MAX_MANIFEST_SIZE,
    Manifest,
    parse_diff_ids,
    parse_index,
    select_manifests,
)


async def read_small(content: Store, desc: Descriptor, limit: int = MAX_MANIFEST_SIZE) -> bytes:
    """The whole blob of a manifest, index or config.

    Raises: NotFound; InvalidArgument when it is over ``limit`` bytes.
    """
    if desc.size > limit:
        raise InvalidArgument(f"{desc.digest} is {desc.size} bytes, over the {limit}-byte limit")
    reader = await content.reader_at(desc.digest)
    try:
        return await reader.read_at(0, desc.size)
    finally:
        await reader.close()


async def present_tree(content: Store, target: Descriptor) -> list[Descriptor]:
    """Every blob reachable from ``target`` that is present, parents before children. A manifest of an
    index that is absent (another platform, not pulled) is left out; a missing config or layer of a
    present manifest, or a missing ``target``, is an error.

    Raises: NotFound naming the missing blob; InvalidArgument for a malformed manifest or index.
    """
    found: list[Descriptor] = []
    seen: set[str] = set()

    async def visit(desc: Descriptor, optional: bool) -> None:
        if desc.digest in seen:
            return
        try:
            await content.info(desc.digest)
        except NotFound:
            if optional:
                return
            raise NotFound(f"blob {desc.digest} ({desc.media_type}) is not in the content store") from None
        seen.add(desc.digest)
        found.append(desc)
        if desc.media_type in INDEX_MEDIA_TYPES:
            for child in parse_index(await read_small(content, desc), desc):
                await visit(child, True)
        elif desc.media_type in MANIFEST_MEDIA_TYPES:
            manifest = Manifest.parse(await read_small(content, desc), desc)
            for child in (manifest.config, *manifest.layers):
                await visit(child, False)

    await visit(target, False)
    return found


@dataclass(frozen=True, kw_only=True)
class ImageConfig:
    """What running an image needs: its config document and the snapshot its layers unpack to."""

    manifest: Descriptor
    config: dict[str, Any]
    #: The chain ID of the top layer: the name of the committed snapshot to build a container on.
    chain_id: str


async def image_config(content: Store, target: Descriptor, platform: Platform | None = None) -> ImageConfig:
    """Resolve ``target`` (an index picks the manifest for ``platform``, the host's by default) to its
    config and top chain ID.

    Raises: NotFound (no manifest for the platform, a missing blob); InvalidArgument (a malformed
    manifest, index or config, or an image without layers).
    """
    desc = target
    for _ in range(8):  # an index of indexes is allowed; a loop of them is not
        if desc.media_type not in INDEX_MEDIA_TYPES:
            break
        _, best = select_manifests(parse_index(await read_small(content, desc), desc), platform,
                                   all_platforms=False)
        assert best is not None
        desc = best
    if desc.media_type not in MANIFEST_MEDIA_TYPES:
        raise InvalidArgument(f"{desc.digest} is a {desc.media_type}, not an image manifest")
    manifest = Manifest.parse(await read_small(content, desc), desc)
    data = await read_small(content, manifest.config, MAX_CONFIG_SIZE)
    diff_ids = parse_diff_ids(data, manifest.config)
    if not diff_ids:
        raise InvalidArgument(f"image config {manifest.config.digest} has no layers")
    config = json.loads(data)
    return ImageConfig(manifest=desc, config=config, chain_id=chain_ids(diff_ids)[-1])
