"""Shared fixtures: a live ``berthd`` in a subprocess, on a temporary root, state and socket.

``berthd`` starts one daemon with the default config; ``berthd_factory`` starts as many as a test
wants, each with its own config (``factory.start(config={...})``), and stops every one of them by
PID at the end of the test, whether it passed or not. ``berthd_module_factory`` is the same for a
whole module (the fuzz tests share one daemon across many examples).

The socket lives in a short ``/tmp/b*`` directory: a unix socket path is limited to 107 bytes,
and pytest's ``tmp_path`` can be longer than that.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
import tomli_w
from imagebuild import busybox_image, write_oci_archive
from taskcleanup import cleanup_tasks

from berth.client.sync import Client
from berth.core.errdefs import BerthError
from berth.core.snapshots.mount import is_mountpoint, mount_all, unmount_all
from berth.core.snapshots.snapshotter import Mount

#: Fixtures of a docker-registry on 127.0.0.1 (registry, auth_registry, token_registry, tls_registry, ...).
pytest_plugins = ["registry_fixture"]

READY_TIMEOUT = 15.0
STOP_TIMEOUT = 10.0
CLI_TIMEOUT = 30.0

BERTHD = [sys.executable, "-m", "berth.plugins.berthd"]
BERTH = [sys.executable, "-m", "berth.client.cli"]


def clean_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The test process's environment without anything that would point berth elsewhere."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("BERTH_ADDRESS", "BERTH_NAMESPACE", "NOTIFY_SOCKET")}
    env.update(extra or {})
    return env


def merge(base: dict[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with ``override`` merged in, table by table."""
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


class BerthdProcess:
    """One berthd subprocess and the files around it."""

    def __init__(self, *, proc: subprocess.Popen[bytes], address: Path, config_path: Path, log_path: Path,
                 root: Path, state: Path, config: dict[str, Any]) -> None:
        self.proc = proc
        self.address = address
        self.config_path = config_path
        self.log_path = log_path
        self.root = root
        self.state = state
        self.config = config

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def alive(self) -> bool:
        return self.proc.poll() is None

    def client(self, **kwargs: Any) -> Client:
        kwargs.setdefault("timeout", 10.0)
        return Client(str(self.address), **kwargs)

    def cli(self, *args: str, env: Mapping[str, str] | None = None, address: bool = True,
            timeout: float = CLI_TIMEOUT) -> subprocess.CompletedProcess[str]:
        """Run ``berth [--address SOCK] ARGS...`` and return its result (never raises on exit status)."""
        command = [*BERTH, *(["--address", str(self.address)] if address else []), *args]
        return subprocess.run(command, capture_output=True, text=True, env=clean_env(env), timeout=timeout,
                              check=False)

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> None:
        """Wait until the socket answers ``version.get``; fail showing the log if it never does."""
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                pytest.fail(f"berthd exited with status {self.proc.returncode} before it was ready; log:\n"
                            f"{self.log_text()}")
            if self.address.is_socket():
                with contextlib.suppress(BerthError), Client(str(self.address), timeout=2.0) as probe:
                    probe.call("version.get")
                    return
            if time.monotonic() > deadline:
                pytest.fail(f"berthd was not ready within {timeout} s; log:\n{self.log_text()}")
            time.sleep(0.02)

    def wait_exit(self, timeout: float = STOP_TIMEOUT) -> int:
        return self.proc.wait(timeout=timeout)

    def wait_log(self, text: str, timeout: float = STOP_TIMEOUT) -> str:
        """Wait until the log contains ``text``; return the log."""
        deadline = time.monotonic() + timeout
        while True:
            log = self.log_text()
            if text in log:
                return log
            if time.monotonic() > deadline:
                pytest.fail(f"{text!r} did not appear in the log within {timeout} s; log:\n{log}")
            time.sleep(0.02)

    def send_signal(self, signum: int) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signum)

    def stop(self, signum: int = signal.SIGTERM, timeout: float = STOP_TIMEOUT) -> int:
        """Stop the daemon by its PID: ``signum``, up to ``timeout`` s, then SIGKILL. Returns the exit status."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signum)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=timeout)
        return self.proc.returncode


class BerthdFactory:
    """Starts berthd subprocesses under ``base`` and stops all of them on :meth:`close`."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.processes: list[BerthdProcess] = []
        self._socket_dirs: list[Path] = []
        self._count = 0

    def socket_dir(self) -> Path:
        """A fresh short directory for sockets (removed by :meth:`close`)."""
        path = Path(tempfile.mkdtemp(prefix="b"))
        self._socket_dirs.append(path)
        return path

    def default_config(self, name: str) -> dict[str, Any]:
        return {
            "version": 1,
            "root": str(self.base / name / "root"),
            "state": str(self.base / name / "state"),
            "rpc": {"address": str(self.socket_dir() / "b.sock")},
        }

    def write_config(self, config: Mapping[str, Any] | None = None, *, name: str | None = None) -> tuple[
            Path, dict[str, Any]]:
        """Write a config file (the defaults merged with ``config``) and return its path and content."""
        self._count += 1
        name = name or f"d{self._count}"
        document = merge(self.default_config(name), config or {})
        path = self.base / name / "config.toml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(tomli_w.dumps(document))
        return path, document

    def start(self, config: Mapping[str, Any] | None = None, *, args: tuple[str, ...] = (),
              env: Mapping[str, str] | None = None, wait: bool = True, name: str | None = None,
              config_path: Path | None = None) -> BerthdProcess:
        """Start berthd with the default config merged with ``config`` (or the file ``config_path``).

        With ``wait`` (the default), return once the socket answers ``version.get``.
        """
        if config_path is None:
            config_path, document = self.write_config(config, name=name)
        else:
            document = {}
        log_path = config_path.with_name(f"berthd-{len(self.processes)}.log")
        with log_path.open("wb") as log:
            proc = subprocess.Popen([*BERTHD, "--config", str(config_path), *args], stdin=subprocess.DEVNULL,
                                    stdout=log, stderr=log, env=clean_env(env), cwd=config_path.parent)
        rpc = document.get("rpc", {})
        daemon = BerthdProcess(proc=proc, address=Path(rpc.get("address", "/nonexistent")),
                               config_path=config_path, log_path=log_path,
                               root=Path(document.get("root", "/nonexistent")),
                               state=Path(document.get("state", "/nonexistent")), config=document)
        self.processes.append(daemon)
        if wait:
            daemon.wait_ready()
        return daemon

    def run(self, config: Mapping[str, Any] | None = None, *, args: tuple[str, ...] = (),
            timeout: float = READY_TIMEOUT) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
        """Run berthd to completion (for configs that must make it refuse to start)."""
        config_path, document = self.write_config(config)
        result = subprocess.run([*BERTHD, "--config", str(config_path), *args], capture_output=True, text=True,
                                env=clean_env(), timeout=timeout, check=False, stdin=subprocess.DEVNULL)
        return result, document

    def close(self) -> None:
        for daemon in self.processes:
            daemon.stop()
        for daemon in self.processes:
            cleanup_tasks(daemon.state)
        for path in self._socket_dirs:
            shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def berthd_factory(tmp_path: Path) -> Iterator[BerthdFactory]:
    factory = BerthdFactory(tmp_path)
    try:
        yield factory
    finally:
        factory.close()


@pytest.fixture(scope="module")
def berthd_module_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BerthdFactory]:
    factory = BerthdFactory(tmp_path_factory.mktemp("berthd"))
    try:
        yield factory
    finally:
        factory.close()


#: The busybox image (Debian's busybox-static) that :func:`daemon` imports.
IMAGE = "localhost/busybox:latest"


@pytest.fixture(scope="module")
def daemon(berthd_module_factory: BerthdFactory, tmp_path_factory: pytest.TempPathFactory) -> BerthdProcess:
    """A berthd for the module with :data:`IMAGE` imported and unpacked (a module may define its own)."""
    process = berthd_module_factory.start()
    archive = write_oci_archive(tmp_path_factory.mktemp("image") / "busybox.tar", {IMAGE: busybox_image()})
    imported = process.cli("images", "import", str(archive))
    assert imported.returncode == 0, imported.stderr
    return process


@pytest.fixture
def berthd(berthd_factory: BerthdFactory) -> BerthdProcess:
    """A berthd with the default config on a temporary root, state and socket, ready to answer."""
    return berthd_factory.start()


# ------------------------------------------------------------------------------------ test plugin

_TEST_PLUGIN = '''
"""A plugin for berth's daemon tests: a slow RPC method, a slow init and a slow close, each held by files."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from berth.core.plugin import InitContext, PluginType, Registration, Registry, hookimpl


@dataclass(kw_only=True)
class Config:
    #: init creates <init_gate>.started, then waits until <init_gate>.release exists ("" = no wait).
    init_gate: str = ""
    #: aclose waits this many seconds.
    close_delay: float = 0.0


async def _wait_for(path: Path, limit: float = 60.0) -> None:
    with trio.move_on_after(limit):
        while not path.exists():
            await trio.sleep(0.01)


class Hold:
    def __init__(self, close_delay: float) -> None:
        self.close_delay = close_delay

    async def hold(self, call: Any, args: dict[str, Any]) -> dict[str, Any]:
        """Create args["marker"], then wait until args["release"] exists -> {"released": true}."""
        Path(args["marker"]).touch()
        await _wait_for(Path(args["release"]))
        return {"released": Path(args["release"]).exists()}

    async def aclose(self) -> None:
        await trio.sleep(self.close_delay)

    def rpc_methods(self) -> dict[str, Any]:
        return {"testhold.hold": self.hold}


async def init(ic: InitContext) -> Hold:
    if ic.config.init_gate:
        gate = Path(ic.config.init_gate)
        Path(f"{gate}.started").touch()
        await _wait_for(Path(f"{gate}.release"))
    return Hold(ic.config.close_delay)


@hookimpl
def berth_register(registry: Registry) -> None:
    registry.register(Registration(type=PluginType.RPC, id="testhold", init=init, config=Config))
'''

TEST_PLUGIN_URI = "io.berth.rpc.v1.testhold"


@pytest.fixture(scope="session")
def test_plugin_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory to put on berthd's PYTHONPATH: it holds the ``testhold`` plugin module and a
    ``.dist-info`` declaring it in the ``berth.plugins`` entry-point group, so berthd loads it as
    it loads any third-party plugin (without installing anything)."""
    site = tmp_path_factory.mktemp("plugin-site")
    (site / "berth_testhold.py").write_text(_TEST_PLUGIN)
    info = site / "berth_testhold-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: berth-testhold\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[berth.plugins]\ntesthold = berth_testhold\n")
    return site


@pytest.fixture
def test_plugin_env(test_plugin_path: Path) -> dict[str, str]:
    """Environment for a berthd that should load the ``testhold`` plugin."""
    existing = os.environ.get("PYTHONPATH")
    return {"PYTHONPATH": f"{test_plugin_path}{os.pathsep}{existing}" if existing else str(test_plugin_path)}


Mounter = Callable[[Sequence[Mount]], Path]


@pytest.fixture
def mounter(tmp_path: Path) -> Iterator[Mounter]:
    """``mounter(mounts)`` mounts on a fresh directory and returns it; everything is unmounted at teardown,
    even when the test fails."""
    targets: list[Path] = []

    def mount(mounts: Sequence[Mount]) -> Path:
        target = tmp_path / f"mnt{len(targets)}"
        target.mkdir()
        targets.append(target)
        mount_all(mounts, target)
        return target

    try:
        yield mount
    finally:
        for target in reversed(targets):
            unmount_all(target)
        assert not any(is_mountpoint(t) for t in targets)
