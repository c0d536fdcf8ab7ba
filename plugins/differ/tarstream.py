"""A streaming tar reader for layers: POSIX ustar, PAX (local and global) and GNU long names.

Lighter than :mod:`tarfile` on the apply hot path (one slice per header field, no member list kept) and
exact where layers need it: PAX times keep their nanoseconds, ``SCHILY.xattr.*`` values stay bytes.
GNU sparse and multi-volume entries are refused (layer writers such as Docker, BuildKit, containerd and
umoci never produce them). Names are decoded as UTF-8 with ``surrogateescape``, so any bytes round-trip
through ``os`` calls.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from berth.core.errdefs import InvalidArgument

__all__ = ["TarEntry", "TarSource", "read_entries"]

BLOCK = 512
_ZERO_BLOCK = bytes(BLOCK)
#: Largest PAX or GNU long-name header accepted (names and xattrs, not file data).
MAX_META_SIZE = 1 << 20

_KINDS = {b"0": "file", b"\0": "file", b"7": "file", b"1": "hardlink", b"2": "symlink", b"3": "char",
          b"4": "block", b"5": "dir", b"6": "fifo"}


class TarSource:
    """The uncompressed layer as a forward-only stream; ``next_chunk()`` gives its next piece (``b""`` at
    the end). ``seek`` only skips forward."""

    def __init__(self, next_chunk: Callable[[], bytes | memoryview]) -> None:
        self._next_chunk = next_chunk
        self._buffer: memoryview = memoryview(b"")
        self._position = 0
        self._eof = False

    def _fill(self) -> bool:
        if self._eof:
            return False
        data = self._next_chunk()
        if not data:
            self._eof = True
            return False
        self._buffer = memoryview(data)
        return True

    def read(self, size: int) -> bytes:
        """The next ``size`` bytes (fewer only at the end of the stream)."""
        if len(self._buffer) >= size:
            data = bytes(self._buffer[:size])
            self._buffer = self._buffer[size:]
            self._position += size
            return data
        parts = []
        wanted = size
        while wanted > 0:
            if not self._buffer and not self._fill():
                break
            piece = self._buffer[:wanted]
            parts.append(bytes(piece))
            self._buffer = self._buffer[len(piece):]
            wanted -= len(piece)
        data = b"".join(parts)
        self._position += len(data)
        return data

    def tell(self) -> int:
        return self._position

    def seek(self, offset: int, whence: int = 0) -> int:
        target = offset if whence == 0 else self._position + offset
        if whence not in (0, 1) or target < self._position:
            raise OSError(errno.ESPIPE, "the layer stream only moves forward")
        while self._position < target:
            if not self._buffer and not self._fill():
                break
            step = min(len(self._buffer), target - self._position)
            self._buffer = self._buffer[step:]
            self._position += step
        return self._position

    def copy_to(self, fd: int, size: int) -> int:
        """Write the next ``size`` bytes to ``fd``; returns how many there were (less at end of stream)."""
        left = size
        while left > 0:
            if not self._buffer and not self._fill():
                break
            piece = self._buffer[:left]
            while piece:
                written = os.write(fd, piece)
                piece = piece[written:]
            step = min(len(self._buffer), left)
            self._buffer = self._buffer[step:]
            self._position += step
            left -= step
        return size - left

    def drain(self) -> None:
        """Read to the end of the stream (so every byte is hashed)."""
        self._buffer = memoryview(b"")
        while self._fill():
            self._position += len(self._buffer)
            self._buffer = memoryview(b"")


@dataclass(slots=True)
class TarEntry:
    """One member: ``kind`` is file, dir, symlink, hardlink, fifo, char or block; times in nanoseconds."""

    name: str
    kind: str
    mode: int
    uid: int
    gid: int
    size: int
    mtime_ns: int
    atime_ns: int
    linkname: str = ""
    devmajor: int = 0
    devminor: int = 0
    xattrs: list[tuple[str, bytes]] = field(default_factory=list)


def _text(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


def _number(raw: bytes, what: str) -> int:
    if raw[0] & 0x80:  # base-256 (GNU), for values that do not fit in octal
        return int.from_bytes(bytes([raw[0] & 0x7F]) + raw[1:], "big") if raw[0] != 0xFF else \
            int.from_bytes(raw, "big", signed=True)
    text = raw.split(b"\0", 1)[0].strip(b" ")
    try:
        return int(text, 8) if text else 0
    except ValueError:
        raise InvalidArgument(f"tar header has an invalid {what} field {raw!r}") from None


def _pax_time(value: bytes, what: str) -> int:
    seconds, _, fraction = value.partition(b".")
    try:
        whole = int(seconds)
        nanos = int((fraction + b"000000000")[:9]) if fraction else 0
    except ValueError:
        raise InvalidArgument(f"PAX header has an invalid {what} {value!r}") from None
    return whole * 1_000_000_000 - nanos if seconds.startswith(b"-") else whole * 1_000_000_000 + nanos


def _pax_int(value: bytes, what: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise InvalidArgument(f"PAX header has an invalid {what} {value!r}") from None
    if number < 0:
        raise InvalidArgument(f"PAX header has a negative {what}")
    return number


def _pax_records(data: bytes) -> dict[str, bytes]:
    records: dict[str, bytes] = {}
    position = 0
    while position < len(data):
        space = data.find(b" ", position)
        try:
            length = int(data[position:space])
        except ValueError:
            raise InvalidArgument("malformed PAX record length") from None
        end = position + length
        if space < 0 or length <= 0 or end > len(data) or data[end - 1:end] != b"\n":
            raise InvalidArgument("malformed PAX record")
        key, equals, value = data[space + 1:end - 1].partition(b"=")
        if not equals:
            raise InvalidArgument("PAX record without '='")
        records[key.decode("utf-8", "surrogateescape")] = value
        position = end
    return records


def _read_meta(source: TarSource, size: int, what: str) -> bytes:
    if size > MAX_META_SIZE:
        raise InvalidArgument(f"{what} of {size} bytes is larger than the {MAX_META_SIZE} allowed")
    data = source.read(size)
    if len(data) != size:
        raise InvalidArgument(f"the layer ends inside a {what}")
    source.seek(source.tell() + (-size % BLOCK))
    return data


def read_entries(source: TarSource) -> Iterator[TarEntry]:
    """Yield the members of the tar stream in order, up to its end marker (or the end of the stream).

    After each yield the caller may read up to ``entry.size`` data bytes from ``source``; whatever it
    leaves (and the padding) is skipped. Raises InvalidArgument for a malformed or truncated archive.
    """
    global_pax: dict[str, bytes] = {}
    pax: dict[str, bytes] = {}
    long_name = long_link = None
    count = 0
    while True:
        block = source.read(BLOCK)
        if not block or block == _ZERO_BLOCK:
            return
        if len(block) != BLOCK:
            raise InvalidArgument(f"the layer ends inside a tar header (after {count} entries)")
        if _number(block[148:156], "checksum") != sum(block) - sum(block[148:156]) + 8 * 32:
            raise InvalidArgument(f"tar header checksum mismatch after {count} entries")
        kind_flag = block[156:157]
        size = _number(block[124:136], "size")
        if kind_flag in (b"x", b"g"):
            records = _pax_records(_read_meta(source, size, "PAX header"))
            (pax if kind_flag == b"x" else global_pax).update(records)
            continue
        if kind_flag in (b"L", b"K"):
            value = _text(_read_meta(source, size, "GNU long name"))
            if kind_flag == b"L":
                long_name = value
            else:
                long_link = value
            continue
        merged = {**global_pax, **pax} if global_pax else pax
        name = _text(block[0:100])
        if block[257:263] == b"ustar\0" and block[345]:
            name = _text(block[345:500]) + "/" + name
        if long_name is not None:
            name = long_name
        if "path" in merged:
            name = merged["path"].decode("utf-8", "surrogateescape")
        kind = _KINDS.get(kind_flag)
        if kind is None:
            raise InvalidArgument(f"layer entry {name!r}: unsupported tar entry type {kind_flag!r}")
        if any(key.startswith("GNU.sparse.") for key in merged):
            raise InvalidArgument(f"layer entry {name!r}: sparse entries are not supported")
        if kind == "file" and kind_flag == b"\0" and name.endswith("/"):
            kind = "dir"  # pre-POSIX directories
        if "size" in merged:
            size = _pax_int(merged["size"], "size")
        linkname = _text(block[157:257]) if long_link is None else long_link
        if "linkpath" in merged:
            linkname = merged["linkpath"].decode("utf-8", "surrogateescape")
        mtime = _pax_time(merged["mtime"], "mtime") if "mtime" in merged else \
            _number(block[136:148], "mtime") * 1_000_000_000
        entry = TarEntry(
            name=name.rstrip("/") if kind == "dir" and name != "/" else name, kind=kind,
            mode=_number(block[100:108], "mode") & 0o7777,
            uid=_pax_int(merged["uid"], "uid") if "uid" in merged else _number(block[108:116], "uid"),
            gid=_pax_int(merged["gid"], "gid") if "gid" in merged else _number(block[116:124], "gid"),
            size=size if kind == "file" else 0, mtime_ns=mtime,
            atime_ns=_pax_time(merged["atime"], "atime") if "atime" in merged else mtime,
            linkname=linkname,
            devmajor=_number(block[329:337], "devmajor") if kind in ("char", "block") else 0,
            devminor=_number(block[337:345], "devminor") if kind in ("char", "block") else 0,
            xattrs=[(key[13:], value) for key, value in merged.items() if key.startswith("SCHILY.xattr.")],
        )
        pax, long_name, long_link = {}, None, None
        count += 1
        data_start = source.tell()
        yield entry
        source.seek(data_start + size + (-size % BLOCK))
