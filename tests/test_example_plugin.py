"""The out-of-tree example plugin (examples/berth-hello), installed and loaded the way a user would.

The example is built with pip into a private ``--target`` directory and found by a real ``berthd``
through its ``berth.plugins`` entry point (``PYTHONPATH``); everything is checked over the socket.
"""

from __future__ import annotations

import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from berth.client.sync import Client
from berth.core.errdefs import BerthError, InvalidArgument

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "berth-hello"
HELLO_URI = "io.berth.rpc.v1.hello"
START_TIMEOUT = 15.0
STOP_TIMEOUT = 10.0


@dataclass
class Daemon:
    process: subprocess.Popen[bytes]
    socket: Path
    log: Path

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


def _install_example(tmp: Path) -> Path:
    """pip-install the example into ``tmp/site``; build from a copy so the source tree stays clean."""
    source = tmp / "berth-hello"
    shutil.copytree(EXAMPLE, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    site = tmp / "site"
    result = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-deps",
         "--no-build-isolation", "--no-index", "--target", str(site), str(source)],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert result.returncode == 0, f"pip install failed:\n{result.stdout}\n{result.stderr}"
    return site


def _wait_for_socket(daemon: Daemon) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if daemon.process.poll() is not None:
            pytest.fail(f"berthd exited with {daemon.process.returncode}:\n{daemon.log_text()}")
        if daemon.socket.is_socket():
            return
        time.sleep(0.05)
    pytest.fail(f"berthd did not open {daemon.socket} within {START_TIMEOUT} s:\n{daemon.log_text()}")


def _stop(daemon: Daemon) -> int:
    """SIGTERM by PID, wait, SIGKILL if it has not exited within STOP_TIMEOUT; return its status."""
    process = daemon.process
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return process.returncode


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """A berthd with the example plugin installed and configured (greeting "ahoy")."""
    tmp = tmp_path_factory.mktemp("hello")
    site = _install_example(tmp)
    config = tmp / "config.toml"
    config.write_text(
        "version = 1\n"
        f'required_plugins = ["{HELLO_URI}"]\n'
        f'[plugins."{HELLO_URI}"]\n'
        'greeting = "ahoy"\n'
    )
    env = {k: v for k, v in os.environ.items() if k not in ("BERTH_ADDRESS", "BERTH_NAMESPACE", "NOTIFY_SOCKET")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), env.get("PYTHONPATH")]))
    socket_dir = tmp
    if len(str(tmp / "s.sock")) > 100:  # a unix socket path holds at most 107 bytes
        socket_dir = Path(tempfile.mkdtemp(prefix="bh"))
    log = tmp / "berthd.log"
    with log.open("wb") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "berth.plugins.berthd", "--config", str(config), "--root", str(tmp / "root"),
             "--state", str(tmp / "state"), "--address", str(socket_dir / "s.sock")],
            stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT, env=env,
        )
    running = Daemon(process, socket_dir / "s.sock", log)
    try:
        _wait_for_socket(running)
        yield running
    finally:
        status = _stop(running)
        if socket_dir != tmp:
            shutil.rmtree(socket_dir, ignore_errors=True)
    assert status == 0, f"berthd exited with {status}:\n{running.log_text()}"
    assert "hello_closed" in running.log_text()  # the plugin's aclose() ran at shutdown


@pytest.fixture
def client(daemon: Daemon) -> Iterator[Client]:
    with Client(str(daemon.socket), timeout=10) as c:
        yield c


def test_plugin_is_loaded_with_its_config(client: Client) -> None:
    plugins = {p["uri"]: p for p in client.plugins()}
    hello = plugins[HELLO_URI]
    assert hello["status"] == "ok", hello
    assert hello["error"] is None
    assert hello["exports"] == {"greeting": "ahoy"}
    assert hello["requires"] == ["io.berth.event.v1"]
    assert [p["uri"] for p in client.plugins([f"uri=={HELLO_URI}"])] == [HELLO_URI]


def test_greet(client: Client) -> None:
    assert client.call("hello.greet", {"name": "berth"}) == {"message": "ahoy, berth"}


@pytest.mark.parametrize("args", [{"name": 5}, {}, {"name": "x", "extra": 1}, {"name": ""}])
def test_greet_bad_arguments(client: Client, args: dict[str, Any]) -> None:
    with pytest.raises(InvalidArgument, match=r"^hello\.greet: "):
        client.call("hello.greet", args)
    assert client.call("hello.greet", {"name": "again"}) == {"message": "ahoy, again"}  # still serving


def test_greet_publishes_an_event(daemon: Daemon, client: Client) -> None:
    received: queue.Queue[dict[str, Any] | BaseException] = queue.Queue()

    def subscribe() -> None:
        try:
            with Client(str(daemon.socket), timeout=10) as subscriber:
                for envelope in subscriber.subscribe(['topic=="/hello/greeted"']):
                    received.put(envelope)
                    break  # closing the stream cancels the call
        except BerthError as err:
            received.put(err)

    thread = threading.Thread(target=subscribe, daemon=True)
    thread.start()
    # The subscription is live only once the daemon has read the request: greet until it sees one.
    deadline = time.monotonic() + 10
    envelope: dict[str, Any] | BaseException | None = None
    while envelope is None and time.monotonic() < deadline:
        client.call("hello.greet", {"name": "events"}, namespace="hello-test")
        try:
            envelope = received.get(timeout=0.2)
        except queue.Empty:
            continue
    thread.join(10)
    assert not thread.is_alive()
    assert isinstance(envelope, dict), envelope
    assert envelope["topic"] == "/hello/greeted"
    assert envelope["namespace"] == "hello-test"
    assert envelope["event"] == {"name": "events", "message": "ahoy, events"}
    assert envelope["timestamp"] > 0


def test_cli_lists_the_plugin(daemon: Daemon) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "berth.client.cli", "--address", str(daemon.socket), "plugins", "ls"],
        capture_output=True, text=True, timeout=30, check=False,
    )
    assert result.returncode == 0, result.stderr
    rows = [line.split() for line in result.stdout.splitlines()]
    assert rows[0] == ["TYPE", "ID", "PLATFORMS", "STATUS"]
    assert ["io.berth.rpc.v1", "hello", "-", "ok"] in rows[1:]
