"""Real drivers of ``berth-runtime``: containerd's own shim (``ctr run --runc-binary``) and podman
(``podman --runtime``), each with private state in a temporary directory, stopped by pid afterwards."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.imagebuild import busybox_image, write_oci_archive
from tests.runtime_fixture import berth_runtime_binary

pytestmark = pytest.mark.privileged

IMAGE = "docker.io/library/berth-busybox:1"
TIMEOUT = 60


@pytest.fixture(scope="module")
def image_archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A busybox image as an OCI archive (what ``ctr images import`` and ``podman load`` read)."""
    return write_oci_archive(tmp_path_factory.mktemp("image") / "busybox.tar", {IMAGE: busybox_image()})


def pids_mentioning(text: str) -> list[int]:
    """Processes whose command line contains ``text`` (our private socket or state directory)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            with contextlib.suppress(OSError):
                if text.encode() in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
    return found


def kill_pids(pids: list[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def unmount_under(base: Path) -> list[str]:
    """Unmount (lazily) whatever is mounted under ``base``; return the targets."""
    with open("/proc/self/mountinfo") as mountinfo:
        targets = [line.split()[4] for line in mountinfo]
    left = [t for t in targets if t.startswith(str(base) + "/")]
    for target in reversed(left):
        subprocess.run(["umount", "-l", target], check=False, capture_output=True)
    return left


def container_cgroups(container_id: str) -> list[Path]:
    return [p for p in Path("/sys/fs/cgroup").glob(f"*/**/*{container_id}*") if p.is_dir()]


def remove_empty_cgroups(path: Path) -> None:
    """rmdir ``path`` and the cgroups below it, deepest first (a cgroup with processes stays)."""
    for child in sorted((p for p in path.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
        with contextlib.suppress(OSError):
            child.rmdir()
    with contextlib.suppress(OSError):
        path.rmdir()


class Containerd:
    """A private containerd: its own root, state, socket and namespace."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.address = str(base / "c.sock")
        self.namespace = f"berth-test-{uuid.uuid4().hex[:8]}"
        config = base / "config.toml"
        config.write_text(f'version = 2\nroot = "{base}/root"\nstate = "{base}/state"\n'
                          f'disabled_plugins = ["io.containerd.grpc.v1.cri"]\n[grpc]\naddress = "{self.address}"\n')
        self.log = (base / "containerd.log").open("wb")
        self.proc = subprocess.Popen(["containerd", "--config", str(config)], stdout=self.log, stderr=self.log,
                                     stdin=subprocess.DEVNULL)

    def ctr(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(["ctr", "--address", self.address, "--namespace", self.namespace, *args],
                                capture_output=True, text=True, timeout=TIMEOUT, stdin=subprocess.DEVNULL, check=False)
        if check and result.returncode != 0:
            pytest.fail(f"ctr {' '.join(args)} exited {result.returncode}: {result.stderr.strip()}")
        return result

    def wait_ready(self) -> None:
        deadline = time.monotonic() + 30
        while self.ctr("version", check=False).returncode != 0:
            if time.monotonic() > deadline or self.proc.poll() is not None:
                pytest.fail("the private containerd did not start")
            time.sleep(0.05)

    def stop(self) -> None:
        """Kill the shims (found by our socket in their command line), containerd and any container left in
        the namespace's cgroups, by pid; remove those cgroups."""
        kill_pids([pid for pid in pids_mentioning(self.address) if pid != self.proc.pid])
        self.proc.kill()
        self.proc.wait()
        self.log.close()
        cgroups = [p for p in Path("/sys/fs/cgroup").glob(f"*/{self.namespace}") if p.is_dir()]
        kill_pids([int(pid) for cgroup in cgroups for procs in cgroup.rglob("cgroup.procs")
                   for pid in procs.read_text().split()])
        unmount_under(self.base)
        shutil.rmtree(f"/run/containerd/runc/{self.namespace}", ignore_errors=True)
        for cgroup in cgroups:
            remove_empty_cgroups(cgroup)


@pytest.fixture
def containerd(image_archive: Path) -> Iterator[Containerd]:
    if shutil.which("containerd") is None or shutil.which("ctr") is None:
        pytest.skip("containerd is not installed")
    base = Path(tempfile.mkdtemp(prefix="berth-ctrd-", dir="/tmp"))  # short: the socket path has a limit
    daemon = Containerd(base)
    try:
        daemon.wait_ready()
        daemon.ctr("images", "import", str(image_archive))
        yield daemon
    finally:
        daemon.stop()
        shutil.rmtree(base, ignore_errors=True)


def test_ctr_runs_execs_kills_and_deletes_with_berth_runtime(containerd: Containerd) -> None:
    runtime = berth_runtime_binary()
    result = containerd.ctr("run", "--runc-binary", runtime, "--rm", IMAGE, "hello", "echo", "hi")
    assert result.stdout == "hi\n"

    containerd.ctr("run", "-d", "--runc-binary", runtime, IMAGE, "sleeper", "sleep", "60")
    tasks = containerd.ctr("tasks", "ls").stdout
    assert "sleeper" in tasks
    assert "RUNNING" in tasks
    state_root = Path(f"/run/containerd/runc/{containerd.namespace}")
    assert (state_root / "sleeper" / "state.json").exists()  # the shim drove berth-runtime, not runc
    exec_result = containerd.ctr("tasks", "exec", "--exec-id", "e1", "sleeper", "sh", "-c", "echo from-exec $$")
    assert exec_result.stdout.startswith("from-exec ")
    containerd.ctr("tasks", "kill", "--signal", "SIGKILL", "sleeper")
    deadline = time.monotonic() + 10
    while "STOPPED" not in containerd.ctr("tasks", "ls").stdout:
        assert time.monotonic() < deadline, "the task did not stop"
        time.sleep(0.05)
    containerd.ctr("tasks", "delete", "sleeper")
    containerd.ctr("containers", "delete", "sleeper")
    assert containerd.ctr("containers", "ls", "-q").stdout == ""
    assert not (state_root / "sleeper").exists()
    assert container_cgroups("sleeper") == []


class Podman:
    """Debian's podman with private storage and run root, and this machine's required options."""

    def __init__(self, base: Path) -> None:
        self.base = base

    def __call__(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        command = ["podman", "--root", str(self.base / "root"), "--runroot", str(self.base / "runroot"),
                   "--runtime", berth_runtime_binary(), "--cgroup-manager", "cgroupfs", "--events-backend", "file",
                   "--storage-driver", "vfs", *args]
        result = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT, stdin=subprocess.DEVNULL,
                                check=False)
        if check and result.returncode != 0:
            pytest.fail(f"podman {' '.join(args)} exited {result.returncode}: {result.stderr.strip()}")
        return result


#: This machine's required limits, and no network: podman's default one is a CNI bridge on the host.
LIMITS = ("--network", "none", "--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024")


@pytest.fixture
def podman(image_archive: Path) -> Iterator[Podman]:
    if shutil.which("podman") is None:
        pytest.skip("podman is not installed")
    client = Podman(Path(tempfile.mkdtemp(prefix="berth-podman-", dir="/tmp")))  # podman: runroot < 50 chars
    podman_cgroups = [p for p in Path("/sys/fs/cgroup").glob("*/libpod_parent") if p.is_dir()]
    bridge_before = Path("/sys/class/net/cni-podman0").exists()
    try:
        client("load", "-i", str(image_archive))
        yield client
    finally:
        client("rm", "--all", "--force", "--time", "0", check=False)
        kill_pids(pids_mentioning(str(client.base)))
        unmount_under(client.base)
        shutil.rmtree(client.base, ignore_errors=True)
        for parent in Path("/sys/fs/cgroup").glob("*/libpod_parent"):  # podman's, when it made them for us
            if parent not in podman_cgroups:
                remove_empty_cgroups(parent)
        if not bridge_before and Path("/sys/class/net/cni-podman0").exists():  # podman makes it at any run
            subprocess.run(["ip", "link", "del", "cni-podman0"], capture_output=True, check=False)


def test_podman_runs_and_execs_with_berth_runtime(podman: Podman) -> None:
    assert podman("run", "--rm", *LIMITS, IMAGE, "echo", "hi").stdout == "hi\n"
    container_id = podman("run", "-d", "--name", "sleeper", *LIMITS, IMAGE, "sleep", "60").stdout.strip()
    assert podman("exec", "sleeper", "sh", "-c", "echo from-exec; id -u").stdout == "from-exec\n0\n"
    assert podman("exec", "-t", "sleeper", "tty").stdout.strip() == "/dev/pts/0"
    assert "Up" in podman("ps").stdout
    podman("kill", "sleeper")
    podman("rm", "sleeper")
    assert podman("ps", "-a", "-q").stdout == ""
    assert container_cgroups(container_id) == []
