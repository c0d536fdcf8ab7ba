"""Tar layers for the differ tests and benchmark: a small builder, compressors, and a corpus of malicious layers.

``build_layer([Entry(...), ...])`` writes a PAX tar in the given order (duplicates and hostile names
included: nothing is cleaned). :data:`MALICIOUS` lists layers that each try one way out of the snapshot;
``offender`` is the entry the differ must name when it refuses the layer. :func:`generated_tree` makes
a reproducible mix of many small files and a few big ones (for the benchmark and round trips).
"""

from __future__ import annotations

import io
import random
import tarfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from imagebuild import compress  # one compressor for every test image and layer

__all__ = ["CONTAINED", "MALICIOUS", "Contained", "Entry", "Malicious", "build_layer", "compress", "generated_tree"]

_TYPES = {
    "file": tarfile.REGTYPE, "dir": tarfile.DIRTYPE, "symlink": tarfile.SYMTYPE, "hardlink": tarfile.LNKTYPE,
    "fifo": tarfile.FIFOTYPE, "char": tarfile.CHRTYPE, "block": tarfile.BLKTYPE,
}


@dataclass(frozen=True, slots=True)
class Entry:
    """One tar entry. ``kind``: file, dir, symlink, hardlink, fifo, char or block."""

    name: str
    kind: str = "file"
    data: bytes = b""
    mode: int = -1
    uid: int = 0
    gid: int = 0
    mtime: float = 1_700_000_000
    link: str = ""
    xattrs: dict[str, bytes] = field(default_factory=dict)
    major: int = 0
    minor: int = 0


def build_layer(entries: Iterable[Entry]) -> bytes:
    """A PAX tar of ``entries`` in order (ends with the two zero blocks)."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT, encoding="utf-8",
                      errors="surrogateescape") as archive:
        for entry in entries:
            info = tarfile.TarInfo(entry.name)
            info.type = _TYPES[entry.kind]
            info.mode = entry.mode if entry.mode >= 0 else (0o755 if entry.kind == "dir" else 0o644)
            info.uid, info.gid, info.mtime = entry.uid, entry.gid, entry.mtime
            info.linkname = entry.link
            info.devmajor, info.devminor = entry.major, entry.minor
            if entry.xattrs:
                info.pax_headers = {f"SCHILY.xattr.{key}": value.decode("utf-8", "surrogateescape")
                                    for key, value in entry.xattrs.items()}
            if entry.kind == "file":
                info.size = len(entry.data)
                archive.addfile(info, io.BytesIO(entry.data))
            else:
                archive.addfile(info)
    return out.getvalue()


@dataclass(frozen=True, slots=True)
class Malicious:
    """A layer trying to escape; ``offender`` is the name of the entry that must be refused."""

    id: str
    entries: Sequence[Entry]
    offender: str


_LONG = "x" * 300

#: Every escape of issue 5 item 4, one layer each.
MALICIOUS: tuple[Malicious, ...] = (
    Malicious("dotdot", [Entry("../x", data=b"out")], "../x"),
    Malicious("dotdot-deep", [Entry("a", "dir"), Entry("a/../../x", data=b"out")], "a/../../x"),
    Malicious("dotdot-dir", [Entry("../canary-dir", "dir")], "../canary-dir"),
    Malicious("absolute", [Entry("/abs", data=b"out")], "/abs"),
    Malicious("absolute-etc", [Entry("/etc/x", data=b"out")], "/etc/x"),
    Malicious("symlink-up", [Entry("l", "symlink", link="../../.."), Entry("l/x", data=b"out")], "l/x"),
    Malicious("symlink-up-nested", [Entry("d", "dir"), Entry("d/l", "symlink", link="../.."),
                                    Entry("d/l/x", data=b"out")], "d/l/x"),
    Malicious("symlink-chain", [Entry("a", "symlink", link="b"), Entry("b", "symlink", link="../.."),
                                Entry("a/x", data=b"out")], "a/x"),
    Malicious("symlink-loop", [Entry("a", "symlink", link="b"), Entry("b", "symlink", link="a"),
                               Entry("a/x", data=b"out")], "a/x"),
    Malicious("hardlink-up", [Entry("h", "hardlink", link="../../outside")], "h"),
    Malicious("hardlink-absolute", [Entry("h", "hardlink", link="/etc/passwd")], "h"),
    Malicious("hardlink-through-symlink", [Entry("l", "symlink", link="/etc"), Entry("h", "hardlink", link="l/passwd")],
              "h"),
    Malicious("whiteout-up", [Entry("../.wh.x")], "../.wh.x"),
    Malicious("whiteout-through-symlink-up", [Entry("l", "symlink", link=".."), Entry("l/.wh.canary")],
              "l/.wh.canary"),
    Malicious("opaque-through-symlink", [Entry("l", "symlink", link="../.."), Entry("l/.wh..wh..opq")],
              "l/.wh..wh..opq"),
    Malicious("whiteout-dotdot-name", [Entry("d", "dir"), Entry("d/.wh..")], "d/.wh.."),
    Malicious("char-device", [Entry("dev", "char", major=1, minor=3)], "dev"),
    Malicious("block-device", [Entry("disk", "block", major=8, minor=0)], "disk"),
    Malicious("long-name", [Entry(_LONG, data=b"x")], _LONG),
    Malicious("long-dir-name", [Entry(f"d/{_LONG}/f", data=b"x")], f"d/{_LONG}/f"),
    Malicious("dir-then-symlink-up", [Entry("d", "dir"), Entry("d", "symlink", link="../.."),
                                      Entry("d/x", data=b"out")], "d/x"),
    Malicious("overlay-xattr", [Entry("d", "dir", xattrs={"trusted.overlay.redirect": b"/etc"})], "d"),
)


@dataclass(frozen=True, slots=True)
class Contained:
    """A layer that goes through an absolute symlink: it is followed from the snapshot root (the
    container's ``/``), as containerd does, so the write lands at ``lands`` inside the snapshot and
    nothing outside changes."""

    id: str
    entries: Sequence[Entry]
    lands: str


#: Absolute symlinks as parents: contained, not refused (real images have ``var/run -> /run``).
CONTAINED: tuple[Contained, ...] = (
    Contained("symlink-root", [Entry("l", "symlink", link="/"), Entry("l/etc/x", data=b"out")], "etc/x"),
    Contained("symlink-dir-entry", [Entry("l", "symlink", link="/"), Entry("l/d", "dir")], "d"),
    Contained("var-run", [Entry("var", "dir"), Entry("run", "dir"), Entry("var/run", "symlink", link="/run"),
                          Entry("var/run/x.pid", data=b"1")], "run/x.pid"),
    Contained("dir-then-symlink", [Entry("d", "dir"), Entry("d/f", data=b"in"), Entry("d", "symlink", link="/tmp"),
                                   Entry("d/x", data=b"out")], "tmp/x"),
)


def generated_tree(seed: int, *, files: int, big_files: int = 0, big_size: int = 8 << 20, prefix: str = "",
                   small_max: int = 16 << 10) -> list[Entry]:
    """A reproducible tree: ``files`` small files (0..``small_max`` bytes, text-like so they compress) in
    nested directories, plus ``big_files`` of ``big_size`` (half random, half compressible)."""
    rng = random.Random(seed)
    entries: list[Entry] = []
    dirs = [f"{prefix}d{i}" for i in range(max(1, files // 50))]
    made: set[str] = set()
    words = [bytes(rng.choice(b"abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9))) for _ in range(500)]
    for index in range(files):
        directory = rng.choice(dirs)
        if rng.random() < 0.3:
            directory = f"{directory}/s{rng.randint(0, 5)}"
        parts = directory.split("/")
        for depth in range(1, len(parts) + 1):
            path = "/".join(parts[:depth])
            if path not in made:
                made.add(path)
                entries.append(Entry(path, "dir", mode=0o755))
        size = rng.randint(0, small_max)
        body = b" ".join(rng.choice(words) for _ in range(size // 6 + 1))[:size]
        entries.append(Entry(f"{directory}/f{index}", data=body, mode=rng.choice((0o644, 0o755, 0o600))))
    for index in range(big_files):
        half = big_size // 2
        body = rng.randbytes(half) + bytes(rng.choice(words)[0:1]) * (big_size - half)
        entries.append(Entry(f"{prefix}big{index}", data=body))
    return entries
