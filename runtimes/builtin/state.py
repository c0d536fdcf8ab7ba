"""A container's state directory, ``<root>/<id>/``, and its status read from the real process.

``state.json`` holds what the runtime needs after ``create`` has exited: the init's pid and start time
(the 22nd field of ``/proc/<pid>/stat``, so a recycled pid is never mistaken for the container), the
bundle, the spec as it was created, the cgroups, and the pid of the ``create`` call while it runs.
``exec.fifo`` exists from ``create`` until ``start``: the init is blocked opening it for writing.

The status follows the OCI states: ``creating`` while the creating process is alive and the init has not
reported ready, ``created`` while the init waits on the fifo, ``running`` after ``start``, ``paused`` while
frozen, and ``stopped`` once the init has exited (a zombie counts as exited).
"""

from __future__ import annotations

import os
import time

from berth.core.errdefs import AlreadyExists, NotFound
from berth.runtimes.builtin import quickjson
from berth.runtimes.builtin.bundle import check_container_id
from berth.runtimes.builtin.cgroups import Cgroups

TYPE_CHECKING = False  # not typing's: importing typing costs every runtime call ~5 ms
if TYPE_CHECKING:
    from typing import Any

__all__ = ["DEFAULT_ROOT", "OCI_VERSION", "Container", "process_start_time", "rfc3339"]

DEFAULT_ROOT = "/run/berth-runtime"
OCI_VERSION = "1.0.2"
STATE_FILE = "state.json"
FIFO = "exec.fifo"


def process_start_time(pid: int) -> int | None:
    """The start time (clock ticks after boot) of a live process, or None if it is gone or a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = raw[raw.rindex(b")") + 2:].split()
    if fields[0] in (b"Z", b"X"):
        return None
    return int(fields[19])


def rfc3339(seconds: float) -> str:
    """UTC time with nanoseconds, as Go's time.RFC3339Nano writes it (containerd parses it)."""
    whole = int(seconds)
    tm = time.gmtime(whole)
    return time.strftime("%Y-%m-%dT%H:%M:%S", tm) + f".{int((seconds - whole) * 1e9):09d}Z"


class Container:
    """One container's recorded state. ``status`` is computed, never stored."""

    def __init__(self, root: str, container_id: str, record: dict[str, Any]) -> None:
        self.root = root
        self.id = container_id
        self.record = record

    @property
    def dir(self) -> str:
        return os.path.join(self.root, self.id)

    @property
    def fifo(self) -> str:
        return os.path.join(self.dir, FIFO)

    @property
    def pid(self) -> int:
        return int(self.record.get("pid") or 0)

    @property
    def spec(self) -> dict[str, Any]:
        return dict(self.record["spec"])

    @property
    def bundle(self) -> str:
        return str(self.record["bundle"])

    @property
    def cgroups(self) -> Cgroups | None:
        record = self.record.get("cgroups")
        return Cgroups.from_record(record) if record else None

    @classmethod
    def new(cls, root: str, container_id: str, record: dict[str, Any]) -> Container:
        """Make the state directory (mode 0711) and write ``record``; AlreadyExists if the id is taken."""
        check_container_id(container_id)
        os.makedirs(root, mode=0o711, exist_ok=True)
        container = cls(root, container_id, record)
        try:
            os.mkdir(container.dir, 0o711)
        except FileExistsError:
            raise AlreadyExists(f"container {container_id} already exists") from None
        container.save()
        return container

    @classmethod
    def load(cls, root: str, container_id: str) -> Container:
        """The container ``container_id`` under ``root``; NotFound if there is none."""
        check_container_id(container_id)
        try:
            with open(os.path.join(root, container_id, STATE_FILE), "rb") as f:
                record = quickjson.loads(f.read())
        except FileNotFoundError:
            raise NotFound(f"container {container_id} does not exist") from None
        return cls(root, container_id, record)

    @classmethod
    def list(cls, root: str) -> list[Container]:
        """Every container with a state file under ``root``, sorted by id."""
        try:
            names = sorted(os.listdir(root))
        except FileNotFoundError:
            return []
        out = []
        for name in names:
            try:
                out.append(cls.load(root, name))
            except (NotFound, ValueError):
                continue
        return out

    def save(self) -> None:
        """Write the record atomically (a reader sees the old or the new file, never half of one)."""
        tmp = os.path.join(self.dir, f".{STATE_FILE}.{os.getpid()}")
        with open(tmp, "w") as f:
            f.write(quickjson.dumps(self.record))
        os.rename(tmp, os.path.join(self.dir, STATE_FILE))

    def alive(self) -> bool:
        """Whether the init process recorded is still the same live process."""
        pid = self.pid
        return pid > 0 and process_start_time(pid) == self.record.get("start_time")

    def status(self) -> str:
        """creating, created, running, paused or stopped (see the module docstring)."""
        if not self.pid:
            creator = self.record.get("creator_pid")
            if creator and process_start_time(creator) == self.record.get("creator_start_time"):
                return "creating"
            return "stopped"
        if not self.alive():
            return "stopped"
        if os.path.exists(self.fifo):
            return "created"
        cgroups = self.cgroups
        if cgroups is not None and cgroups.is_frozen():
            return "paused"
        return "running"

    def oci_state(self) -> dict[str, Any]:
        """The OCI state JSON (with runc's extra ``rootfs``, ``created`` and ``owner``)."""
        status = self.status()
        return {
            "ociVersion": OCI_VERSION,
            "id": self.id,
            "pid": self.pid if status not in ("stopped", "creating") else 0,
            "status": status,
            "bundle": self.bundle,
            "rootfs": self.record.get("rootfs", ""),
            "created": self.record.get("created", ""),
            "owner": "",
            "annotations": self.record["spec"].get("annotations") or {},
        }

    def remove(self) -> None:
        """Remove the state directory."""
        for name in os.listdir(self.dir):
            os.unlink(os.path.join(self.dir, name))
        os.rmdir(self.dir)
