"""berthd as a whole, live: a real subprocess on a temporary root, state and socket, driven through
the ``berth`` CLI, the sync client and raw sockets.

Some tests load ``testhold``, a plugin defined in ``conftest.py`` (loaded through an entry point on
``PYTHONPATH``): its ``testhold.hold`` request, plugin init and plugin close wait on files the test
creates, which is how a test holds the daemon in a state (a request in flight, a slow shutdown)
without sleeping.
"""

from __future__ import annotations

import io
import json
import os
import queue
import re
import signal
import socket
import stat
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import msgpack
import pytest
from conftest import BERTH, TEST_PLUGIN_URI, BerthdFactory, BerthdProcess, clean_env

from berth.client.sync import Client
from berth.core.errdefs import (
    BerthError,
    DeadlineExceeded,
    NotFound,
    Unavailable,
    Unimplemented,
)
from berth.core.plugin import load_plugins
from berth.plugins.builtins import BUILTIN_PLUGINS
from berth.runtimes.runc.plugin import find_binary

WAIT = 15.0


def wait_for(predicate: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.01)


def builtin_uris() -> list[str]:
    return [r.uri for r in load_plugins(BUILTIN_PLUGINS, entry_points=False).registry]


def expected_uris() -> list[str]:
    """What a daemon started from this environment registers: the built-ins and any entry points."""
    return [r.uri for r in load_plugins(BUILTIN_PLUGINS).registry]


#: Built-ins that are ``skip`` where the tests run: btrfs needs its root on a btrfs filesystem.
#: btrfs skips (the root is not on btrfs); the builtin runtime skips until berth-runtime is installed.
SKIPPED_HERE = {"io.berth.snapshotter.v1.btrfs"} | (
    {"io.berth.runtime.v1.builtin"} if find_binary("berth-runtime") is None else set())


def check_statuses(statuses: dict[str, str]) -> None:
    """Every plugin the daemon would register is listed, and every built-in is ok (btrfs: skip)."""
    assert sorted(statuses) == sorted(expected_uris())
    expected = {uri: "skip" if uri in SKIPPED_HERE else "ok" for uri in builtin_uris()}
    assert {uri: statuses[uri] for uri in builtin_uris()} == expected


def table_rows(text: str) -> tuple[list[str], list[list[str]]]:
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[0].split(), [line.split() for line in lines[1:]]


def raw_exchange(address: Path, frames: list[Any], *, want: int, timeout: float = 5.0) -> list[Any]:
    """Send ``frames`` on a fresh connection and return the first ``want`` messages that come back."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(address))
        sock.sendall(b"".join(msgpack.packb(f, use_bin_type=True) for f in frames))
        unpacker = msgpack.Unpacker(raw=False)
        out: list[Any] = []
        while len(out) < want:
            data = sock.recv(65536)
            if not data:
                break
            unpacker.feed(data)
            out.extend(unpacker)
        return out


class Holder:
    """Runs ``testhold.hold`` in a thread: the daemon then has one request in flight until :meth:`release`."""

    def __init__(self, daemon: BerthdProcess, workdir: Path) -> None:
        self.marker = workdir / "hold.marker"
        self.release_file = workdir / "hold.release"
        self.result: Any = None
        self.error: BaseException | None = None
        self._daemon = daemon
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            with self._daemon.client(timeout=60) as client:
                self.result = client.call("testhold.hold", {"marker": str(self.marker),
                                                            "release": str(self.release_file)})
        except BaseException as err:
            self.error = err

    def start(self) -> Holder:
        self._thread.start()
        wait_for(self.marker.exists, "the held request to start")
        return self

    def release(self) -> None:
        self.release_file.touch()

    def join(self) -> None:
        self._thread.join(WAIT)
        assert not self._thread.is_alive(), "the held call did not return"


@pytest.fixture
def hold_factory(berthd_factory: BerthdFactory, test_plugin_env: dict[str, str]) -> Callable[..., BerthdProcess]:
    def start(config: dict[str, Any] | None = None) -> BerthdProcess:
        return berthd_factory.start(config, env=test_plugin_env)

    return start


# ============================================================================================ CLI


def test_cli_version(berthd: BerthdProcess) -> None:
    result = berthd.cli("version")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert out.index("Client:") < out.index("Server:")
    client_part, server_part = out.split("Server:")
    assert "Version:" in client_part
    assert "Version:" in server_part
    assert f"PID:      {berthd.pid}" in server_part
    assert result.stderr == ""


def test_cli_plugins_ls(berthd: BerthdProcess) -> None:
    result = berthd.cli("plugins", "ls")
    assert result.returncode == 0, result.stderr
    header, rows = table_rows(result.stdout)
    assert header == ["TYPE", "ID", "PLATFORMS", "STATUS"]
    check_statuses({f"{row[0]}.{row[1]}": row[-1] for row in rows})

    rpc_only = berthd.cli("plugins", "ls", "type==io.berth.rpc.v1")
    assert rpc_only.returncode == 0, rpc_only.stderr
    _, rows = table_rows(rpc_only.stdout)
    assert rows
    assert {row[0] for row in rows} == {"io.berth.rpc.v1"}


def test_cli_plugins_ls_detailed_and_json(berthd: BerthdProcess) -> None:
    detailed = berthd.cli("plugins", "ls", "-d")
    assert detailed.returncode == 0, detailed.stderr
    blocks = [b for b in detailed.stdout.split("\n\n") if b.strip()]
    assert len(blocks) == len(expected_uris())
    for block in blocks:
        assert block.startswith("Type:")
        assert "\nID:" in block
        assert "\nStatus:" in block
    exchange = next(b for b in blocks if "ID:            exchange" in b)
    assert "Exports:" in exchange
    assert "subscriber_buffer  1024" in exchange

    as_json = berthd.cli("plugins", "ls", "--format", "json")
    assert as_json.returncode == 0, as_json.stderr
    plugins = json.loads(as_json.stdout)
    check_statuses({p["uri"]: p["status"] for p in plugins})
    assert all(p["error"] is None for p in plugins if p["status"] == "ok")


def test_cli_namespaces(berthd: BerthdProcess) -> None:
    created = berthd.cli("namespaces", "create", "foo", "a=b")
    assert created.returncode == 0, created.stderr

    listed = berthd.cli("namespaces", "ls")
    assert listed.returncode == 0, listed.stderr
    header, rows = table_rows(listed.stdout)
    assert header == ["NAME", "LABELS"]
    assert rows == [["foo", "a=b"]]

    quiet = berthd.cli("ns", "ls", "-q")
    assert quiet.returncode == 0, quiet.stderr
    assert quiet.stdout == "foo\n"

    labelled = berthd.cli("namespaces", "label", "foo", "a=", "c=d")
    assert labelled.returncode == 0, labelled.stderr
    assert labelled.stdout.strip() == "c=d"
    with berthd.client() as client:
        assert client.namespace_get("foo")["labels"] == {"c": "d"}

    again = berthd.cli("namespaces", "create", "foo")
    assert again.returncode == 1
    assert "already exists" in again.stderr

    removed = berthd.cli("namespaces", "rm", "foo")
    assert removed.returncode == 0, removed.stderr
    assert removed.stdout == "foo\n"
    assert berthd.cli("namespaces", "ls", "-q").stdout == ""

    missing = berthd.cli("namespaces", "rm", "missing")
    assert missing.returncode == 1
    assert missing.stdout == ""
    lines = missing.stderr.splitlines()
    assert len(lines) == 1, missing.stderr
    assert lines[0].startswith("berth: ")
    assert "missing" in lines[0]
    assert "not found" in lines[0]


def test_cli_events_streams_namespace_create(berthd: BerthdProcess) -> None:
    proc = subprocess.Popen([*BERTH, "--address", str(berthd.address), "events"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=clean_env())
    lines: queue.Queue[str] = queue.Queue()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        # The subscription starts at some point after the process does: create namespaces until
        # one of them is seen, then check it is that create event.
        first = None
        deadline = time.monotonic() + WAIT
        with berthd.client() as client:
            n = 0
            while first is None and time.monotonic() < deadline:
                n += 1
                client.namespace_create(f"ev{n}", {"k": "v"})
                try:
                    first = lines.get(timeout=0.2)
                except queue.Empty:
                    assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        assert first is not None, "berth events printed nothing"
        fields = first.split()
        assert "/namespaces/create" in fields
        name = fields[fields.index("/namespaces/create") - 1]
        assert name.startswith("ev")
        assert f"name={name}" in fields
        assert first.split()[2:4] == ["+0000", "UTC"]
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        reader.join(10)
    assert proc.returncode == 130
    assert "Traceback" not in (proc.stderr.read() if proc.stderr else "")


def test_cli_honours_berth_address(berthd: BerthdProcess) -> None:
    result = berthd.cli("version", address=False, env={"BERTH_ADDRESS": str(berthd.address)})
    assert result.returncode == 0, result.stderr
    assert f"PID:      {berthd.pid}" in result.stdout

    # --address wins over the environment.
    result = berthd.cli("version", env={"BERTH_ADDRESS": "/nonexistent/berth.sock"})
    assert result.returncode == 0, result.stderr


class CaptureServer:
    """A one-shot msgpack-RPC peer that records the first request and answers it."""

    def __init__(self, path: Path, result: Any) -> None:
        self.path = path
        self.frames: list[Any] = []
        self._result = result
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(str(path))
        self._listener.listen(1)
        self._listener.settimeout(WAIT)
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        try:
            conn, _ = self._listener.accept()
        except OSError:
            return
        with conn:
            conn.settimeout(WAIT)
            unpacker = msgpack.Unpacker(raw=False)
            while not self.frames:
                data = conn.recv(65536)
                if not data:
                    return
                unpacker.feed(data)
                self.frames.extend(unpacker)
            conn.sendall(msgpack.packb([1, self.frames[0][1], None, self._result], use_bin_type=True))

    def close(self) -> None:
        self._listener.close()
        self._thread.join(WAIT)


@pytest.mark.parametrize(("env_ns", "flag", "expected"), [("xyz", None, "xyz"), ("xyz", "abc", "abc"),
                                                         (None, None, "default")])
def test_cli_honours_berth_namespace(berthd_factory: BerthdFactory, env_ns: str | None, flag: str | None,
                                     expected: str) -> None:
    path = berthd_factory.socket_dir() / "capture.sock"
    server = CaptureServer(path, {"namespaces": []})
    env = {"BERTH_ADDRESS": str(path)}
    if env_ns is not None:
        env["BERTH_NAMESPACE"] = env_ns
    args = ["--namespace", flag] if flag else []
    try:
        result = subprocess.run([*BERTH, *args, "namespaces", "ls"], capture_output=True, text=True,
                                env=clean_env(env), timeout=30, check=False)
    finally:
        server.close()
    assert result.returncode == 0, result.stderr
    [frame] = server.frames
    assert frame[0] == 0
    assert frame[2] == "namespaces.list"
    assert frame[3][0]["namespace"] == expected


def test_cli_without_daemon(berthd_factory: BerthdFactory) -> None:
    missing = berthd_factory.socket_dir() / "nobody-here.sock"
    result = subprocess.run([*BERTH, "--address", str(missing), "version"], capture_output=True, text=True,
                            env=clean_env(), timeout=30, check=False)
    assert result.returncode == 1
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert str(missing) in lines[0]
    assert "Traceback" not in result.stderr
    # The client part of `version` may print before the server is asked; nothing else may.
    assert "Server:" not in result.stdout


# ============================================================================================ socket


def test_socket_mode_group_and_removal(berthd_factory: BerthdFactory) -> None:
    sockdir = berthd_factory.socket_dir()
    address = sockdir / "deeper" / "still" / "berth.sock"
    daemon = berthd_factory.start({"rpc": {"address": str(address), "gid": 0}})
    info = address.lstat()
    assert stat.S_ISSOCK(info.st_mode)
    assert stat.S_IMODE(info.st_mode) == 0o660
    assert info.st_uid == os.geteuid()
    assert info.st_gid == 0
    assert address.parent.is_dir()
    assert sorted(p.name for p in address.parent.iterdir()) == ["berth.sock"]  # no temporary left behind

    assert daemon.stop() == 0
    assert not address.exists()
    assert not address.is_symlink()


def test_socket_group_is_configured_gid(berthd_factory: BerthdFactory) -> None:
    daemon = berthd_factory.start({"rpc": {"gid": 65534}})
    info = daemon.address.lstat()
    assert info.st_gid == 65534
    assert stat.S_IMODE(info.st_mode) == 0o660


def test_socket_appears_only_when_ready(berthd_factory: BerthdFactory, test_plugin_env: dict[str, str],
                                        tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    daemon = berthd_factory.start({"plugins": {TEST_PLUGIN_URI: {"init_gate": str(gate)}}},
                                  env=test_plugin_env, wait=False)
    started = Path(f"{gate}.started")
    wait_for(lambda: started.exists() or not daemon.alive(), "the testhold plugin's init to start")
    assert daemon.alive(), daemon.log_text()
    # Plugins are still initialising: no socket, not even under a temporary name.
    assert list(daemon.address.parent.iterdir()) == []
    assert "daemon_ready" not in daemon.log_text()
    with pytest.raises(Unavailable), Client(str(daemon.address), timeout=5) as client:
        client.version()

    Path(f"{gate}.release").touch()
    daemon.wait_ready()
    assert daemon.address.is_socket()
    assert "daemon_ready" in daemon.log_text()


def test_signal_during_startup_stops_cleanly(berthd_factory: BerthdFactory, test_plugin_env: dict[str, str],
                                             tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    daemon = berthd_factory.start({"plugins": {TEST_PLUGIN_URI: {"init_gate": str(gate)}}},
                                  env=test_plugin_env, wait=False)
    wait_for(lambda: Path(f"{gate}.started").exists() or not daemon.alive(), "the testhold plugin's init")
    daemon.send_signal(signal.SIGTERM)
    assert daemon.wait_exit() == 0, daemon.log_text()
    log = daemon.log_text()
    assert "shutdown_requested" in log
    assert "daemon_ready" not in log
    assert not daemon.address.exists()


def test_second_daemon_on_same_socket_fails(berthd_factory: BerthdFactory) -> None:
    first = berthd_factory.start()
    result, _ = berthd_factory.run({"rpc": {"address": str(first.address)}})
    assert result.returncode == 1, result.stderr
    assert "another daemon is serving" in result.stderr
    assert str(first.address) in result.stderr
    assert "Traceback" not in result.stderr
    # The first daemon is untouched and keeps its socket.
    assert first.address.is_socket()
    with first.client() as client:
        assert client.server()["pid"] == first.pid


def test_second_daemon_on_same_root_fails_before_loading_plugins(berthd_factory: BerthdFactory) -> None:
    first = berthd_factory.start()
    result, _ = berthd_factory.run({"root": str(first.root), "state": str(first.state)})
    assert result.returncode == 1, result.stderr
    assert f"another berthd is using root {first.root}" in result.stderr
    assert "plugin_status" not in result.stderr  # refused before any plugin opened the root
    with first.client() as client:
        assert client.server()["pid"] == first.pid


def test_stale_socket_is_replaced(berthd_factory: BerthdFactory) -> None:
    first = berthd_factory.start()
    address = first.address
    assert first.stop(signal.SIGKILL) == -signal.SIGKILL
    assert address.is_socket()  # left behind by the killed daemon
    with pytest.raises(Unavailable), Client(str(address), timeout=5) as client:
        client.version()

    second = berthd_factory.start({"rpc": {"address": str(address)}})
    with second.client() as client:
        assert client.server()["pid"] == second.pid
    assert stat.S_IMODE(address.lstat().st_mode) == 0o660


def test_address_that_is_not_a_socket_is_refused(berthd_factory: BerthdFactory) -> None:
    path = berthd_factory.socket_dir() / "regular-file"
    path.write_text("keep me")
    result, _ = berthd_factory.run({"rpc": {"address": str(path)}})
    assert result.returncode == 1
    assert "is not a socket" in result.stderr
    assert path.read_text() == "keep me"


# ============================================================================================ lifecycle


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_gracefully(berthd: BerthdProcess, signum: int) -> None:
    assert berthd.stop(signum) == 0
    log = berthd.log_text()
    name = signal.Signals(signum).name
    assert re.search(rf"shutdown_requested\s.*signal={name}", log), log
    assert log.index("shutdown_requested") < log.index("daemon_stopping") < log.index("daemon_stopped")
    assert "Traceback" not in log
    assert not berthd.address.exists()


def test_shutdown_lets_request_in_flight_finish(hold_factory: Callable[..., BerthdProcess], tmp_path: Path) -> None:
    daemon = hold_factory({"timeouts": {"shutdown_grace": "60s"}})
    holder = Holder(daemon, tmp_path).start()
    daemon.send_signal(signal.SIGTERM)
    daemon.wait_log("shutdown_requested")
    # New connections are refused at once: the socket is gone while the request runs on.
    wait_for(lambda: not daemon.address.exists(), "the socket to be removed")
    with pytest.raises(Unavailable), Client(str(daemon.address), timeout=5) as client:
        client.version()
    assert daemon.alive()
    assert "daemon_stopped" not in daemon.log_text()

    holder.release()
    holder.join()
    assert holder.error is None
    assert holder.result == {"released": True}
    assert daemon.wait_exit() == 0, daemon.log_text()
    assert "daemon_stopped" in daemon.log_text()


def test_shutdown_grace_expires(hold_factory: Callable[..., BerthdProcess], tmp_path: Path) -> None:
    daemon = hold_factory({"timeouts": {"shutdown_grace": "200ms"}})
    holder = Holder(daemon, tmp_path).start()
    assert daemon.stop(signal.SIGTERM) == 0, daemon.log_text()
    holder.join()
    # The request was cancelled with its connection: the caller sees the connection close.
    assert isinstance(holder.error, Unavailable), holder.error
    assert "daemon_stopped" in daemon.log_text()


def test_streams_are_not_waited_for(berthd_factory: BerthdFactory) -> None:
    daemon = berthd_factory.start({"timeouts": {"shutdown_grace": "60s"}})
    errors: list[BaseException] = []
    receiving = threading.Event()

    def subscribe() -> None:
        try:
            with daemon.client(timeout=None) as client:
                for _ in client.subscribe():
                    receiving.set()
        except BaseException as err:
            errors.append(err)

    thread = threading.Thread(target=subscribe, daemon=True)
    thread.start()
    with daemon.client() as client:  # publish until the stream is known to be open
        deadline = time.monotonic() + WAIT
        while not receiving.wait(0.02):
            assert time.monotonic() < deadline, "the subscriber never received an event"
            client.publish("/test/ping", {})
    # With 60 s of grace, exiting within the stop timeout shows the stream was not waited for.
    assert daemon.stop(signal.SIGTERM) == 0, daemon.log_text()
    thread.join(WAIT)
    assert len(errors) == 1
    assert isinstance(errors[0], Unavailable)


def test_second_signal_forces_exit_with_request_in_flight(hold_factory: Callable[..., BerthdProcess],
                                                         tmp_path: Path) -> None:
    daemon = hold_factory({"timeouts": {"shutdown_grace": "60s"}})
    holder = Holder(daemon, tmp_path).start()
    daemon.send_signal(signal.SIGTERM)
    daemon.wait_log("shutdown_requested")
    assert daemon.alive()
    daemon.send_signal(signal.SIGTERM)
    assert daemon.wait_exit() == 128 + signal.SIGTERM
    log = daemon.log_text()
    assert "shutdown_forced" in log
    assert "daemon_stopped" not in log
    holder.join()
    assert isinstance(holder.error, Unavailable)


def test_second_signal_forces_exit_during_plugin_close(hold_factory: Callable[..., BerthdProcess]) -> None:
    daemon = hold_factory({"timeouts": {"plugin_close": "60s"},
                           "plugins": {TEST_PLUGIN_URI: {"close_delay": 60.0}}})
    daemon.send_signal(signal.SIGTERM)
    daemon.wait_log("daemon_stopping")
    assert daemon.alive()
    daemon.send_signal(signal.SIGINT)
    assert daemon.wait_exit() == 128 + signal.SIGINT
    assert "shutdown_forced" in daemon.log_text()


def test_plugin_close_is_bounded(hold_factory: Callable[..., BerthdProcess]) -> None:
    daemon = hold_factory({"timeouts": {"plugin_close": "200ms"},
                           "plugins": {TEST_PLUGIN_URI: {"close_delay": 60.0}}})
    assert daemon.stop(signal.SIGTERM) == 0
    log = daemon.log_text()
    assert "plugin_close_timed_out" in log
    assert f"uri={TEST_PLUGIN_URI}" in log
    assert "daemon_stopped" in log


def test_json_logs(berthd_factory: BerthdFactory) -> None:
    daemon = berthd_factory.start(args=("--log-format", "json"))
    assert daemon.stop() == 0
    records = [json.loads(line) for line in daemon.log_text().splitlines() if line.strip()]
    assert records
    assert all(isinstance(r, dict) and isinstance(r.get("event"), str) for r in records)
    events = [r["event"] for r in records]
    for expected in ("plugin_status", "plugins_loaded", "daemon_ready", "shutdown_requested", "daemon_stopped"):
        assert expected in events
    statuses = {f"{r['type']}.{r['id']}": r["status"] for r in records if r["event"] == "plugin_status"}
    check_statuses(statuses)
    ready = next(r for r in records if r["event"] == "daemon_ready")
    assert ready["address"] == str(daemon.address)
    assert ready["pid"] == daemon.pid
    assert all("level" in r and "timestamp" in r for r in records)


def test_startup_summary_lists_every_plugin(berthd: BerthdProcess) -> None:
    with berthd.client() as client:
        plugins = client.plugins()
    summary = [line for line in berthd.log_text().splitlines() if "plugin_status" in line]
    assert len(summary) == len(plugins)
    for plugin in plugins:
        [line] = [s for s in summary if f"id={plugin['id']} " in s and f"type={plugin['type']}" in s]
        assert f"status={plugin['status']}" in line
    log = berthd.log_text()
    ok = sum(plugin["status"] == "ok" for plugin in plugins)
    skipped = sum(plugin["status"] == "skip" for plugin in plugins)
    assert f"ok={ok} " in log
    assert f"skip={skipped}" in log
    assert log.index("plugins_loaded") < log.index("daemon_ready")


def test_log_level_error_suppresses_info(berthd_factory: BerthdFactory) -> None:
    daemon = berthd_factory.start(args=("--log-level", "error"))
    with daemon.client() as client:
        assert client.version()["version"]
    assert daemon.stop() == 0
    log = daemon.log_text()
    for line in ("plugin_status", "daemon_ready", "shutdown_requested", "daemon_stopped"):
        assert line not in log
    assert "[info" not in log


# ============================================================================================ config


def test_bad_config_key(berthd_factory: BerthdFactory) -> None:
    result, document = berthd_factory.run({"rpc": {"bogus": 1}})
    assert result.returncode == 2
    config_path = berthd_factory.base / "d1" / "config.toml"
    assert str(config_path) in result.stderr
    assert "bogus" in result.stderr
    assert "[rpc]" in result.stderr
    assert "Traceback" not in result.stderr
    assert not Path(document["rpc"]["address"]).exists()


def test_bad_plugin_config_value(berthd_factory: BerthdFactory) -> None:
    result, document = berthd_factory.run(
        {"plugins": {"io.berth.event.v1.exchange": {"subscriber_buffer": "lots"}}})
    assert result.returncode == 2
    assert 'plugins."io.berth.event.v1.exchange"' in result.stderr
    assert "subscriber_buffer" in result.stderr
    assert not Path(document["rpc"]["address"]).exists()


def test_required_plugin_missing(berthd_factory: BerthdFactory) -> None:
    result, document = berthd_factory.run({"required_plugins": ["io.berth.snapshotter.v1.nope"]})
    assert result.returncode == 1
    lines = [line for line in result.stderr.splitlines() if line.startswith("berthd:")]
    assert len(lines) == 1, result.stderr
    assert "io.berth.snapshotter.v1.nope" in lines[0]
    assert "not included" in lines[0]
    assert "Traceback" not in result.stderr
    assert not Path(document["rpc"]["address"]).exists()


def test_disabled_plugin(berthd_factory: BerthdFactory) -> None:
    daemon = berthd_factory.start({"disabled_plugins": ["io.berth.rpc.v1.events"]})
    with daemon.client() as client, pytest.raises(Unimplemented, match=r"events\.subscribe"):
        next(iter(client.subscribe()))
    with daemon.client() as client:
        uris = [p["uri"] for p in client.plugins()]
    assert "io.berth.rpc.v1.events" not in uris
    assert "io.berth.event.v1.exchange" in uris

    listed = daemon.cli("plugins", "ls")
    assert listed.returncode == 0
    _, rows = table_rows(listed.stdout)
    assert ["io.berth.rpc.v1", "events"] not in [row[:2] for row in rows]
    events = daemon.cli("events", timeout=30)
    assert events.returncode == 1
    assert "not_implemented" in events.stderr or "unknown method" in events.stderr


# ============================================================================================ peer credentials

PEER_SNIPPET = r"""
import socket, sys
sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
sock.settimeout(10)
try:
    sock.connect(sys.argv[1])
except OSError as err:
    print("connect-error", err.errno)
    sys.exit(0)
try:
    sock.sendall(bytes.fromhex(sys.argv[2]))
    sock.shutdown(socket.SHUT_WR)
except OSError as err:
    print("send-error", err.errno)
data = b""
try:
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            print("eof")
            break
        data += chunk
except socket.timeout:
    print("timeout")
except OSError as err:
    print("recv-error", err.errno)
print("data", data.hex())
"""

NOBODY = 65534
PEER_PYTHON = "/usr/bin/python3"


def run_as_nobody(address: Path) -> tuple[list[str], list[Any]]:
    """Connect as uid/gid 65534, send a ``version.get`` request; return the status lines and messages."""
    if not os.path.exists(PEER_PYTHON):
        pytest.skip(f"{PEER_PYTHON} (an interpreter uid {NOBODY} may run) is missing")
    request = msgpack.packb([0, 1, "version.get", [{"namespace": "default"}, {}]], use_bin_type=True)
    result = subprocess.run([PEER_PYTHON, "-I", "-c", PEER_SNIPPET, str(address), request.hex()],
                            capture_output=True, text=True, timeout=30, check=False, user=NOBODY, group=NOBODY,
                            extra_groups=[], env={"PATH": "/usr/bin:/bin"}, cwd="/")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    data = next((bytes.fromhex(line.split(" ", 1)[1]) for line in lines if line.startswith("data ")), b"")
    return lines, list(msgpack.Unpacker(io.BytesIO(data), raw=False))


def open_path_to(address: Path) -> None:
    """Let other users reach ``address``: its directories traversable, the socket itself untouched."""
    for parent in address.parents:
        if parent == Path("/tmp") or parent == Path("/"):
            break
        os.chmod(parent, 0o755)


@pytest.mark.privileged
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to connect as another uid")
def test_peer_other_uid_refused(berthd_factory: BerthdFactory) -> None:
    daemon = berthd_factory.start({"rpc": {"gid": 0}})
    open_path_to(daemon.address)
    with daemon.client() as root_client:
        root_client.version()

        # Mode 0660 root:root: the filesystem alone keeps uid 65534 out.
        lines, _ = run_as_nobody(daemon.address)
        assert lines[0] == "connect-error 13", lines

        # With the filesystem out of the way, SO_PEERCRED still refuses it.
        os.chmod(daemon.address, 0o777)
        lines, messages = run_as_nobody(daemon.address)
        assert len(messages) == 1, lines
        assert messages[0][:2] == [2, "$error"], messages
        [error] = messages[0][2]
        assert error["code"] == "permission_denied"
        assert str(NOBODY) in error["message"]
        # ... and disconnected: end of stream (or a reset, since its request was never read).
        assert "eof" in lines or "recv-error 104" in lines, lines

        # Root, on a connection opened before, is served as before.
        assert root_client.version()["version"]
    with daemon.client() as fresh:
        assert fresh.version()["version"]
    assert "rpc_peer_refused" in daemon.log_text()
    assert f"uid={NOBODY}" in daemon.log_text()


@pytest.mark.privileged
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to connect as another uid")
def test_peer_in_configured_group_allowed(berthd_factory: BerthdFactory) -> None:
    daemon = berthd_factory.start({"rpc": {"gid": NOBODY}})
    open_path_to(daemon.address)
    # Mode 0660, group 65534: the group permission lets the peer in, SO_PEERCRED's gid authorises it.
    assert stat.S_IMODE(daemon.address.lstat().st_mode) == 0o660
    lines, messages = run_as_nobody(daemon.address)
    assert len(messages) == 1, lines
    assert messages[0][:3] == [1, 1, None], messages
    with daemon.client() as client:
        assert messages[0][3] == client.version()
    assert "eof" in lines
    assert "rpc_peer_refused" not in daemon.log_text()


# ============================================================================================ through the socket


def test_concurrent_clients(berthd: BerthdProcess) -> None:
    with berthd.client() as client:
        expected = client.version()

    def work(_: int) -> int:
        ok = 0
        with berthd.client() as client:
            for _ in range(200):
                assert client.version() == expected
                ok += 1
        return ok

    with ThreadPoolExecutor(max_workers=16) as pool:
        results = list(pool.map(work, range(16), timeout=120))
    assert results == [200] * 16
    assert berthd.alive()


@pytest.fixture
def publisher(berthd: BerthdProcess) -> Iterator[threading.Event]:
    """Publishes ``/test/tick`` every few ms until the returned event is set (subscribers starting at
    an unknown moment then see one soon)."""
    stop = threading.Event()

    def run() -> None:
        with berthd.client() as client:
            while not stop.wait(0.02):
                client.publish("/test/tick", {"n": "1"})

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    yield stop
    stop.set()
    thread.join(WAIT)


def test_stream_closed_early_cancels_and_connection_is_reused(berthd: BerthdProcess,
                                                              publisher: threading.Event) -> None:
    with berthd.client(timeout=None) as client:
        stream = client.subscribe(['topic=="/test/tick"'])
        first = next(stream)
        assert first["topic"] == "/test/tick"
        assert first["namespace"] == "default"
        connection = client._sock  # the same socket must carry the next call
        assert connection is not None
        stream.close()  # sends $cancel and reads the call's end
        assert client._sock is connection
        assert client.version()["version"]
        assert client.namespace_list() == []
        assert client._sock is connection


def test_raw_cancel_ends_stream_with_canceled(berthd: BerthdProcess) -> None:
    messages = raw_exchange(berthd.address, [[0, 7, "events.subscribe", [{}, {}]], [2, "$cancel", [7]],
                                             [0, 8, "version.get", [{}, {}]]], want=2)
    responses = {m[1]: m for m in messages if m[0] == 1}
    assert responses[7][2]["code"] == "canceled"
    assert responses[7][3] is None
    assert responses[8][2] is None


def test_cancel_of_unknown_msgid_is_ignored(berthd: BerthdProcess) -> None:
    messages = raw_exchange(berthd.address, [[2, "$cancel", [99]], [0, 1, "version.get", [{}, {}]]], want=1)
    assert messages[0][:3] == [1, 1, None]


def test_streaming_call_past_deadline(berthd: BerthdProcess) -> None:
    with berthd.client(timeout=None) as client:
        client.version()
        connection = client._sock
        with pytest.raises(DeadlineExceeded, match="deadline"):
            next(iter(client.stream("events.subscribe", timeout=0.001)))
        # The daemon ended the call with its response: the connection is still good.
        assert client._sock is connection
        assert client.version()["version"]


def test_stream_ended_by_error_response(berthd: BerthdProcess) -> None:
    # The daemon ends the call with an error response: the client must not then wait for another
    # end of the call (it used to, forever without a timeout), and the connection stays usable.
    with berthd.client(timeout=5) as client:
        client.version()
        connection = client._sock
        with pytest.raises(BerthError, match="filter"):
            next(iter(client.subscribe(["topic=="])))
        assert client._sock is connection
        with pytest.raises(NotFound):
            client.namespace_get("nope")
        assert client._sock is connection


def test_default_snapshotter_naming_an_unregistered_plugin_is_a_config_error(
        berthd_factory: BerthdFactory) -> None:
    result, _ = berthd_factory.run({"plugins": {"io.berth.rpc.v1.snapshots": {"default_snapshotter": "nope"}}})
    assert result.returncode == 2, result.stderr
    assert '[plugins."io.berth.rpc.v1.snapshots"] default_snapshotter' in result.stderr
    assert "'nope', which is not registered" in result.stderr


def test_default_snapshotter_naming_a_skipped_plugin_stops_startup(berthd_factory: BerthdFactory) -> None:
    # btrfs is skipped when its root is not on btrfs (the tests' roots are not).
    result, _ = berthd_factory.run({"plugins": {"io.berth.rpc.v1.snapshots": {"default_snapshotter": "btrfs"}}})
    assert result.returncode == 1, result.stderr
    assert '[plugins."io.berth.rpc.v1.snapshots"] default_snapshotter' in result.stderr
    assert "plugin 'btrfs', which was skipped" in result.stderr
