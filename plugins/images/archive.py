"""Import and export of image archives: OCI image layout tarballs and ``docker save`` tarballs.

**Import** reads an archive that is itself a blob in the content store (the client uploads it with a
resumable ingest first), in one sequential pass: every ``blobs/<alg>/<hex>`` entry is written to the
content store verified against its name; a ``docker save`` layer (``<id>/layer.tar``) is written under the
digest of its bytes. Then ``index.json`` (OCI) or ``manifest.json`` (Docker; a Docker schema 2 manifest
and config are built for each entry, layer media types chosen by their compression) names the images.
An image is named by the ``io.containerd.image.name`` annotation, else by
``org.opencontainers.image.ref.name`` when it is a full reference, else by ``base_name`` plus that tag;
unnamed entries are imported as content only and reported as such.

**Export** writes an OCI image layout (``oci-layout``, ``index.json``, ``blobs/sha256/...``) plus Docker's
``manifest.json`` for ``docker load``, streaming every blob reachable from the named images straight from the
content store; for a multi-platform image only the manifests present locally are included.
"""

from __future__ import annotations

import hashlib
import io
import json
import posixpath
import tarfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import trio

from berth.core.content import Store, read_blob
from berth.core.errdefs import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from berth.core.oci import (
    DOCKER_CONFIG,
    DOCKER_LAYER,
    DOCKER_LAYER_GZIP,
    DOCKER_MANIFEST,
    MANIFEST_MEDIA_TYPES,
    OCI_INDEX,
    OCI_LAYER_ZSTD,
    Descriptor,
)
from berth.plugins.images.pull import Manifest, parse_index
from berth.plugins.images.reference import parse_reference
from berth.plugins.images.tree import present_tree, read_small

#: Small metadata files of an archive (index.json, manifest.json, ...) are capped at this size.
MAX_METADATA_SIZE = 4 << 20
ANNOTATION_IMAGE_NAME = "io.containerd.image.name"
ANNOTATION_REF_NAME = "org.opencontainers.image.ref.name"
_BLOCK = 1 << 20


@dataclass
class ImportedImage:
    name: str
    target: Descriptor


@dataclass
class ImportResult:
    images: list[ImportedImage] = field(default_factory=list)
    #: Manifests the archive lists without a usable name (imported as content only).
    unnamed: list[Descriptor] = field(default_factory=list)
    blobs: int = 0


class _ReaderFile(io.RawIOBase):
    """A read-only file over a content-store reader, for :mod:`tarfile` running in a worker thread: each
    read is a call back into the trio loop."""

    def __init__(self, read_at: Callable[[int, int], Awaitable[bytes]], size: int) -> None:
        self._read_at, self._size, self._offset = read_at, size, 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        want = min(len(view), self._size - self._offset)
        if want <= 0:
            return 0
        data = trio.from_thread.run(self._read_at, self._offset, want)
        view[:len(data)] = data
        self._offset += len(data)
        return len(data)


def _clean_name(name: str) -> str:
    cleaned = posixpath.normpath(name.lstrip("./") or ".")
    return "" if cleaned == "." else cleaned


def _blob_digest(path: str) -> str | None:
    parts = path.split("/")
    if len(parts) == 3 and parts[0] == "blobs" and parts[1] in ("sha256", "sha384", "sha512"):
        return f"{parts[1]}:{parts[2]}"
    return None


def _compression_of(head: bytes) -> str:
    if head.startswith(b"\x1f\x8b"):
        return "gzip"
    if head.startswith(b"\x28\xb5\x2f\xfd"):
        return "zstd"
    return ""


class ArchiveImporter:
    """Import one archive blob into a (namespaced) content store."""

    def __init__(self, content: Store) -> None:
        self.content = content

    async def run(self, archive_digest: str, *, base_name: str = "") -> ImportResult:
        """Import the archive blob ``archive_digest``.

        Raises:
            NotFound: the archive blob is not in the store.
            InvalidArgument: not a tar archive, neither layout (no ``index.json`` nor ``manifest.json``),
                a malformed metadata file, or a blob whose bytes do not match its name.
        """
        reader = await self.content.reader_at(archive_digest)
        try:
            metadata, layers = await trio.to_thread.run_sync(self._scan, reader)
        finally:
            await reader.close()
        result = ImportResult(blobs=len(layers))
        if "index.json" in metadata:
            await self._name_oci(metadata["index.json"], base_name, result)
        elif "manifest.json" in metadata:
            await self._import_docker(metadata["manifest.json"], layers, result)
        else:
            raise InvalidArgument("archive has neither index.json (OCI layout) nor manifest.json (docker save)")
        return result

    def _scan(self, reader: Any) -> tuple[dict[str, bytes], dict[str, tuple[str, int, str]]]:
        """(small metadata files by name, every blob/layer file -> (digest, size, compression)). Runs in a
        worker thread; writes go through the trio loop."""
        metadata: dict[str, bytes] = {}
        files: dict[str, tuple[str, int, str]] = {}
        source = io.BufferedReader(_ReaderFile(reader.read_at, reader.size), buffer_size=_BLOCK)
        try:
            with tarfile.open(fileobj=source, mode="r|") as archive:
                for member in archive:
                    name = _clean_name(member.name)
                    if not member.isfile() or not name:
                        continue
                    handle = archive.extractfile(member)
                    assert handle is not None
                    expected = _blob_digest(name)
                    if expected is None and "/" not in name and name.endswith(".json"):
                        if member.size > MAX_METADATA_SIZE:
                            raise InvalidArgument(f"archive file {name} is {member.size} bytes, over the "
                                                  f"{MAX_METADATA_SIZE}-byte limit")
                        metadata[name] = handle.read()
                        if name not in ("index.json", "manifest.json"):  # a docker save config
                            files[name] = self._ingest(io.BytesIO(metadata[name]), member.size, None, name)
                    elif expected is not None or name.endswith(".tar"):
                        files[name] = self._ingest(handle, member.size, expected, name)
        except tarfile.TarError as err:
            raise InvalidArgument(f"archive is not a valid tar file: {err}") from None
        return metadata, files

    def _ingest(self, handle: Any, size: int, expected: str | None, name: str) -> tuple[str, int, str]:
        """Write one archive file to the content store (from the scanning thread); return (digest, size,
        compression). A file under ``blobs/`` must hash to its name; others are stored under their hash."""
        run = trio.from_thread.run
        ref = f"import-{expected}" if expected else "import-" + hashlib.sha256(name.encode()).hexdigest()[:32]
        head = b""
        try:
            writer = run(partial(self.content.writer, ref, total=size, expected=expected or ""))
        except AlreadyExists:
            assert expected is not None
            return expected, size, _compression_of(handle.read(4))
        try:
            run(writer.truncate, 0)
            while block := handle.read(_BLOCK):
                head = head or block[:4]
                run(writer.write, block)
            digest = expected or writer.digest()
            try:
                run(writer.commit, size, digest)
            except AlreadyExists:
                pass
            except FailedPrecondition as err:
                run(self.content.abort, ref)
                raise InvalidArgument(f"archive file {name} does not match its digest {digest}: "
                                      f"{err.message}") from None
        finally:
            run(writer.close)
        return digest, size, _compression_of(head)

    async def _name_oci(self, data: bytes, base_name: str, result: ImportResult) -> None:
        index = Descriptor(media_type=OCI_INDEX, digest="sha256:" + hashlib.sha256(data).hexdigest(), size=len(data))
        for manifest in parse_index(data, index):
            await self._require(manifest)
            name = _image_name(manifest.annotations, base_name)
            if name:
                result.images.append(ImportedImage(name=name, target=_plain(manifest)))
            else:
                result.unnamed.append(manifest)

    async def _require(self, desc: Descriptor) -> None:
        try:
            await self.content.info(desc.digest)
        except NotFound:
            raise InvalidArgument(f"archive names {desc.digest} but does not contain it") from None

    async def _import_docker(self, data: bytes, files: Mapping[str, tuple[str, int, str]],
                             result: ImportResult) -> None:
        try:
            entries = json.loads(data)
        except ValueError as err:
            raise InvalidArgument(f"manifest.json is not valid JSON: {err}") from None
        if not isinstance(entries, list):
            raise InvalidArgument("manifest.json must be a list")
        for entry in entries:
            if not isinstance(entry, dict) or not isinstance(entry.get("Config"), str) \
                    or not isinstance(entry.get("Layers"), list):
                raise InvalidArgument("manifest.json entries need Config and Layers")
            config = self._docker_file(files, entry["Config"])
            layers = []
            for path in entry["Layers"]:
                digest, size, compression = self._docker_file(files, path)
                media_type = {"": DOCKER_LAYER, "gzip": DOCKER_LAYER_GZIP, "zstd": OCI_LAYER_ZSTD}[compression]
                layers.append({"mediaType": media_type, "digest": digest, "size": size})
            manifest = json.dumps({"schemaVersion": 2, "mediaType": DOCKER_MANIFEST,
                                   "config": {"mediaType": DOCKER_CONFIG, "digest": config[0], "size": config[1]},
                                   "layers": layers}, separators=(",", ":")).encode()
            target = Descriptor(media_type=DOCKER_MANIFEST, size=len(manifest),
                                digest="sha256:" + hashlib.sha256(manifest).hexdigest())
            await self._write_small(target, manifest)
            tags = entry.get("RepoTags") or []
            names = [parse_reference(tag).name() for tag in tags if isinstance(tag, str)]
            if names:
                result.images.extend(ImportedImage(name=name, target=target) for name in names)
            else:
                result.unnamed.append(target)

    @staticmethod
    def _docker_file(files: Mapping[str, tuple[str, int, str]], path: Any) -> tuple[str, int, str]:
        if not isinstance(path, str) or _clean_name(path) not in files:
            raise InvalidArgument(f"manifest.json names {path!r}, which the archive does not contain")
        return files[_clean_name(path)]

    async def _write_small(self, desc: Descriptor, data: bytes) -> None:
        try:
            writer = await self.content.writer(f"import-{desc.digest}", total=desc.size, expected=desc.digest)
        except AlreadyExists:
            return
        try:
            await writer.truncate(0)
            await writer.write(data)
            await writer.commit(desc.size, desc.digest)
        except AlreadyExists:
            pass
        finally:
            await writer.close()


def _plain(desc: Descriptor) -> Descriptor:
    return Descriptor(media_type=desc.media_type, digest=desc.digest, size=desc.size)


def _image_name(annotations: Mapping[str, str], base_name: str) -> str:
    if name := annotations.get(ANNOTATION_IMAGE_NAME):
        return parse_reference(name).name()
    ref_name = annotations.get(ANNOTATION_REF_NAME, "")
    if ref_name:
        if "/" in ref_name or (":" in ref_name and not ref_name.startswith(":")) or "@" in ref_name:
            try:
                return parse_reference(ref_name).name()
            except InvalidArgument:
                pass
        if base_name:
            return parse_reference(f"{base_name}:{ref_name}").name()
    return ""


class ArchiveExporter:
    """Stream an OCI image layout tar of some images from a (namespaced) content store."""

    def __init__(self, content: Store) -> None:
        self.content = content

    async def stream(self, images: Sequence[tuple[str, Descriptor]]) -> AsyncIterator[bytes]:
        """The archive's bytes, in chunks of up to 1 MiB. ``images`` are (name, target) pairs.

        Raises: NotFound when a needed blob is missing (before any byte is produced).
        """
        entries: list[Descriptor] = []
        blobs: dict[str, Descriptor] = {}
        docker_manifest: list[dict[str, Any]] = []
        for name, target in images:
            reachable = await present_tree(self.content, target)
            for desc in reachable:
                blobs.setdefault(desc.digest, desc)
            annotations = {ANNOTATION_IMAGE_NAME: name}
            tag = parse_reference(name).tag
            if tag:
                annotations[ANNOTATION_REF_NAME] = tag
            entries.append(Descriptor(media_type=target.media_type, digest=target.digest, size=target.size,
                                      annotations=annotations))
            for desc in reachable:
                if desc.media_type in MANIFEST_MEDIA_TYPES:
                    manifest = Manifest.parse(await read_small(self.content, desc), desc)
                    docker_manifest.append({
                        "Config": _blob_path(manifest.config.digest), "RepoTags": [name] if tag else [],
                        "Layers": [_blob_path(layer.digest) for layer in manifest.layers]})
                    break
        index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [e.to_wire() for e in entries]}
        now = int(time.time())
        layout = b'{"imageLayoutVersion":"1.0.0"}'
        for name, data in (("oci-layout", layout), ("index.json", json.dumps(index).encode()),
                           ("manifest.json", json.dumps(docker_manifest).encode())):
            yield _file_header(name, len(data), now)
            yield _padded(data)
        yield _dir_header("blobs/", now)
        yield _dir_header("blobs/sha256/", now)
        for desc in blobs.values():
            yield _file_header(_blob_path(desc.digest), desc.size, now)
            async for chunk in read_blob(self.content, desc.digest, chunk_size=_BLOCK):
                yield chunk
            if desc.size % tarfile.BLOCKSIZE:
                yield b"\0" * (tarfile.BLOCKSIZE - desc.size % tarfile.BLOCKSIZE)
        yield b"\0" * (2 * tarfile.BLOCKSIZE)


def _blob_path(digest: str) -> str:
    algorithm, _, encoded = digest.partition(":")
    return f"blobs/{algorithm}/{encoded}"


def _file_header(name: str, size: int, mtime: int) -> bytes:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, mtime, 0o644
    return info.tobuf(format=tarfile.PAX_FORMAT)


def _dir_header(name: str, mtime: int) -> bytes:
    info = tarfile.TarInfo(name)
    info.type, info.mtime, info.mode = tarfile.DIRTYPE, mtime, 0o755
    return info.tobuf(format=tarfile.PAX_FORMAT)


def _padded(data: bytes) -> bytes:
    remainder = len(data) % tarfile.BLOCKSIZE
    return data + (b"\0" * (tarfile.BLOCKSIZE - remainder) if remainder else b"")


__all__ = ["ArchiveExporter", "ArchiveImporter", "ImportResult", "ImportedImage"]
