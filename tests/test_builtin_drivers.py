"""berth-runtime driven by other tools, as they drive runc: containerd's own shim (``ctr run --runc-binary``,
Debian's containerd) and podman (``podman --runtime``). Each gets a private root, state and socket in the
test's directory, and everything they start is stopped by PID."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from imagebuild import busybox_image, write_oci_archive
from test_builtin_runtime import make_rootfs

from berth.runtimes.runc.plugin import find_binary

BERTH_RUNTIME = find_binary("berth-runtime")
IMAGE = "localhost/busybox:latest"

pytestmark = pytest.mark.skipif(BERTH_RUNTIME is None or os.geteuid() != 0,
                                reason="needs root and berth-runtime installed")


def processes_mentioning(text: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if text.encode() in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
    return found


def unmount_below(path: Path) -> None:
    for line in reversed(Path("/proc/self/mountinfo").read_text().splitlines()):
        point = line.split()[4]
        if point.startswith(str(path)):
            subprocess.run(["umount", "-l", point], check=False, capture_output=True)


@pytest.fixture
def ctr(tmp_path: Path) -> Iterator[list[str]]:
    """A private containerd with the busybox image imported; yields the ``ctr`` command for it."""
    if shutil.which("containerd") is None or shutil.which("ctr") is None:
        pytest.skip("Debian's containerd is not installed")
    home = Path(f"/tmp/bctr-{os.getpid()}")  # short: containerd's socket path and the shims' must fit
    home.mkdir()
    address = home / "c.sock"
    (home / "config.toml").write_text(
        f'version = 2\nroot = "{home}/root"\nstate = "{home}/state"\n'
        f'disabled_plugins = ["io.containerd.grpc.v1.cri"]\n[grpc]\naddress = "{address}"\n')
    daemon = subprocess.Popen(["containerd", "--config", str(home / "config.toml")], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    command = ["ctr", "--address", str(address)]
    try:
        deadline = time.monotonic() + 30
        while subprocess.run([*command, "version"], capture_output=True).returncode != 0:
            assert daemon.poll() is None, "containerd exited"
            assert time.monotonic() < deadline, "containerd did not start"
            time.sleep(0.1)
        archive = write_oci_archive(tmp_path / "busybox.tar", {IMAGE: busybox_image()})
        subprocess.run([*command, "images", "import", str(archive)], check=True, capture_output=True, timeout=120)
        yield command
    finally:
        listed = subprocess.run([*command, "tasks", "ls", "-q"], capture_output=True, text=True, check=False)
        for task in listed.stdout.split():
            subprocess.run([*command, "tasks", "kill", "-s", "SIGKILL", task], capture_output=True, check=False)
            time.sleep(0.2)
            subprocess.run([*command, "tasks", "rm", "-f", task], capture_output=True, check=False)
        daemon.send_signal(signal.SIGTERM)
        try:
            daemon.wait(timeout=20)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait()
        for pid in processes_mentioning(str(address)):  # shims outlive containerd too
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        unmount_below(home)
        shutil.rmtree(home, ignore_errors=True)


def test_containerds_shim_runs_containers_with_berth_runtime(ctr: list[str]) -> None:
    binary = ["--runc-binary", str(BERTH_RUNTIME)]
    result = subprocess.run([*ctr, "run", "--rm", *binary, IMAGE, "once", "sh", "-c", "echo hi from ctr; exit 3"],
                            capture_output=True, text=True, timeout=60, check=False)
    assert (result.returncode, result.stdout) == (3, "hi from ctr\n"), result.stderr
    started = subprocess.run([*ctr, "run", "-d", *binary, IMAGE, "server", "sleep", "300"], capture_output=True,
                             text=True, timeout=60, check=False)
    assert started.returncode == 0, started.stderr
    executed = subprocess.run([*ctr, "tasks", "exec", "--exec-id", "e1", "server", "sh", "-c",
                               "echo exec via ctr; exit 4"], capture_output=True, text=True, timeout=60, check=False)
    assert (executed.returncode, executed.stdout) == (4, "exec via ctr\n"), executed.stderr
    assert "RUNNING" in subprocess.run([*ctr, "tasks", "ls"], capture_output=True, text=True, check=True).stdout
    subprocess.run([*ctr, "tasks", "kill", "-s", "SIGKILL", "server"], check=True, capture_output=True)
    deadline = time.monotonic() + 20
    while "STOPPED" not in subprocess.run([*ctr, "tasks", "ls"], capture_output=True, text=True).stdout:
        assert time.monotonic() < deadline, "the task did not stop"
        time.sleep(0.1)
    assert subprocess.run([*ctr, "tasks", "rm", "server"], capture_output=True).returncode == 0
    assert subprocess.run([*ctr, "containers", "rm", "server"], capture_output=True).returncode == 0


@pytest.fixture
def podman(tmp_path: Path) -> Iterator[list[str]]:
    """podman with its own root and run root, driving berth-runtime; yields the command."""
    if shutil.which("podman") is None:
        pytest.skip("Debian's podman is not installed")
    home = Path(f"/tmp/bpod-{os.getpid()}")
    home.mkdir()
    command = ["podman", "--root", str(home / "root"), "--runroot", str(home / "run"), "--runtime",
               str(BERTH_RUNTIME), "--cgroup-manager", "cgroupfs", "--events-backend", "file", "--storage-driver",
               "vfs", "--tmpdir", str(home / "tmp")]
    try:
        yield command
    finally:
        subprocess.run([*command, "rm", "--all", "--force", "--time", "0"], capture_output=True, check=False,
                       timeout=120)
        for pid in processes_mentioning(str(home)):  # conmon and anything else left
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        unmount_below(home)
        shutil.rmtree(home, ignore_errors=True)


def test_podman_runs_and_execs_with_berth_runtime(podman: list[str], tmp_path: Path) -> None:
    rootfs = tmp_path / "rootfs"
    make_rootfs(rootfs)
    options = ["--network", "none", "--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024",
               "--rootfs", str(rootfs)]
    result = subprocess.run([*podman, "run", "--rm", *options, "sh", "-c", "echo hi from podman; id -u; exit 5"],
                            capture_output=True, text=True, timeout=120, check=False)
    assert (result.returncode, result.stdout) == (5, "hi from podman\n0\n"), result.stderr
    started = subprocess.run([*podman, "run", "-d", *options, "sleep", "300"], capture_output=True, text=True,
                             timeout=120, check=False)
    assert started.returncode == 0, started.stderr
    container = started.stdout.strip()
    executed = subprocess.run([*podman, "exec", container, "sh", "-c", "echo exec in podman; exit 6"],
                              capture_output=True, text=True, timeout=120, check=False)
    assert (executed.returncode, executed.stdout) == (6, "exec in podman\n"), executed.stderr
    removed = subprocess.run([*podman, "rm", "--force", "--time", "0", container], capture_output=True, text=True,
                             timeout=120, check=False)
    assert removed.returncode == 0, removed.stderr
