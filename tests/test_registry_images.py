"""The test image builder (``tests/imagebuild.py``) checked against real tools: umoci unpacks what it builds
into exactly the tree its overlay model predicts, busybox runs from the unpacked rootfs, skopeo accepts its
OCI archives, and builds are reproducible."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest
import trio
import zstandard
from imagebuild import (
    Entry,
    Image,
    apply_layers,
    busybox_image,
    directory,
    file,
    generated_image,
    make_layer,
    multi_platform_index,
    opaque,
    symlink,
    whiteout,
    write_oci_archive,
    write_oci_layout,
)
from registry_fixture import RegistryServer

from berth.plugins.images.hosts import RegistryHosts
from berth.plugins.images.registry import Resolver


def umoci_unpack(image: Image, tmp_path: Path) -> Path:
    layout = write_oci_layout(tmp_path / "layout", {"v1": image})
    bundle = tmp_path / "bundle"
    subprocess.run(["umoci", "unpack", "--image", f"{layout}:v1", str(bundle)], check=True, capture_output=True,
                   timeout=120)
    return bundle / "rootfs"


def tree_of(root: Path) -> dict[str, os.stat_result]:
    found = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            found[str(path.relative_to(root))] = path.lstat()
    return found


def test_generated_image_unpacks_as_the_model_says(tmp_path: Path) -> None:
    image = generated_image(seed=61, layers=4)
    root = umoci_unpack(image, tmp_path)
    expected = image.expected_tree()
    actual = tree_of(root)
    assert sorted(actual) == sorted(expected)
    for path, entry in expected.items():
        st = actual[path]
        if entry.kind == "file":
            assert (root / path).read_bytes() == entry.data, path
            assert stat.S_IMODE(st.st_mode) == entry.mode, path
        elif entry.kind == "symlink":
            assert os.readlink(root / path) == entry.target, path
        elif entry.kind == "hardlink":
            assert (root / path).read_bytes() == entry.data, path
            target = expected[entry.target]
            assert (st.st_ino == actual[entry.target].st_ino) == (target.data == entry.data), path
        else:
            assert stat.S_ISDIR(st.st_mode), path
    whiteouts = [e for layer in image.layers for e in layer.entries if e.kind in ("whiteout", "opaque")]
    assert len(whiteouts) >= 4


def test_busybox_image_runs_from_its_rootfs(tmp_path: Path) -> None:
    root = umoci_unpack(busybox_image(), tmp_path)
    assert os.readlink(root / "bin" / "sh") == "/bin/busybox"
    assert (root / "etc" / "passwd").read_text().startswith("root:x:0:0:")
    result = subprocess.run([str(root / "bin" / "busybox"), "sh", "-c", "echo hello from busybox"],
                            check=True, capture_output=True, text=True)
    assert result.stdout == "hello from busybox\n"


def test_overlay_model_whiteouts_apply_to_lower_layers_only() -> None:
    tree = apply_layers([
        [directory("a"), file("a/x", b"1"), file("a/y", b"2"), file("b", b"3")],
        [opaque("a"), file("a/z", b"4"), whiteout("b"), file("b", b"5")],
    ])
    assert {path: entry.data for path, entry in tree.items()} == {"a": b"", "a/z": b"4", "b": b"5"}


def test_builds_are_reproducible_and_compressions_distinct() -> None:
    assert generated_image(seed=62).descriptor == generated_image(seed=62).descriptor
    assert generated_image(seed=62).descriptor != generated_image(seed=63).descriptor
    entries = [directory("d"), file("d/f", b"data" * 1000), symlink("d/l", "f")]
    gzip_layer, zstd_layer, plain = (make_layer(entries, c) for c in ("gzip", "zstd", ""))
    assert gzip_layer.diff_id == zstd_layer.diff_id == plain.diff_id
    assert zstandard.ZstdDecompressor().decompress(zstd_layer.blob.data) == plain.tar
    assert plain.blob.data == plain.tar
    with pytest.raises(ValueError, match="no Docker media type"):
        make_layer([Entry("f")], "zstd", docker=True)


async def test_oci_archive_is_accepted_by_skopeo(registry: RegistryServer, tmp_path: Path) -> None:
    index = multi_platform_index(seed=64)
    archive = write_oci_archive(tmp_path / "image.tar", {"multi": index, "one": index.images[0]})
    ref = registry.ref("archive/multi", "v1")
    await trio.run_process(["skopeo", "--insecure-policy", "copy", "--quiet", "--all", "--preserve-digests",
                            "--dest-tls-verify=false", f"oci-archive:{archive}:multi", f"docker://{ref}"],
                           capture_stdout=True, capture_stderr=True)
    async with Resolver(RegistryHosts(), plain_http=True) as r:
        _, desc = await r.resolve(ref)
    assert desc == index.descriptor
