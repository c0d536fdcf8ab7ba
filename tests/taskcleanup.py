"""Removing what a test daemon's tasks left behind: shims, containers, rootfs mounts.

Shims outlive berthd by design, so stopping a test daemon is not enough. :func:`cleanup_tasks` kills
the shims recorded under a state directory (by their pid files), force-deletes every container the
runtime still knows, and unmounts the bundles' rootfs mounts.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path

from berth.core.snapshots.mount import unmount_all
from berth.runtimes.shim.manager import shim_socket_path

TASKS_STATE = "io.berth.service.v1.tasks-service"
#: The tasks service's default ``shim_socket_dir`` (the test daemons keep it).
SHIM_SOCKET_DIR = Path("/run/berth/s")


def _is_shim(pid: int) -> bool:
    try:
        return b"berth.runtimes.shim" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def shim_pids(state: Path) -> list[int]:
    """The pids of the running shims recorded under the daemon state directory ``state``."""
    pids = []
    for path in (state / TASKS_STATE / "shims").glob("*/shim.pid"):
        with contextlib.suppress(OSError, ValueError):
            pid = int(path.read_text())
            if _is_shim(pid):
                pids.append(pid)
    return pids


def cleanup_tasks(state: Path) -> None:
    """Kill the shims and containers a daemon with state directory ``state`` started."""
    pids = shim_pids(state)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while any(_is_shim(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.02)
    for directory in (state / TASKS_STATE / "shims").glob("*"):  # a SIGKILLed shim leaves its socket
        with contextlib.suppress(OSError):
            shim_socket_path(SHIM_SOCKET_DIR, directory).unlink()
    roots: set[tuple[str, str]] = set()
    for record in (state / TASKS_STATE).glob("*/*/task.json"):
        with contextlib.suppress(OSError, ValueError, KeyError):
            runtime = json.loads(record.read_text())["runtime"]
            roots.add((runtime["binary"], runtime["root"]))
    for binary, root in roots:
        if not Path(root).is_dir():
            continue
        listed = subprocess.run([binary, "--root", root, "list", "-q"], capture_output=True, text=True,
                                check=False, timeout=30)
        for container_id in listed.stdout.split():
            subprocess.run([binary, "--root", root, "delete", "--force", container_id], capture_output=True,
                           check=False, timeout=30)
    for rootfs in (state / TASKS_STATE).glob("*/*/rootfs"):
        with contextlib.suppress(OSError):
            unmount_all(rootfs)
    # The runtimes remove a container's cgroup but not its parents (/berth/<namespace>), as with containerd's
    # /<namespace>: remove those this daemon's namespaces made, when empty, and /berth itself.
    namespaces = {path.name for path in (state / TASKS_STATE).glob("*") if path.name not in ("shims", ".spec")}
    for hierarchy in Path("/sys/fs/cgroup").iterdir():
        for parent in [*(hierarchy / "berth" / ns for ns in namespaces), hierarchy / "berth"]:
            with contextlib.suppress(OSError):
                parent.rmdir()
