"""The ``berth`` launcher (bin/berth, in its Python form and compiled from bin/berth-launch.c) and its warm
command server (client/cliserver.py): a command run through the server behaves exactly as one run
directly (output, exit status, stdin, environment, working directory, signals), a stale or unsafe
server is never used, and no server outlives a test. Every test runs with both launchers."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import BERTH, BerthdProcess, clean_env

from berth.client.cliserver import pid_file_of

SOURCES = Path(__file__).resolve().parent.parent / "bin"


@pytest.fixture(scope="session", params=["python", "compiled", "compiled-as-berth"])
def launcher(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """bin/berth installed as pip installs it (beside a ``python3``), with or without ``berth-launch``; or
    the launcher compiled with its Python built in, as ``berth`` itself (as scripts/setup.sh installs it)."""
    directory = tmp_path_factory.mktemp(f"launcher-{request.param}")
    shutil.copy(SOURCES / "berth", directory / "berth")
    (directory / "python3").symlink_to(sys.executable)
    if request.param.startswith("compiled"):
        compiler = shutil.which("cc")
        if compiler is None:
            pytest.skip("no C compiler to build bin/berth-launch.c (scripts/setup.sh installs gcc)")
        if request.param == "compiled":
            output, defines = directory / "berth-launch", []
        else:
            output, defines = directory / "berth", [f'-DBERTH_PYTHON="{sys.executable}"']
            output.unlink()
        subprocess.run([compiler, "-O2", "-Wall", "-Werror", *defines, "-o", str(output),
                        str(SOURCES / "berth-launch.c")], check=True, timeout=120)
    return directory / "berth"


class Servers:
    """Runs the launcher with ``XDG_RUNTIME_DIR`` pointing into the test's directory and stops any server
    it started (by the PID it recorded)."""

    def __init__(self, runtime: Path, launcher: Path) -> None:
        self.runtime = runtime
        self.launcher = launcher
        self.socket = runtime / "berth" / "cli.sock"

    def env(self, **extra: str) -> dict[str, str]:
        return clean_env({"XDG_RUNTIME_DIR": str(self.runtime), **extra})

    def run(self, *args: str, daemon: BerthdProcess | None = None, stdin_text: str | None = None,
            cwd: Path | None = None, **env: str) -> subprocess.CompletedProcess[str]:
        address = ["--address", str(daemon.address)] if daemon is not None else []
        return subprocess.run([str(self.launcher), *address, *args], capture_output=True, text=True, input=stdin_text,
                              env=self.env(**env), cwd=cwd, timeout=60, check=False)

    def direct(self, *args: str, daemon: BerthdProcess,
               stdin_text: str | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*BERTH, "--address", str(daemon.address), *args], capture_output=True, text=True,
                              input=stdin_text, env=clean_env(), timeout=60, check=False)

    def start(self) -> int:
        """Start a server in the background and wait until it serves; return its PID."""
        subprocess.run([sys.executable, "-m", "berth.client.cliserver", str(self.socket)], env=self.env(),
                       check=True, timeout=30)
        return self.wait()

    def wait(self, timeout: float = 30.0) -> int:
        deadline = time.monotonic() + timeout
        pid_file = Path(pid_file_of(str(self.socket)))
        while time.monotonic() < deadline:
            if self.socket.exists() and pid_file.exists():
                return int(pid_file.read_text())
            time.sleep(0.05)
        raise AssertionError("the command server did not start")

    def pid(self) -> int | None:
        try:
            return int(Path(pid_file_of(str(self.socket))).read_text())
        except FileNotFoundError:
            return None

    def waiting(self) -> int:
        """How many connections wait in the server's backlog (``ss``: a listener's Recv-Q; the server
        bound its socket under a temporary name, which ``ss`` shows, and renamed it)."""
        listed = subprocess.run(["ss", "-xlnH"], capture_output=True, text=True, check=True, timeout=30).stdout
        return sum(int(fields[2]) for fields in map(str.split, listed.splitlines())
                   if len(fields) > 4 and fields[4].startswith(f"{self.socket}."))

    def processes(self) -> list[int]:
        """Every server process of this socket (the recorded one and any other)."""
        found = []
        for entry in Path("/proc").iterdir():
            with contextlib.suppress(OSError):
                if entry.name.isdigit() and str(self.socket).encode() in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
        return found

    def stop(self) -> None:
        for pid in {*self.processes(), self.pid()} - {None}:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)  # type: ignore[arg-type]


@pytest.fixture
def servers(tmp_path: Path, launcher: Path) -> Iterator[Servers]:
    runtime = tmp_path / "runtime"
    runtime.mkdir()
    servers = Servers(runtime, launcher)
    try:
        yield servers
    finally:
        servers.stop()


def test_commands_through_the_server_match_direct_runs(berthd: BerthdProcess, servers: Servers) -> None:
    pid = servers.start()
    for args in (["version"], ["snapshots", "info", "missing"], ["nosuchcommand"], ["namespaces", "ls"]):
        through, direct = servers.run(*args, daemon=berthd), servers.direct(*args, daemon=berthd)
        assert through.returncode == direct.returncode, args
        assert through.stderr == direct.stderr, args
        if args != ["version"]:  # version prints the server's PID and UUID, equal anyway; keep it simple
            assert through.stdout == direct.stdout, args
    assert servers.pid() == pid  # every command went through the same warm server


def test_stdin_environment_and_working_directory_are_the_callers(berthd: BerthdProcess, servers: Servers,
                                                                tmp_path: Path) -> None:
    servers.start()
    ingested = servers.run("content", "ingest", "--label", "berth.io/gc.root=1", "from-stdin", daemon=berthd,
                           stdin_text="hello launcher\n")  # a root: nothing else holds the blob from the collector
    assert ingested.returncode == 0, ingested.stderr
    digest = ingested.stdout.strip()
    got = servers.run("content", "get", digest, daemon=berthd)
    assert got.stdout == "hello launcher\n"
    # BERTH_NAMESPACE comes from the caller's environment, not the server's.
    created = servers.run("namespaces", "create", "from-env", daemon=berthd)
    assert created.returncode == 0
    listed = servers.run("content", "ls", "-q", daemon=berthd, BERTH_NAMESPACE="from-env")
    assert listed.returncode == 0
    assert listed.stdout == ""
    # A relative --address resolves against the caller's working directory.
    relative = os.path.relpath(berthd.address, tmp_path)
    by_cwd = subprocess.run([str(servers.launcher), "--address", relative, "version"], capture_output=True, text=True,
                            env=servers.env(), cwd=tmp_path, timeout=60, check=False)
    assert by_cwd.returncode == 0, by_cwd.stderr


def test_sigint_reaches_the_command(berthd: BerthdProcess, servers: Servers) -> None:
    servers.start()
    proc = subprocess.Popen([str(servers.launcher), "--address", str(berthd.address), "events"], env=servers.env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        time.sleep(1.0)  # the stream is open
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=20) == 130
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_without_a_server_the_command_runs_directly_and_starts_one(berthd: BerthdProcess, servers: Servers) -> None:
    first = servers.run("version", daemon=berthd)
    assert first.returncode == 0
    assert "Server:" in first.stdout
    pid = servers.wait()
    assert servers.run("version", daemon=berthd).returncode == 0
    assert servers.pid() == pid


def test_disabled_server_is_neither_used_nor_started(berthd: BerthdProcess, servers: Servers) -> None:
    result = servers.run("version", daemon=berthd, BERTH_CLI_SERVER="0")
    assert result.returncode == 0
    time.sleep(0.5)
    assert not servers.socket.exists()


def test_a_stale_server_hands_back_and_exits(berthd: BerthdProcess, servers: Servers) -> None:
    pid = servers.start()
    source = Path(sys.modules["berth.client.cliserver"].__file__ or "")
    stat = source.stat()
    os.utime(source, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))
    try:
        result = servers.run("version", daemon=berthd)
        assert result.returncode == 0
        assert "Server:" in result.stdout
        new_pid = servers.wait()
        deadline = time.monotonic() + 10
        while new_pid == pid and time.monotonic() < deadline:
            time.sleep(0.05)
            new_pid = servers.pid() or pid
        assert new_pid != pid
    finally:
        os.utime(source, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def test_an_unsafe_directory_is_never_used(berthd: BerthdProcess, servers: Servers) -> None:
    directory = servers.socket.parent
    directory.mkdir(mode=0o755)
    directory.chmod(0o755)
    result = servers.run("version", daemon=berthd)
    assert result.returncode == 0  # ran directly
    time.sleep(0.5)
    assert not servers.socket.exists()
    refused = subprocess.run([sys.executable, "-m", "berth.client.cliserver", "--foreground", str(servers.socket)],
                             capture_output=True, text=True, timeout=30, check=False)
    assert refused.returncode != 0
    assert "mode 0700" in refused.stderr


def test_other_users_cannot_reach_the_server(servers: Servers) -> None:
    servers.start()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through its exit status
        import socket

        try:
            os.setgid(65534)
            os.setuid(65534)
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
                conn.connect(str(servers.socket))
            os._exit(1)
        except PermissionError:
            os._exit(0)
        except BaseException:
            os._exit(2)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_idle_server_exits(servers: Servers) -> None:
    subprocess.run([sys.executable, "-m", "berth.client.cliserver", "--idle", "0.5", str(servers.socket)],
                   env=servers.env(), check=True, timeout=30)
    pid = servers.wait()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and Path(f"/proc/{pid}").exists():
        time.sleep(0.1)
    assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()
    assert not servers.socket.exists()


def test_sigterm_removes_the_socket_and_pid_file(servers: Servers) -> None:
    pid = servers.start()
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and (servers.socket.exists() or servers.pid() is not None):
        time.sleep(0.05)
    assert not servers.socket.exists()
    assert servers.pid() is None


def test_sigterm_ends_the_command_with_a_shell_status(berthd: BerthdProcess, servers: Servers) -> None:
    servers.start()
    proc = subprocess.Popen([str(servers.launcher), "--address", str(berthd.address), "events"], env=servers.env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        time.sleep(1.0)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 128 + signal.SIGTERM
        assert b"without an exit status" not in proc.stderr.read()  # type: ignore[union-attr]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_command_that_escapes_never_removes_the_servers_socket(berthd: BerthdProcess, servers: Servers) -> None:
    """Whatever ends a command's process (here: SystemExit out of the command's code, as a forwarded
    signal could raise), the child exits: it never runs the server's clean-up."""
    code = ("import sys; from berth.client import cliserver\n"
            "def escape(*args):\n    raise SystemExit(129)\n"
            "cliserver._run_child = escape\n"
            "cliserver.serve(sys.argv[1])\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(servers.socket)], env=servers.env())
    try:
        pid = servers.wait()
        identity = servers.socket.stat().st_ino
        for _ in range(2):
            result = servers.run("version", daemon=berthd)
            assert result.returncode == 255
            assert "without an exit status" in result.stderr
        assert servers.socket.stat().st_ino == identity
        assert servers.pid() == pid == proc.pid
        assert proc.poll() is None
    finally:
        proc.kill()
        proc.wait()


def test_a_stale_server_answers_every_launcher_waiting_for_it(berthd: BerthdProcess, servers: Servers) -> None:
    pid = servers.start()
    source = Path(sys.modules["berth.client.cliserver"].__file__ or "")
    stat = source.stat()
    os.kill(pid, signal.SIGSTOP)  # the launchers below queue up in its backlog
    launchers = []
    try:
        os.utime(source, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))
        launchers = [subprocess.Popen([str(servers.launcher), "--address", str(berthd.address), "version"],
                                      env=servers.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                     for _ in range(4)]
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and servers.waiting() < len(launchers):
            time.sleep(0.05)
        assert servers.waiting() == len(launchers)  # all four queued on the stopped server
        os.kill(pid, signal.SIGCONT)
        for launcher in launchers:
            out, err = launcher.communicate(timeout=60)
            assert launcher.returncode == 0, err
            assert b"Server:" in out
            assert b"without an exit status" not in err
        # The launchers each started a server; one serves, the others left for want of the lock.
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and (len(servers.processes()) != 1 or servers.pid() in (None, pid)):
            time.sleep(0.1)
        assert servers.processes() == [servers.pid()]
        assert servers.pid() != pid
    finally:
        os.utime(source, ns=(stat.st_atime_ns, stat.st_mtime_ns))
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)
        for launcher in launchers:
            if launcher.poll() is None:
                launcher.kill()
                launcher.wait()


def test_a_second_server_leaves_the_first_serving(servers: Servers) -> None:
    pid = servers.start()
    second = subprocess.run([sys.executable, "-m", "berth.client.cliserver", "--foreground", str(servers.socket)],
                            env=servers.env(), capture_output=True, timeout=30, check=False)
    assert second.returncode == 0
    assert servers.pid() == pid
    assert servers.processes() == [pid]


def test_a_server_whose_socket_is_removed_exits(servers: Servers) -> None:
    pid = servers.start()
    servers.socket.unlink()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and pid in servers.processes():
        time.sleep(0.1)
    assert pid not in servers.processes()


def test_a_command_whose_launcher_is_killed_ends(berthd: BerthdProcess, servers: Servers) -> None:
    server = servers.start()
    proc = subprocess.Popen([str(servers.launcher), "--address", str(berthd.address), "events"], env=servers.env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and len(servers.processes()) < 2:
            time.sleep(0.05)
        commands = set(servers.processes()) - {server}
        assert len(commands) == 1  # the forked child running `events`
        proc.kill()
        proc.wait()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and commands & set(servers.processes()):
            time.sleep(0.05)
        assert not commands & set(servers.processes())  # it got SIGHUP and ended
        assert servers.processes() == [server]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_every_queued_message_is_passed_on_before_the_end(monkeypatch: pytest.MonkeyPatch) -> None:
    """The forwarder reads all that is queued before it signals: a forwarded SIGINT's handler may raise
    at once, and SIGIO is not raised again for what is already there (here: the launcher's end)."""
    from berth.client.cliserver import _SignalForwarder

    delivered: list[int] = []
    monkeypatch.setattr(os, "kill", lambda pid, number: delivered.append(number))
    previous = signal.getsignal(signal.SIGIO)
    ours, launchers = socket.socketpair()
    try:
        launchers.sendall(b"S\x02S\x1c")  # SIGINT, SIGWINCH
        launchers.close()  # then the launcher is gone
        forwarder = _SignalForwarder(ours)
        assert delivered == [signal.SIGINT, signal.SIGWINCH, signal.SIGHUP]
        assert forwarder.gone
    finally:
        signal.signal(signal.SIGIO, previous)
        ours.close()
