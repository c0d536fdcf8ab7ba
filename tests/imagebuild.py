"""Build OCI images in Python for tests: nothing comes from the internet, and every build is reproducible
(fixed timestamps and owners, gzip without a name or time), so equal inputs give equal digests.

Layers are lists of :class:`Entry` (files, directories, symlinks, hardlinks, whiteouts, opaque
directories) turned into tar, then compressed (``"gzip"``, ``"zstd"`` or ``""``)::

    image = busybox_image()                                  # /bin/busybox + applet symlinks + /etc/passwd
    image = generated_image(seed=1, layers=4)                # random files, modifications, whiteouts
    index = multi_platform_index(seed=2)                     # amd64 + arm64 images with different content
    image = make_image([make_layer(entries, "zstd")], docker=False)
    image.expected_tree()                                    # path -> Entry after applying every layer

    write_oci_layout(tmp / "layout", {"v1": image, "multi": index})
    write_oci_archive(tmp / "image.tar", {"v1": image})      # an ``oci-archive:`` tarball
    skopeo_copy(tmp / "layout", "v1", registry.ref("busybox", "v1"))   # push with skopeo (v2s2 optional)
    skopeo_push(index, registry.ref("multi", "v1"), tmp)     # any media types, through a dir: layout
    await push_image(resolver.pusher(ref), image, tag="v1")  # push with berth's own client

``docker=True`` builds Docker schema 2 media types (manifest list, manifest, config, ``tar.gzip``/``tar``
layers); Docker has no zstd layer type.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import io
import json
import random
import shutil
import subprocess
import tarfile
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import zstandard

from berth.core.oci import (
    DOCKER_CONFIG,
    DOCKER_LAYER,
    DOCKER_LAYER_GZIP,
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
    OCI_CONFIG,
    OCI_INDEX,
    OCI_LAYER,
    OCI_LAYER_GZIP,
    OCI_LAYER_ZSTD,
    OCI_MANIFEST,
    Descriptor,
    Platform,
)
from berth.plugins.images.registry import Pusher

BUSYBOX = Path("/bin/busybox")
AMD64 = Platform(os="linux", architecture="amd64")
ARM64 = Platform(os="linux", architecture="arm64")
REF_NAME_ANNOTATION = "org.opencontainers.image.ref.name"
EPOCH = 0
Compression = Literal["gzip", "zstd", ""]
Kind = Literal["file", "dir", "symlink", "hardlink", "whiteout", "opaque"]


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class Blob:
    """Bytes with a media type."""

    media_type: str
    data: bytes

    @functools.cached_property
    def digest(self) -> str:
        return sha256(self.data)

    @property
    def size(self) -> int:
        return len(self.data)

    def descriptor(self, platform: Platform | None = None, annotations: Mapping[str, str] | None = None) -> Descriptor:
        return Descriptor(media_type=self.media_type, digest=self.digest, size=self.size, platform=platform,
                          annotations=dict(annotations or {}))


@dataclass(frozen=True)
class Entry:
    """One layer entry. ``path`` is relative (``etc/passwd``); ``target`` is a symlink's or hardlink's
    target; ``whiteout`` deletes ``path`` from lower layers, ``opaque`` hides a directory's lower content."""

    path: str
    kind: Kind = "file"
    data: bytes = b""
    mode: int = 0o644
    target: str = ""
    uid: int = 0
    gid: int = 0


def file(path: str, data: bytes, mode: int = 0o644) -> Entry:
    return Entry(path, "file", data, mode)


def directory(path: str, mode: int = 0o755) -> Entry:
    return Entry(path, "dir", mode=mode)


def symlink(path: str, target: str) -> Entry:
    return Entry(path, "symlink", mode=0o777, target=target)


def hardlink(path: str, target: str) -> Entry:
    return Entry(path, "hardlink", target=target)


def whiteout(path: str) -> Entry:
    return Entry(path, "whiteout")


def opaque(path: str) -> Entry:
    return Entry(path, "opaque")


def layer_tar(entries: Iterable[Entry]) -> bytes:
    """A deterministic tar of ``entries`` in the given order (whiteouts as ``.wh.`` files)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for entry in entries:
            parent, _, base = entry.path.rstrip("/").rpartition("/")
            name = entry.path.rstrip("/")
            info = tarfile.TarInfo()
            info.mtime, info.uid, info.gid, info.mode = EPOCH, entry.uid, entry.gid, entry.mode
            data = None
            if entry.kind == "file":
                info.type, info.size, data = tarfile.REGTYPE, len(entry.data), io.BytesIO(entry.data)
            elif entry.kind == "dir":
                info.type = tarfile.DIRTYPE
            elif entry.kind == "symlink":
                info.type, info.linkname = tarfile.SYMTYPE, entry.target
            elif entry.kind == "hardlink":
                info.type, info.linkname = tarfile.LNKTYPE, entry.target
            elif entry.kind == "whiteout":
                name = f"{parent}/.wh.{base}" if parent else f".wh.{base}"
                info.type, info.mode = tarfile.REGTYPE, 0o644
            else:
                name, info.type, info.mode = f"{name}/.wh..wh..opq", tarfile.REGTYPE, 0o644
            info.name = name
            tar.addfile(info, data)
    return buffer.getvalue()


def compress(data: bytes, compression: Compression) -> bytes:
    if compression == "gzip":
        return gzip.compress(data, compresslevel=6, mtime=0)
    if compression == "zstd":
        return zstandard.ZstdCompressor(level=3).compress(data)
    return data


@dataclass(frozen=True)
class Layer:
    """A layer: its entries, uncompressed tar (``diff_id``) and the compressed blob."""

    entries: tuple[Entry, ...]
    tar: bytes
    blob: Blob
    compression: Compression

    @property
    def diff_id(self) -> str:
        return sha256(self.tar)


_LAYER_TYPES = {(False, "gzip"): OCI_LAYER_GZIP, (False, "zstd"): OCI_LAYER_ZSTD, (False, ""): OCI_LAYER,
                (True, "gzip"): DOCKER_LAYER_GZIP, (True, ""): DOCKER_LAYER}


def make_layer(entries: Iterable[Entry], compression: Compression = "gzip", *, docker: bool = False) -> Layer:
    """A layer of ``entries``. Raises ValueError for zstd with ``docker`` (no such Docker type)."""
    entries = tuple(entries)
    if (docker, compression) not in _LAYER_TYPES:
        raise ValueError(f"no Docker media type for a {compression} layer")
    tar = layer_tar(entries)
    return Layer(entries, tar, Blob(_LAYER_TYPES[docker, compression], compress(tar, compression)), compression)


@dataclass(frozen=True)
class Image:
    """An image: manifest, config and layers (``platform`` goes into index entries)."""

    manifest: Blob
    config: Blob
    layers: tuple[Layer, ...]
    platform: Platform

    @property
    def descriptor(self) -> Descriptor:
        return self.manifest.descriptor()

    def blobs(self) -> dict[str, Blob]:
        """Every blob of the image, by digest (config and layers, then the manifest)."""
        result = {self.config.digest: self.config}
        result.update({layer.blob.digest: layer.blob for layer in self.layers})
        result[self.manifest.digest] = self.manifest
        return result

    def expected_tree(self) -> dict[str, Entry]:
        """What unpacking every layer in order leaves: path -> the entry that wrote it (whiteouts applied)."""
        return apply_layers(layer.entries for layer in self.layers)


@dataclass(frozen=True)
class ImageIndex:
    """A multi-platform index (OCI image index or Docker manifest list) and its images."""

    index: Blob
    images: tuple[Image, ...]

    @property
    def descriptor(self) -> Descriptor:
        return self.index.descriptor()

    def blobs(self) -> dict[str, Blob]:
        result: dict[str, Blob] = {}
        for image in self.images:
            result.update(image.blobs())
        result[self.index.digest] = self.index
        return result


def _json(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def make_image(layers: Sequence[Layer], *, platform: Platform = AMD64, docker: bool = False,
               config: Mapping[str, Any] | None = None) -> Image:
    """An image of ``layers`` for ``platform``. ``config`` goes into the config's ``config`` object
    (``Env``, ``Cmd``, ``Entrypoint``, ``WorkingDir``, ...; default: a PATH and ``/bin/sh``)."""
    image_config: dict[str, Any] = {
        "created": "1970-01-01T00:00:00Z",
        "architecture": platform.architecture,
        "os": platform.os,
        "config": dict(config if config is not None else {
            "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"], "Cmd": ["/bin/sh"]}),
        "rootfs": {"type": "layers", "diff_ids": [layer.diff_id for layer in layers]},
        "history": [{"created": "1970-01-01T00:00:00Z", "created_by": f"berth imagebuild layer {i}"}
                    for i in range(len(layers))],
    }
    if platform.variant:
        image_config["variant"] = platform.variant
    config_blob = Blob(DOCKER_CONFIG if docker else OCI_CONFIG, _json(image_config))
    manifest = {
        "schemaVersion": 2,
        "mediaType": DOCKER_MANIFEST if docker else OCI_MANIFEST,
        "config": config_blob.descriptor().to_wire(),
        "layers": [layer.blob.descriptor().to_wire() for layer in layers],
    }
    manifest_blob = Blob(DOCKER_MANIFEST if docker else OCI_MANIFEST, _json(manifest))
    return Image(manifest_blob, config_blob, tuple(layers), platform)


def make_index(images: Sequence[Image], *, docker: bool = False) -> ImageIndex:
    """An index (a Docker manifest list with ``docker``) of ``images``, each entry with its platform."""
    media_type = DOCKER_MANIFEST_LIST if docker else OCI_INDEX
    index = {"schemaVersion": 2, "mediaType": media_type,
             "manifests": [image.manifest.descriptor(image.platform).to_wire() for image in images]}
    return ImageIndex(Blob(media_type, _json(index)), tuple(images))


def apply_layers(layers: Iterable[Iterable[Entry]]) -> dict[str, Entry]:
    """The overlay model: each layer over the lower ones. A layer's whiteouts apply to the lower layers
    only (a whiteout removes a path and what is under it; an opaque directory hides the lower content
    below it), then its other entries are added (a non-directory replaces whatever was at its path). A
    hardlink's entry in the result carries the data and mode of its target at the time it was linked."""
    tree: dict[str, Entry] = {}
    for entries in layers:
        entries = list(entries)
        for entry in entries:
            path = entry.path.rstrip("/")
            if entry.kind == "whiteout":
                for existing in [p for p in tree if p == path or p.startswith(path + "/")]:
                    del tree[existing]
            elif entry.kind == "opaque":
                for existing in [p for p in tree if p.startswith(path + "/")]:
                    del tree[existing]
        for entry in entries:
            path = entry.path.rstrip("/")
            if entry.kind == "opaque" and tree.get(path, Entry(path, "file")).kind != "dir":
                # The marker lives inside the directory, so the directory is part of this layer: it stays
                # (empty) even when the same layer also whites out the lower one (OCI: a whiteout never
                # hides what its own layer holds).
                tree[path] = Entry(path, "dir", mode=0o755)
            if entry.kind in ("whiteout", "opaque"):
                continue
            if entry.kind != "dir":
                for existing in [p for p in tree if p.startswith(path + "/")]:
                    del tree[existing]
            if entry.kind == "hardlink":
                # A hardlink keeps the bytes its target had: replacing the target later breaks the link.
                linked = tree.get(entry.target.rstrip("/"))
                entry = Entry(path, "hardlink", linked.data if linked else b"", linked.mode if linked else 0o644,
                              entry.target, entry.uid, entry.gid)
            tree[path] = entry
    return tree


# ------------------------------------------------------------------------------------------------
# Ready-made images


def busybox_entries(extra: Iterable[Entry] = ()) -> list[Entry]:
    """A minimal busybox root filesystem from Debian's busybox-static: ``/bin/busybox``, a symlink per
    applet (``bin/sh -> /bin/busybox``, ...), ``/etc/passwd``, ``/etc/group`` and the usual directories."""
    applets = subprocess.run([str(BUSYBOX), "--list-full"], check=True, capture_output=True,
                             text=True).stdout.split()
    dirs = ["bin", "dev", "etc", "home", "proc", "root", "sbin", "sys", "usr", "usr/bin", "usr/sbin", "var"]
    entries = [directory(d) for d in dirs] + [Entry("tmp", "dir", mode=0o1777)]
    entries.append(file("bin/busybox", BUSYBOX.read_bytes(), 0o755))
    entries += [symlink(applet, "/bin/busybox") for applet in sorted(set(applets)) if applet != "bin/busybox"]
    entries.append(file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n"
                                      b"nobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"))
    entries.append(file("etc/group", b"root:x:0:\nnogroup:x:65534:\n"))
    entries += list(extra)
    return entries


@functools.lru_cache(maxsize=8)
def busybox_image(compression: Compression = "gzip", *, docker: bool = False,
                  platform: Platform = AMD64) -> Image:
    """A one-layer busybox image (cached: the build compresses 2 MB)."""
    return make_image([make_layer(busybox_entries(), compression, docker=docker)], platform=platform,
                      docker=docker)


def generated_layers(seed: int, count: int = 3, *, files: int = 6, max_size: int = 64 << 10) -> list[list[Entry]]:
    """``count`` layers of random content: new files (some incompressible, some text), modified files,
    whiteouts of earlier files and directories, an opaque directory, symlinks and a hardlink."""
    rng = random.Random(seed)
    layers: list[list[Entry]] = []
    existing: list[str] = []
    for index in range(count):
        base = f"data/l{index}"
        entries = [directory("data"), directory(base), directory(f"{base}/sub")]
        for n in range(files):
            size = rng.randint(0, max_size)
            data = rng.randbytes(size) if n % 2 else (f"layer {index} file {n}\n" * (size // 16 + 1)).encode()
            path = f"{base}/{'sub/' if n % 3 == 0 else ''}f{n}"
            entries.append(file(path, data, rng.choice([0o644, 0o600, 0o755])))
            existing.append(path)
        entries.append(symlink(f"{base}/link", "f1"))
        entries.append(hardlink(f"{base}/hard", f"{base}/f1"))
        if index > 0:
            lower = [p for p in existing if not p.startswith(base) and "/sub/" not in p]
            changed, removed = rng.sample(lower, 2)
            entries.append(file(changed, f"changed in layer {index}\n".encode()))
            entries.append(whiteout(removed))
            existing.remove(removed)
            entries.append(opaque(f"data/l{index - 1}/sub"))
            existing = [p for p in existing if not p.startswith(f"data/l{index - 1}/sub/")]
        if index == count - 1 and count > 1:
            entries.append(whiteout("data/l0/sub"))
        layers.append(entries)
    return layers


def generated_image(seed: int, layers: int = 3, *, compression: Compression = "gzip", docker: bool = False,
                    platform: Platform = AMD64, files: int = 6, max_size: int = 64 << 10) -> Image:
    """A multi-layer image of :func:`generated_layers`."""
    built = [make_layer(entries, compression, docker=docker)
             for entries in generated_layers(seed, layers, files=files, max_size=max_size)]
    return make_image(built, platform=platform, docker=docker)


def multi_platform_index(seed: int, *, docker: bool = False, compression: Compression = "gzip") -> ImageIndex:
    """An index of an amd64 and an arm64 image with different content (and a marker file naming the
    platform at ``etc/platform``)."""
    images = []
    for offset, platform in enumerate((AMD64, ARM64)):
        entries = generated_layers(seed + offset, 2, files=3, max_size=8 << 10)
        entries[-1].append(file("etc/platform", f"{platform}\n".encode()))
        built = [make_layer(e, compression, docker=docker) for e in ([directory("etc")], *entries)]
        images.append(make_image(built, platform=platform, docker=docker))
    return make_index(images, docker=docker)


# ------------------------------------------------------------------------------------------------
# Layouts, archives and pushes


def write_oci_layout(directory_path: Path, images: Mapping[str, Image | ImageIndex]) -> Path:
    """Write an OCI image layout with ``images`` named by tag (``org.opencontainers.image.ref.name``);
    an existing layout is replaced. Returns the directory."""
    if directory_path.exists():
        shutil.rmtree(directory_path)
    blobs_dir = directory_path / "blobs" / "sha256"
    blobs_dir.mkdir(parents=True)
    (directory_path / "oci-layout").write_bytes(_json({"imageLayoutVersion": "1.0.0"}))
    manifests = []
    for tag, image in images.items():
        for digest, blob in image.blobs().items():
            (blobs_dir / digest.partition(":")[2]).write_bytes(blob.data)
        desc = image.descriptor
        manifests.append(Descriptor(media_type=desc.media_type, digest=desc.digest, size=desc.size,
                                    annotations={REF_NAME_ANNOTATION: tag}).to_wire())
    (directory_path / "index.json").write_bytes(_json({"schemaVersion": 2, "mediaType": OCI_INDEX,
                                                       "manifests": manifests}))
    return directory_path


def write_oci_archive(path: Path, images: Mapping[str, Image | ImageIndex]) -> Path:
    """Write ``images`` as an OCI layout tarball (what ``skopeo copy oci-archive:PATH:TAG`` reads)."""
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        def add(name: str, data: bytes) -> None:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), EPOCH, 0o644
            tar.addfile(info, io.BytesIO(data))

        add("oci-layout", _json({"imageLayoutVersion": "1.0.0"}))
        manifests = []
        seen: set[str] = set()
        for tag, image in images.items():
            for digest, blob in image.blobs().items():
                if digest not in seen:
                    seen.add(digest)
                    add(f"blobs/sha256/{digest.partition(':')[2]}", blob.data)
            wire = image.descriptor.to_wire()
            wire["annotations"] = {REF_NAME_ANNOTATION: tag}
            manifests.append(wire)
        add("index.json", _json({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests}))
    return path


def _skopeo(arguments: Sequence[str]) -> str:
    command = ["skopeo", "--insecure-policy", *arguments]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    if result.returncode != 0:
        raise subprocess.CalledProcessError(result.returncode, command, result.stdout,
                                            f"{result.stderr}\n(command: {' '.join(command)})")
    return result.stdout


def skopeo_copy(layout: Path, tag: str, destination: str, *, docker_format: bool = False,
                creds: Sequence[str] = (), extra: Sequence[str] = ()) -> None:
    """``skopeo copy`` the layout's ``tag`` to ``docker://<destination>`` over plain HTTP (``--all`` for
    indexes; ``docker_format`` converts to Docker v2s2 media types, which changes digests; otherwise
    digests are preserved). ``creds`` are skopeo options such as ``RegistryServer.skopeo_creds()``.

    Raises:
        subprocess.CalledProcessError: with skopeo's output (``str(err)`` does not show it: see ``.stderr``).
    """
    arguments = ["copy", "--quiet", "--dest-tls-verify=false", "--all", *creds]
    arguments += ["--format", "v2s2"] if docker_format else ["--preserve-digests"]
    _skopeo([*arguments, *extra, f"oci:{layout}:{tag}", f"docker://{destination}"])


def write_dir_layout(directory_path: Path, image: Image | ImageIndex) -> Path:
    """Write ``image`` in skopeo's ``dir:`` format (``manifest.json``, blobs by hex digest, an index's
    manifests as ``<hex>.manifest.json``). Unlike an OCI layout, it holds Docker media types too.
    An existing directory is replaced. Returns the directory."""
    if directory_path.exists():
        shutil.rmtree(directory_path)
    directory_path.mkdir(parents=True)
    (directory_path / "version").write_text("Directory Transport Version: 1.1\n")
    for digest, blob in image.blobs().items():
        (directory_path / digest.partition(":")[2]).write_bytes(blob.data)
    if isinstance(image, ImageIndex):
        (directory_path / "manifest.json").write_bytes(image.index.data)
        for item in image.images:
            (directory_path / f"{item.manifest.digest.partition(':')[2]}.manifest.json").write_bytes(item.manifest.data)
    else:
        (directory_path / "manifest.json").write_bytes(image.manifest.data)
    return directory_path


def skopeo_push(image: Image | ImageIndex, destination: str, workdir: Path, *, creds: Sequence[str] = ()) -> None:
    """Push ``image`` (any media types, an index with all its images) to ``docker://<destination>`` with
    skopeo, digests preserved, through a ``dir:`` layout written under ``workdir``.

    Raises:
        subprocess.CalledProcessError: see :func:`skopeo_copy`.
    """
    layout = write_dir_layout(workdir / f"dir-{image.descriptor.digest.partition(':')[2][:16]}", image)
    _skopeo(["copy", "--quiet", "--dest-tls-verify=false", "--all", "--preserve-digests", *creds,
             f"dir:{layout}", f"docker://{destination}"])


def skopeo_inspect(reference: str, *, raw: bool = False, config: bool = False,
                   creds: Sequence[str] = ()) -> Any:
    """``skopeo inspect --tls-verify=false docker://<reference>``: the parsed JSON (``raw``: the manifest
    exactly as stored, as bytes; ``config``: the image config)."""
    arguments = ["inspect", "--tls-verify=false", *creds]
    if raw:
        arguments.append("--raw")
    if config:
        arguments.append("--config")
    command = ["skopeo", "--insecure-policy", *arguments, f"docker://{reference}"]
    result = subprocess.run(command, capture_output=True, timeout=60)
    if result.returncode != 0:
        raise subprocess.CalledProcessError(result.returncode, command, result.stdout, result.stderr)
    return result.stdout if raw else json.loads(result.stdout)


async def _chunks(data: bytes, size: int = 256 << 10) -> AsyncIterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start:start + size]


async def push_image(pusher: Pusher, image: Image | ImageIndex, *, tag: str | None = None) -> dict[str, int]:
    """Push ``image`` (blobs, then manifests children first) with berth's own :class:`Pusher`, skipping
    blobs the repository has. Returns counts ``{"pushed": n, "skipped": n}``."""
    counts = {"pushed": 0, "skipped": 0}
    images = image.images if isinstance(image, ImageIndex) else (image,)
    for item in images:
        for blob in (item.config, *(layer.blob for layer in item.layers)):
            desc = blob.descriptor()
            if await pusher.exists(desc):
                counts["skipped"] += 1
                continue
            await pusher.push_blob(desc, _chunks(blob.data))
            counts["pushed"] += 1
        await pusher.push_manifest(item.descriptor, item.manifest.data,
                                   tag=tag if not isinstance(image, ImageIndex) else None)
    if isinstance(image, ImageIndex):
        await pusher.push_manifest(image.descriptor, image.index.data, tag=tag)
    return counts


__all__ = [
    "AMD64",
    "ARM64",
    "Blob",
    "Entry",
    "Image",
    "ImageIndex",
    "Layer",
    "apply_layers",
    "busybox_entries",
    "busybox_image",
    "compress",
    "directory",
    "file",
    "generated_image",
    "generated_layers",
    "hardlink",
    "layer_tar",
    "make_image",
    "make_index",
    "make_layer",
    "multi_platform_index",
    "opaque",
    "push_image",
    "skopeo_copy",
    "skopeo_inspect",
    "skopeo_push",
    "symlink",
    "whiteout",
    "write_dir_layout",
    "write_oci_archive",
    "write_oci_layout",
]
