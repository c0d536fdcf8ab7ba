"""Busybox bundles and OCI runtime command lines for the ``berth-runtime`` tests, with a teardown that
always leaves the machine as it found it.

:class:`Runtime` drives one runtime binary (``berth-runtime`` or ``runc``) with a private ``--root`` in the
test's temporary directory. :class:`RuntimeLab` hands those out, writes bundles whose cgroups live under
one cgroup path per test, and on teardown kills every container process by pid, deletes the containers,
and then checks (and cleans) what a broken runtime could leave: container processes, mounts under the
temporary directory, cgroup directories and state directories.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

BUSYBOX = Path("/bin/busybox")
CGROUP_ROOT = Path("/sys/fs/cgroup")
RUNC = shutil.which("runc")
TIMEOUT = 30


def berth_runtime_binary() -> str:
    """The installed ``berth-runtime`` launcher (the one next to the test interpreter first)."""
    found = shutil.which("berth-runtime", path=os.pathsep.join([str(Path(sys.executable).parent),
                                                                 os.environ.get("PATH", "")]))
    if found is None:
        pytest.fail("berth-runtime is not installed (pip install -e .)")
    return found


def make_rootfs(path: Path) -> Path:
    """A busybox root filesystem: Debian's static busybox, one symlink per applet, passwd and group."""
    (path / "bin").mkdir(parents=True)
    for folder in ("dev", "etc", "proc", "sys", "tmp", "root", "home/user"):
        (path / folder).mkdir(parents=True, exist_ok=True)
    (path / "tmp").chmod(0o1777)
    shutil.copy2(BUSYBOX, path / "bin" / "busybox")
    applets = subprocess.run([str(BUSYBOX), "--list"], check=True, capture_output=True, text=True).stdout.split()
    for applet in applets:
        if applet != "busybox":
            (path / "bin" / applet).symlink_to("busybox")
    (path / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\nuser:x:1000:1000:user:/home/user:/bin/sh\n")
    (path / "etc" / "group").write_text("root:x:0:\nuser:x:1000:\n")
    return path


@functools.cache
def _runc_spec_text() -> str:
    with tempfile.TemporaryDirectory(prefix="berth-runc-spec-") as scratch:
        subprocess.run([str(RUNC), "spec", "--bundle", scratch], check=True, capture_output=True)
        return (Path(scratch) / "config.json").read_text()


def base_spec() -> dict[str, Any]:
    """A fresh copy of ``runc spec``'s default configuration, without a terminal (skips without runc)."""
    if RUNC is None:
        pytest.skip("runc is not installed")
    spec: dict[str, Any] = json.loads(_runc_spec_text())
    spec["process"]["terminal"] = False
    return spec


class Runtime:
    """One runtime binary with its own state root."""

    def __init__(self, name: str, binary: str, root: Path) -> None:
        self.name, self.binary, self.root = name, binary, root

    def command(self, *args: str) -> list[str]:
        return [self.binary, "--root", str(self.root), *args]

    def run(self, *args: str, check: bool = True, timeout: float = TIMEOUT, stdin_text: str | None = None,
            stdin: int | None = None) -> subprocess.CompletedProcess[str]:
        """Run one command; ``check`` fails the test with the runtime's stderr on a non-zero status."""
        result = subprocess.run(self.command(*args), capture_output=True, text=True, timeout=timeout,
                                input=stdin_text, stdin=stdin if stdin_text is None else None, check=False)
        if check and result.returncode != 0:
            pytest.fail(f"{self.name} {' '.join(args)} exited {result.returncode}: {result.stderr.strip()}")
        return result

    def create(self, bundle: Path, container_id: str, *args: str, check: bool = True) -> tuple[int, Path, Path]:
        """``create`` with the container's stdout and stderr going to files next to the bundle (the init
        keeps them open, so pipes would never reach EOF): (status, stdout file, stderr file)."""
        out, err = bundle / f"{container_id}.out", bundle / f"{container_id}.err"
        with out.open("wb") as stdout, err.open("wb") as stderr:
            status = subprocess.run(self.command("create", "--bundle", str(bundle), *args, container_id),
                                    stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr, timeout=TIMEOUT,
                                    check=False).returncode
        if check and status != 0:
            pytest.fail(f"{self.name} create exited {status}: {err.read_text().strip()}")
        return status, out, err

    def detached(self, *args: str) -> None:
        """A command that leaves a process holding its stdio (``run -d``, ``exec -d``): no pipes."""
        status = subprocess.run(self.command(*args), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, timeout=TIMEOUT, check=False).returncode
        if status != 0:
            pytest.fail(f"{self.name} {' '.join(args)} exited {status}")

    def state(self, container_id: str) -> dict[str, Any]:
        state: dict[str, Any] = json.loads(self.run("state", container_id).stdout)
        return state

    def container_ids(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(entry.name for entry in self.root.iterdir() if entry.is_dir())

    def pid_of(self, container_id: str) -> int:
        """The init pid recorded for the container, 0 when none can be read."""
        result = self.run("state", container_id, check=False)
        if result.returncode != 0:
            return 0
        with contextlib.suppress(ValueError):
            return int(json.loads(result.stdout).get("pid") or 0)
        return 0

    def clean(self) -> None:
        """Kill every container's processes by pid and delete it."""
        for container_id in self.container_ids():
            pid = self.pid_of(container_id)
            if pid > 0:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            self.run("delete", "--force", container_id, check=False)


class RuntimeLab:
    """Runtimes, bundles and the leftovers check of one test."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.token = uuid.uuid4().hex[:10]
        self.cgroup_parent = f"/berth-test-{self.token}"
        self.runtimes: list[Runtime] = []
        self.rootfs = make_rootfs(base / "rootfs")
        self.bundles = 0

    def runtime(self, name: str) -> Runtime:
        """``berth-runtime`` or ``runc`` with a state root of its own."""
        if name == "runc":
            if RUNC is None:
                pytest.skip("runc is not installed")
            binary = RUNC
        else:
            binary = berth_runtime_binary()
        runtime = Runtime(name, binary, self.base / f"root-{name}-{len(self.runtimes)}")
        self.runtimes.append(runtime)
        return runtime

    def bundle(self, args: Sequence[str], spec: dict[str, Any] | None = None, *, name: str | None = None) -> Path:
        """A bundle over the shared busybox rootfs (read-only, so two containers may share it) running
        ``args``; its cgroup is ``<this test's parent>/<bundle name>``."""
        self.bundles += 1
        name = name or f"bundle{self.bundles}"
        path = self.base / name
        path.mkdir()
        spec = copy.deepcopy(spec) if spec is not None else base_spec()
        spec["root"] = {"path": str(self.rootfs), "readonly": True}
        spec["process"]["args"] = list(args)
        spec["linux"]["cgroupsPath"] = f"{self.cgroup_parent}/{name}"
        (path / "config.json").write_text(json.dumps(spec, indent=2))
        return path

    def cgroup_parents(self) -> list[Path]:
        """This test's parent cgroup in each hierarchy (runtimes create it and, as runc, leave it)."""
        return sorted(p for p in [*CGROUP_ROOT.glob(f"*{self.cgroup_parent}"),
                                  *CGROUP_ROOT.glob(f"*/*{self.cgroup_parent}")] if p.is_dir())

    def cgroup_leftovers(self) -> list[Path]:
        """Container cgroups still present under this test's parent cgroups."""
        return [child for parent in self.cgroup_parents() for child in sorted(parent.iterdir()) if child.is_dir()]

    def mount_leftovers(self) -> list[str]:
        base = str(self.base)
        with open("/proc/self/mountinfo") as mountinfo:
            targets = [line.split()[4] for line in mountinfo]
        return [t for t in targets if t == base or t.startswith(base + "/")]

    def process_leftovers(self) -> list[int]:
        """Processes in this test's cgroups, or whose cwd or root is in its directory."""
        found = [int(pid) for path in self.cgroup_leftovers() for procs in path.rglob("cgroup.procs")
                 for pid in procs.read_text().split()]
        base = str(self.base)
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            for link in ("root", "cwd"):
                with contextlib.suppress(OSError):
                    if os.readlink(entry / link).startswith(base):
                        found.append(int(entry.name))
                        break
        return found

    def teardown(self) -> list[str]:
        """Clean everything up; return what had to be cleaned beyond deleting the containers."""
        for runtime in self.runtimes:
            runtime.clean()
        problems = []
        deadline = time.monotonic() + 5
        while (pids := self.process_leftovers()) and time.monotonic() < deadline:
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.05)
        if pids:
            problems.append(f"processes left: {pids}")
        for target in reversed(self.mount_leftovers()):
            problems.append(f"mount left: {target}")
            subprocess.run(["umount", "-l", target], check=False, capture_output=True)
        for path in self.cgroup_leftovers():
            problems.append(f"cgroup left: {path}")
            for child in sorted(path.rglob("*"), key=lambda p: len(p.parts), reverse=True):
                if child.is_dir():
                    with contextlib.suppress(OSError):
                        child.rmdir()
            with contextlib.suppress(OSError):
                path.rmdir()
        for parent in self.cgroup_parents():
            with contextlib.suppress(OSError):
                parent.rmdir()
        for runtime in self.runtimes:
            if runtime.name != "runc" and runtime.container_ids():
                problems.append(f"state left in {runtime.root}: {runtime.container_ids()}")
        return problems


@contextlib.contextmanager
def runtime_lab(base: Path) -> Iterator[RuntimeLab]:
    """A :class:`RuntimeLab` whose teardown runs however the test ends; leftovers fail the test."""
    if os.geteuid() != 0:
        pytest.skip("the runtime tests need root")
    lab = RuntimeLab(base)
    try:
        yield lab
    finally:
        problems = lab.teardown()
    if problems:
        pytest.fail("the test left things behind: " + "; ".join(problems))
