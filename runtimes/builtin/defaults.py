"""The ``config.json`` that ``berth-runtime spec`` writes: a starting point to edit, like ``runc spec``'s.

It runs ``sh`` on a terminal as root in new pid, network, ipc, uts and mount namespaces (plus user with
``--rootless``) with a read-only ``rootfs``, the usual ``/proc``, ``/dev``, ``/sys`` and cgroup mounts,
three capabilities, ``RLIMIT_NOFILE`` 1024, no_new_privileges, and the usual masked and read-only paths.
"""

from __future__ import annotations

import json
import os

from berth.core.errdefs import AlreadyExists
from berth.core.linux import DEFAULT_MOUNTS, MASKED_PATHS, READONLY_PATHS
from berth.runtimes.builtin.state import OCI_VERSION

TYPE_CHECKING = False  # not typing's: importing typing costs every runtime call ~5 ms
if TYPE_CHECKING:
    from typing import Any

__all__ = ["default_spec", "write_default_spec"]

_CAPS = ["CAP_AUDIT_WRITE", "CAP_KILL", "CAP_NET_BIND_SERVICE"]


def default_spec(rootless: bool = False) -> dict[str, Any]:
    """The default spec (see the module docstring)."""
    mounts = json.loads(json.dumps(DEFAULT_MOUNTS))  # a deep copy
    if rootless:  # no group 5 to own the ptys in a user namespace of one id
        next(m for m in mounts if m["type"] == "devpts")["options"].remove("gid=5")
    namespaces = [{"type": kind} for kind in ("pid", "network", "ipc", "uts", "mount")]
    linux: dict[str, Any] = {
        "resources": {"devices": [{"allow": False, "access": "rwm"}]},
        "namespaces": namespaces,
        "maskedPaths": list(MASKED_PATHS),
        "readonlyPaths": list(READONLY_PATHS),
    }
    if rootless:
        namespaces.append({"type": "user"})
        uid, gid = os.getuid(), os.getgid()
        linux["uidMappings"] = [{"containerID": 0, "hostID": uid, "size": 1}]
        linux["gidMappings"] = [{"containerID": 0, "hostID": gid, "size": 1}]
        del linux["resources"]
    return {
        "ociVersion": OCI_VERSION,
        "process": {
            "terminal": True, "user": {"uid": 0, "gid": 0}, "args": ["sh"],
            "env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "TERM=xterm"],
            "cwd": "/",
            "capabilities": {kind: list(_CAPS) for kind in ("bounding", "effective", "permitted", "ambient")},
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
            "noNewPrivileges": True,
        },
        "root": {"path": "rootfs", "readonly": True},
        "hostname": "berth",
        "mounts": mounts,
        "linux": linux,
    }


def write_default_spec(bundle: str, rootless: bool = False) -> None:
    """Write the default spec to ``bundle/config.json``; AlreadyExists if one is there."""
    path = os.path.join(bundle, "config.json")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        raise AlreadyExists(f"{path} exists: remove it first") from None
    with os.fdopen(fd, "w") as f:
        json.dump(default_spec(rootless), f, indent=2)
        f.write("\n")
