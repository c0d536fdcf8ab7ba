"""``berth content`` and ``berth leases`` against a real berthd, plus the sync client's content calls.

Each test gets its own daemon (a fresh root, state and socket), started after its first garbage
collection so that no background collection can run in the middle of a test unless the test deletes
something: unlabelled content that no lease holds is garbage, as in containerd.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import pytest
import tomli_w

from berth.client import cli
from berth.client.sync import Client
from berth.core.errdefs import BerthError, FailedPrecondition, NotFound

BERTHD = [sys.executable, "-m", "berth.plugins.berthd"]
BERTH = [sys.executable, "-m", "berth.client.cli"]
MiB = 1 << 20
GC_ROOT = "berth.io/gc.root"


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in ("BERTH_ADDRESS", "BERTH_NAMESPACE", "NOTIFY_SOCKET")}


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass
class Result:
    returncode: int
    stdout: bytes
    stderr: str

    @property
    def out(self) -> str:
        return self.stdout.decode()

    @property
    def error_line(self) -> str:
        """The one line an error prints (fails if there are more)."""
        lines = self.stderr.splitlines()
        assert len(lines) == 1, self.stderr
        assert lines[0].startswith("berth: "), self.stderr
        assert "Traceback" not in self.stderr
        return lines[0]


@dataclass
class Daemon:
    proc: subprocess.Popen[bytes]
    address: str
    log: Path

    def client(self, **kwargs: Any) -> Client:
        kwargs.setdefault("timeout", 30.0)
        return Client(self.address, **kwargs)

    def command(self, *args: str) -> list[str]:
        return [*BERTH, "--address", self.address, *args]

    def cli(self, *args: str, data: bytes | None = None, stdin: BinaryIO | None = None) -> Result:
        """Run ``berth --address SOCK ARGS...``, ``data`` on its stdin (never raises on its exit status)."""
        done = subprocess.run(self.command(*args), input=data, stdin=stdin if data is None else None,
                              capture_output=True, env=_env(), timeout=120, check=False)
        return Result(done.returncode, done.stdout, done.stderr.decode(errors="replace"))

    def ok(self, *args: str, data: bytes | None = None, stdin: BinaryIO | None = None) -> str:
        result = self.cli(*args, data=data, stdin=stdin)
        assert result.returncode == 0, result.stderr
        assert result.stderr == ""
        return result.out

    def ingest(self, ref: str, data: bytes, *args: str, before: tuple[str, ...] = ()) -> str:
        """``berth [BEFORE...] content ingest [ARGS...] REF`` from a pipe; returns the printed digest."""
        return self.ok(*before, "content", "ingest", *args, ref, data=data).strip()


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM by PID, then SIGKILL if it does not exit within 10 s."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    """A berthd on a temporary root and state, its socket in a short directory (the 107-byte limit)."""
    socket_dir = Path(tempfile.mkdtemp(prefix="b"))
    address = str(socket_dir / "b.sock")
    config = {"version": 1, "root": str(tmp_path / "root"), "state": str(tmp_path / "state"),
              "rpc": {"address": address}}
    config_path = tmp_path / "config.toml"
    config_path.write_text(tomli_w.dumps(config))
    log = tmp_path / "berthd.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([*BERTHD, "--config", str(config_path)], stdin=subprocess.DEVNULL, stdout=out,
                                stderr=out, env=_env(), cwd=tmp_path)
    try:
        deadline = time.monotonic() + 15
        while True:
            assert proc.poll() is None, f"berthd exited with {proc.returncode}:\n{log.read_text()}"
            if Path(address).is_socket():
                with contextlib.suppress(BerthError), Client(address, timeout=2.0) as probe:
                    probe.call("version.get")
                    if "gc_collected" in log.read_text():  # the start-up collection is behind us
                        break
            assert time.monotonic() < deadline, f"berthd not ready in 15 s:\n{log.read_text()}"
            time.sleep(0.02)
        yield Daemon(proc, address, log)
    finally:
        _stop(proc)
        shutil.rmtree(socket_dir, ignore_errors=True)


@pytest.fixture
def blob() -> bytes:
    """3 MiB and a bit: several chunks, the last one short."""
    return os.urandom(3 * MiB + 12345)


# ---------------------------------------------------------------------------------------- content


def test_ingest_then_get_is_byte_identical(daemon: Daemon, blob: bytes, tmp_path: Path) -> None:
    digest = digest_of(blob)
    path = tmp_path / "blob"
    path.write_bytes(blob)
    with path.open("rb") as f:  # a seekable stdin
        out = daemon.ok("content", "ingest", "--expected-digest", digest, "--expected-size", str(len(blob)),
                        "--label", f"{GC_ROOT}=1", "file-ref", stdin=f)
    assert out == digest + "\n"
    got = daemon.cli("content", "get", digest)
    assert got.returncode == 0, got.stderr
    assert got.stdout == blob

    info = json.loads(daemon.ok("content", "info", digest))
    assert info["digest"] == digest
    assert info["size"] == len(blob)
    assert info["labels"] == {GC_ROOT: "1"}

    table = daemon.ok("content", "ls").splitlines()
    assert table[0].split() == ["DIGEST", "SIZE", "AGE", "LABELS"]
    [row] = table[1:]
    assert row.split()[:2] == [digest, "3.158MB"]  # decimal units, 4 significant digits, as ctr
    assert row.endswith(f"{GC_ROOT}=1")
    assert daemon.ok("content", "ls", "-q") == digest + "\n"
    listed = json.loads(daemon.ok("content", "ls", "--format", "json"))
    assert [(i["digest"], i["size"]) for i in listed] == [(digest, len(blob))]
    assert json.loads(daemon.ok("content", "ls", "--format", "json", "digest==sha256:" + "0" * 64)) == []

    # From a pipe and without an expected digest: the digest is computed and printed.
    other = os.urandom(MiB)
    assert daemon.ingest("pipe-ref", other, "--label", f"{GC_ROOT}=1") == digest_of(other)
    assert daemon.cli("content", "get", digest_of(other)).stdout == other
    # Ingesting what exists already succeeds at once, as ctr's WriteBlob does.
    assert daemon.ingest("again", blob, "--expected-digest", digest) == digest
    assert daemon.ok("content", "active", "-q") == ""

    # An empty blob.
    assert daemon.ingest("empty", b"", "--label", f"{GC_ROOT}=1") == digest_of(b"")
    assert daemon.cli("content", "get", digest_of(b"")).stdout == b""


def test_get_into_a_closed_pipe_exits_quietly(daemon: Daemon) -> None:
    data = os.urandom(8 * MiB)
    digest = daemon.ingest("big", data, "--label", f"{GC_ROOT}=1")
    proc = subprocess.Popen(daemon.command("content", "get", digest), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=_env())
    assert proc.stdout is not None
    assert proc.stderr is not None
    assert proc.stdout.read(10) == data[:10]
    proc.stdout.close()  # as `berth content get D | head -c 10`
    stderr = proc.stderr.read().decode()
    assert proc.wait(timeout=30) == 0, stderr
    assert stderr == ""


def test_wrong_expected_digest_fails_and_the_ingest_resumes(daemon: Daemon, blob: bytes) -> None:
    digest = digest_of(blob)
    wrong = "sha256:" + "0" * 64
    failed = daemon.cli("content", "ingest", "--expected-digest", wrong, "layer", data=blob)
    assert failed.returncode == 1
    assert failed.stdout == b""
    line = failed.error_line
    assert "failed_precondition" in line
    assert wrong in line
    assert digest in line

    # Nothing was committed; the ingest is there with every byte.
    assert daemon.cli("content", "info", digest).returncode == 1
    assert daemon.ok("content", "active", "-q") == "layer\n"
    table = daemon.ok("content", "active").splitlines()
    assert table[0].split() == ["REF", "SIZE/TOTAL", "STARTED", "UPDATED"]
    assert table[1].split()[:2] == ["layer", "3.158MB/-"]
    [status] = json.loads(daemon.ok("content", "active", "--format", "json"))
    assert status["ref"] == "layer"
    assert status["offset"] == len(blob)
    with daemon.client() as client:
        assert client.content_status("layer")["offset"] == len(blob)

    # The right digest: nothing is sent again (the ingest is complete), and the commit succeeds.
    assert daemon.ingest("layer", blob, "--expected-digest", digest, "--label", f"{GC_ROOT}=1") == digest
    assert daemon.ok("content", "active", "-q") == ""
    assert daemon.cli("content", "get", digest).stdout == blob

    # A wrong size fails the same way and keeps the ingest too.
    other = os.urandom(1000)
    short = daemon.cli("content", "ingest", "--expected-size", "999", "sized", data=other)
    assert short.returncode == 1
    assert "failed_precondition" in short.error_line
    with daemon.client() as client:
        assert client.content_status("sized")["offset"] == 1000


def test_ingest_resumes_without_rewriting_the_prefix(daemon: Daemon, blob: bytes, tmp_path: Path) -> None:
    prefix = 2 * MiB + 7
    with daemon.client() as client:
        for ref, head in (("piped", blob[:prefix]), ("marked", b"M" * prefix)):
            assert client.call("content.write", {"action": "stat", "ref": ref})["offset"] == 0
            client.call("content.write", {"action": "write", "ref": ref, "offset": 0, "data": head[:MiB]})
            client.call("content.write", {"action": "write", "ref": ref, "offset": MiB, "data": head[MiB:]})
            client.call("content.write", {"action": "close", "ref": ref})
            assert client.content_status(ref)["offset"] == prefix

    # From a pipe (the prefix is read and dropped), verified by the expected digest.
    digest = digest_of(blob)
    assert daemon.ingest("piped", blob, "--expected-digest", digest, "--label", f"{GC_ROOT}=1") == digest
    assert daemon.cli("content", "get", digest).stdout == blob

    # From a file (the prefix is seeked past). The ingest's first bytes differ from the file's, so the
    # digest shows that they were kept, not sent again.
    path = tmp_path / "blob"
    path.write_bytes(blob)
    with path.open("rb") as f:
        out = daemon.ok("content", "ingest", "--label", f"{GC_ROOT}=1", "marked", stdin=f).strip()
    assert out == digest_of(b"M" * prefix + blob[prefix:])
    assert daemon.ok("content", "active", "-q") == ""


#: Runs argv[2:] with this process's stdin, stdout and stderr, then writes that child's peak RSS (bytes)
#: to the file argv[1]. Measuring from this small process, not from pytest: a child's ru_maxrss counts
#: what it had before exec, and a child forked from pytest starts as big as pytest.
_MEASURE = """
import resource, subprocess, sys
status = subprocess.call(sys.argv[2:])
with open(sys.argv[1], "w") as out:
    out.write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024))
sys.exit(status)
"""


def _run_measured(command: list[str], stdin: BinaryIO | int, report: Path,
                  sink: Any = None) -> tuple[int, int, str]:
    """Run ``command``; return its exit status, its peak RSS in bytes and its stderr.

    stdout goes to ``sink(chunk)`` as it comes.
    """
    proc = subprocess.Popen([sys.executable, "-c", _MEASURE, str(report), *command], stdin=stdin,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env())
    assert proc.stdout is not None
    assert proc.stderr is not None
    while chunk := proc.stdout.read(MiB):
        if sink is not None:
            sink(chunk)
    stderr = proc.stderr.read().decode()
    status = proc.wait(timeout=120)
    return status, int(report.read_text()), stderr


def test_64mib_blob_through_the_cli_in_bounded_memory(daemon: Daemon, tmp_path: Path) -> None:
    size = 64 * MiB
    path = tmp_path / "big"
    hasher = hashlib.sha256()
    with path.open("wb") as f:
        for _ in range(size // MiB):
            chunk = os.urandom(MiB)
            hasher.update(chunk)
            f.write(chunk)
    digest = "sha256:" + hasher.hexdigest()

    report = tmp_path / "maxrss"
    status, baseline, stderr = _run_measured(daemon.command("version"), subprocess.DEVNULL, report)
    assert status == 0, stderr
    out = io.BytesIO()
    with path.open("rb") as f:
        status, ingest_peak, stderr = _run_measured(
            daemon.command("content", "ingest", "--expected-digest", digest, "--label", f"{GC_ROOT}=1", "big"),
            f, report, out.write)
    assert status == 0, stderr
    assert out.getvalue().decode() == digest + "\n"

    got = hashlib.sha256()
    count = 0

    def consume(chunk: bytes) -> None:
        nonlocal count
        got.update(chunk)
        count += len(chunk)

    status, get_peak, stderr = _run_measured(daemon.command("content", "get", digest), subprocess.DEVNULL, report,
                                             consume)
    assert status == 0, stderr
    assert count == size
    assert "sha256:" + got.hexdigest() == digest
    # A chunk or a few in flight, never the blob: far below its 64 MiB (the interpreter alone is ~15 MiB).
    for peak in (ingest_peak, get_peak):
        assert peak < size // 2, f"peak RSS {peak / MiB:.1f} MiB (baseline {baseline / MiB:.1f} MiB)"
        assert peak - baseline < 16 * MiB, f"peak RSS {peak / MiB:.1f} MiB (baseline {baseline / MiB:.1f} MiB)"


def test_labels_set_and_removed(daemon: Daemon) -> None:
    data = os.urandom(5000)
    digest = daemon.ingest("labelled", data, "--label", f"{GC_ROOT}=1", "--label", "a=1")
    assert daemon.ok("content", "label", digest, "b=2", "c=3") == f"a=1,b=2,{GC_ROOT}=1,c=3\n"
    assert daemon.ok("content", "label", digest, "a=", "b=20") == f"b=20,{GC_ROOT}=1,c=3\n"
    assert daemon.ok("content", "label", digest) == f"b=20,{GC_ROOT}=1,c=3\n"  # shows them, changes nothing
    assert json.loads(daemon.ok("content", "info", digest))["labels"] == {"b": "20", GC_ROOT: "1", "c": "3"}
    assert daemon.ok("content", "ls", "-q", "labels.c==3") == digest + "\n"
    assert daemon.ok("content", "ls", "-q", "labels.a") == ""

    bad = daemon.cli("content", "label", digest, "novalue")
    assert bad.returncode == 1
    assert "invalid_argument" in bad.error_line
    missing = daemon.cli("content", "label", "sha256:" + "1" * 64, "a=1")
    assert missing.returncode == 1
    assert "not_found" in missing.error_line

    with daemon.client() as client:  # the sync client: an empty value removes the label too, as in containerd
        info = client.content_update(digest, {"c": ""}, ["labels.c"])
        assert info["labels"] == {"b": "20", GC_ROOT: "1"}
        assert client.content_update(digest, {GC_ROOT: "1", "z": "9"})["labels"] == {GC_ROOT: "1", "z": "9"}


def test_rm_then_info_is_not_found(daemon: Daemon) -> None:
    kept = daemon.ingest("kept", os.urandom(100), "--label", f"{GC_ROOT}=1")
    gone = daemon.ingest("gone", os.urandom(100), "--label", f"{GC_ROOT}=1")
    missing = "sha256:" + "2" * 64
    removed = daemon.cli("content", "rm", gone, missing)
    assert removed.returncode == 1
    assert removed.out == gone + "\n"
    assert "not_found" in removed.error_line
    assert missing in removed.error_line

    info = daemon.cli("content", "info", gone)
    assert info.returncode == 1
    assert info.stdout == b""
    assert "not_found" in info.error_line
    assert gone in info.error_line
    assert daemon.cli("content", "get", gone).returncode == 1
    assert daemon.ok("content", "ls", "-q") == kept + "\n"
    assert daemon.ok("content", "rm", kept) == kept + "\n"
    assert daemon.ok("content", "ls", "-q") == ""


def test_sync_client_content_calls(daemon: Daemon, blob: bytes) -> None:
    digest = digest_of(blob)
    with daemon.client() as client:
        result = client.content_ingest("sync", io.BytesIO(blob), expected=digest, total=len(blob),
                                       labels={GC_ROOT: "1"}, chunk_size=64 * 1024, window=8)
        assert result["digest"] == digest
        assert result["offset"] == len(blob)
        assert not result["exists"]
        assert client.content_ingest("sync2", io.BytesIO(blob), expected=digest)["exists"]
        with pytest.raises(FailedPrecondition):
            client.content_ingest("sync3", io.BytesIO(blob), expected=digest, total=len(blob) + 1)
        assert b"".join(client.content_read(digest)) == blob
        started = time.monotonic()
        for _ in client.content_read(digest):  # leaving a read early cancels it; the connection goes on
            break
        assert time.monotonic() - started < 10
        assert b"".join(client.content_read(digest, offset=MiB - 3, size=10)) == blob[MiB - 3:MiB + 7]
        assert [i["digest"] for i in client.content_list()] == [digest]
        assert client.content_info(digest)["size"] == len(blob)

        # A source that breaks half-way: the writes in flight are cancelled, the ref is let go, and the
        # same connection resumes it.
        class Broken(io.RawIOBase):
            def __init__(self) -> None:
                self.position = 0

            def readable(self) -> bool:
                return True

            def readinto(self, buffer: Any) -> int:
                if self.position >= 2 * MiB:
                    raise OSError("disk on fire")
                size = min(len(buffer), 2 * MiB - self.position)
                buffer[:size] = blob[self.position:self.position + size]
                self.position += size
                return size

        with pytest.raises(OSError, match="disk on fire"):
            client.content_ingest("half", io.BufferedReader(Broken(), 256 * 1024), chunk_size=256 * 1024)
        assert client.content_status("half")["offset"] == 2 * MiB
        resumed = client.content_ingest("half", io.BytesIO(blob), labels={GC_ROOT: "1"})
        assert resumed["digest"] == digest  # the first 2 MiB came from the ingest, the rest from here
        with pytest.raises(NotFound):
            client.content_status("half")

        # Ingests: list, abort.
        client.call("content.write", {"action": "stat", "ref": "open"})
        client.call("content.write", {"action": "close", "ref": "open"})
        assert [s["ref"] for s in client.content_statuses()] == ["open"]
        assert client.content_statuses(['ref=="nope"']) == []
        client.content_abort("open")
        assert client.content_statuses() == []
        client.content_delete(digest)
        with pytest.raises(NotFound):
            client.content_info(digest)


def test_pipelined_requests_are_collected_by_msgid(daemon: Daemon) -> None:
    with daemon.client() as client:
        first = client._send_request("version.get")
        second = client._send_request("introspection.server")
        third = client._send_request("content.info", {"digest": "sha256:" + "3" * 64})
        with pytest.raises(NotFound):
            client._collect(third)  # the last answer first: the earlier ones are kept meanwhile
        assert "uptime" in client._collect(second)
        assert "version" in client._collect(first)
        assert client.version()["version"]  # ordinary calls still work on the connection

        # A write that must wait for earlier bytes that never come: cancelling it ends it at once.
        client.call("content.write", {"action": "stat", "ref": "gap"})
        stuck = client._send_request("content.write", {"action": "write", "ref": "gap", "offset": 10, "data": b"x"})
        started = time.monotonic()
        client._cancel_pending([stuck])
        assert time.monotonic() - started < 10
        assert client.content_status("gap")["offset"] == 0


# ---------------------------------------------------------------------------------------- leases


def test_leases_create_ls_rm(daemon: Daemon) -> None:
    generated = daemon.ok("leases", "create", "--expires", "1h", "--label", "team=build").strip()
    assert generated
    named = daemon.ok("leases", "create", "--id", "named", "--expires", "0", "a=b").strip()
    assert named == "named"
    default = daemon.ok("leases", "create", "--id", "default-expiry").strip()

    leases = {lease["id"]: lease for lease in json.loads(daemon.ok("leases", "ls", "--format", "json"))}
    assert set(leases) == {generated, named, default}
    expire = leases[generated]["labels"]["berth.io/gc.expire"]
    assert leases[generated]["labels"]["team"] == "build"
    from datetime import datetime

    expires_at = datetime.fromisoformat(expire.replace("Z", "+00:00")).timestamp()
    assert abs(expires_at - (time.time() + 3600)) < 60
    assert leases[named]["labels"] == {"a": "b"}  # 0: never expires
    default_at = datetime.fromisoformat(leases[default]["labels"]["berth.io/gc.expire"].replace("Z", "+00:00"))
    assert abs(default_at.timestamp() - (time.time() + 24 * 3600)) < 60  # ctr's default: 24h

    table = daemon.ok("leases", "ls").splitlines()
    assert table[0].split() == ["ID", "CREATED", "AT", "LABELS"]
    assert any(row.startswith(generated) and "team=build" in row for row in table[1:])
    assert sorted(daemon.ok("leases", "ls", "-q").split()) == sorted([generated, named, default])
    assert daemon.ok("leases", "ls", "-q", "id==named") == "named\n"

    bad = daemon.cli("leases", "create", "--expires", "5 minutes")
    assert bad.returncode == 2
    assert "invalid duration" in bad.stderr
    again = daemon.cli("leases", "create", "--id", "named")
    assert again.returncode == 1
    assert "already_exists" in again.error_line

    removed = daemon.cli("leases", "rm", named, "nope", default)
    assert removed.returncode == 1
    assert removed.out == f"{named}\n{default}\n"
    assert "nope" in removed.error_line
    assert daemon.ok("leases", "ls", "-q") == generated + "\n"


def test_lease_holds_content_until_removed_with_sync(daemon: Daemon) -> None:
    lease = daemon.ok("leases", "create", "--expires", "1h").strip()
    daemon.ok("leases", "create", "--id", "other")
    alone, rooted, referenced, shared = (os.urandom(2000) for _ in range(4))
    d_alone = daemon.ingest("alone", alone, before=("--lease", lease))
    d_referenced = daemon.ingest("referenced", referenced, before=("--lease", lease))
    d_rooted = daemon.ingest("rooted", rooted, "--label", f"{GC_ROOT}=1",
                             "--label", f"berth.io/gc.ref.content.x={d_referenced}", before=("--lease", lease))
    d_shared = daemon.ingest("shared", shared, before=("--lease", lease))
    # The blob exists: ingesting it again under another lease only adds it to that lease.
    again = daemon.ingest("shared-again", shared, "--expected-digest", d_shared, before=("--lease", "other"))
    assert again == d_shared

    with daemon.client() as client:
        held = {(r["type"], r["id"]) for r in client.lease_resources(lease)}
        assert held == {("content", d) for d in (d_alone, d_referenced, d_rooted, d_shared)}
        assert client.lease_resources("other") == [{"type": "content", "id": d_shared}]

    bad_lease = daemon.cli("--lease", "missing", "content", "ingest", "x", data=b"x")
    assert bad_lease.returncode == 1
    assert "not_found" in bad_lease.error_line
    assert "missing" in bad_lease.error_line

    assert daemon.ok("leases", "rm", "--sync", lease) == lease + "\n"
    # Collected: the blob only this lease held. Kept: a gc.root blob, the blob it references, and the
    # blob another lease holds.
    assert sorted(daemon.ok("content", "ls", "-q").split()) == sorted([d_rooted, d_referenced, d_shared])
    gone = daemon.cli("content", "get", d_alone)
    assert gone.returncode == 1
    assert "not_found" in gone.error_line
    assert daemon.cli("content", "get", d_shared).stdout == shared

    daemon.ok("leases", "rm", "--sync", "other")
    assert sorted(daemon.ok("content", "ls", "-q").split()) == sorted([d_rooted, d_referenced])


def test_sync_client_lease_calls(daemon: Daemon) -> None:
    with daemon.client() as client:
        lease = client.lease_create("work", {"k": "v"}, expires_in=600)
        assert lease["id"] == "work"
        assert lease["labels"]["k"] == "v"
        assert [entry["id"] for entry in client.lease_list(['labels.k=="v"'])] == ["work"]
        result = client.content_ingest("leased", io.BytesIO(b"hello"), lease="work")
        client.lease_add_resource("work", "ingests", "some-ref")
        assert client.lease_resources("work") == [{"type": "content", "id": result["digest"]},
                                                  {"type": "ingests", "id": "some-ref"}]
        client.lease_delete_resource("work", "ingests", "some-ref")
        assert client.content_list(lease="work")[0]["digest"] == result["digest"]
        client.lease_delete("work", sync=True)
        assert client.lease_list() == []
        assert client.content_list() == []
        with pytest.raises(NotFound):
            client.lease_resources("work")


# ---------------------------------------------------------------------------------------- namespaces


def test_namespace_holding_content_cannot_be_removed(daemon: Daemon) -> None:
    digest = daemon.ingest("kept", b"payload", "--label", f"{GC_ROOT}=1", before=("-n", "other"))
    failing = daemon.cli("-n", "other", "content", "ingest", "--expected-size", "1", "half", data=b"ab")
    assert failing.returncode == 1

    refused = daemon.cli("namespaces", "rm", "other")
    assert refused.returncode == 1
    line = refused.error_line
    assert "failed_precondition" in line
    assert "content" in line
    assert "ingests" in line
    with daemon.client() as client, pytest.raises(FailedPrecondition, match="content"):
        client.namespace_delete("other")
    assert "other" in daemon.ok("namespaces", "ls", "-q").split()

    with daemon.client(namespace="other") as client:
        client.content_abort("half")
        client.content_delete(digest)
    assert daemon.ok("namespaces", "rm", "other") == "other\n"


def test_help_lists_the_commands() -> None:
    top = subprocess.run([*BERTH, "--help"], capture_output=True, text=True, env=_env(), timeout=30, check=False)
    assert top.returncode == 0
    for command in ("version", "plugins", "namespaces", "content", "leases", "events", "--lease"):
        assert command in top.stdout
    content = subprocess.run([*BERTH, "content", "--help"], capture_output=True, text=True, env=_env(), timeout=30,
                             check=False)
    for action in ("ls", "info", "get", "ingest", "rm", "label", "active"):
        assert action in content.stdout
    leases = subprocess.run([*BERTH, "leases", "--help"], capture_output=True, text=True, env=_env(), timeout=30,
                            check=False)
    for action in ("ls", "create", "rm"):
        assert action in leases.stdout


@pytest.mark.parametrize("argv", [
    ["version"],
    ["--lease", "l1", "content", "ingest", "--expected-size", "3", "--label", "a=b", "ref"],
    ["-nfoo", "--lease=l2", "content", "ls", "-q", "labels.a"],
    ["--names", "foo", "leases", "create", "--expires", "90s", "k=v"],  # an abbreviated global option
    ["--timeout", "5", "lease", "rm", "--sync", "a", "b"],
    ["-a", "/tmp/s", "content", "active", "--format", "json"],
    ["ns", "label", "foo", "a="],
    ["snap", "--snapshotter", "native", "prepare", "k", "p"],
    ["events", "--format", "json", 'topic~="/content/"'],
])
def test_the_lazy_parser_parses_as_the_full_one(argv: list[str]) -> None:
    """main() builds only the named command's options; the result is what the full parser gives."""
    command = cli._command_in(argv)
    assert command in ("version", "content", "leases", "lease", "ns", "snap", "events")
    assert vars(cli._parser(command).parse_args(argv)) == vars(cli._parser().parse_args(argv))
