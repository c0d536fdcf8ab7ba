"""Reading and checking an OCI bundle: ``config.json`` and the root filesystem it names.

:func:`load_bundle` refuses, with :class:`~berth.core.errdefs.InvalidArgument` naming the field, what the
runtime could only fail on half-way through setup: a missing rootfs, JSON that is not a spec, an unknown
namespace type, a namespace path that does not exist, ID maps without a user namespace, a sysctl that is
not namespaced. Everything is checked before any cgroup, process or mount exists, so a bad bundle leaves
nothing behind. The spec stays the plain JSON mapping (``Bundle.spec``); the accessors give it types.
"""

from __future__ import annotations

import os

from berth.core.errdefs import InvalidArgument, NotFound
from berth.runtimes.builtin import quickjson

TYPE_CHECKING = False  # not typing's: importing typing costs every runtime call ~5 ms
if TYPE_CHECKING:
    from typing import Any

__all__ = ["NAMESPACE_TYPES", "Bundle", "check_container_id", "load_bundle", "load_process"]

#: OCI namespace type -> the /proc/<pid>/ns file name.
NAMESPACE_TYPES = {
    "pid": "pid", "network": "net", "mount": "mnt", "ipc": "ipc", "uts": "uts", "user": "user", "cgroup": "cgroup",
    "time": "time",
}
_ID_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_+-.")
_IPC_SYSCTLS = frozenset(("kernel.msgmax", "kernel.msgmnb", "kernel.msgmni", "kernel.sem", "kernel.shmall",
                          "kernel.shmmax", "kernel.shmmni", "kernel.shm_rmid_forced"))


def check_container_id(container_id: str) -> str:
    """Return ``container_id`` if runc would accept it (letters, digits, ``_+-.``; not ``.`` or ``..``)."""
    if not container_id or container_id in (".", "..") or not set(container_id) <= _ID_CHARS:
        raise InvalidArgument(f"invalid container id {container_id!r}: use letters, digits and '_+-.'")
    return container_id


def _mapping(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidArgument(f"{where} must be an object, not {type(value).__name__}")
    return value


def _list(value: Any, where: str) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise InvalidArgument(f"{where} must be an array, not {type(value).__name__}")
    return value


def _strings(value: Any, where: str) -> list[str]:
    items = _list(value, where)
    if not all(isinstance(item, str) for item in items):
        raise InvalidArgument(f"{where} must be an array of strings")
    return items


def _check_text(value: Any, where: str) -> None:
    """Every string in ``value`` (a parsed JSON document) must reach a system call whole: no NUL byte
    and nothing UTF-8 cannot encode (a lone surrogate from a ``\\ud800`` escape)."""
    if isinstance(value, str):
        if "\x00" in value:
            raise InvalidArgument(f"{where} holds a NUL character")
        try:
            value.encode()
        except UnicodeEncodeError:
            raise InvalidArgument(f"{where} is not valid Unicode (a lone surrogate)") from None
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_text(key, f"{where} key {key!r}")
            _check_text(item, f"{where}.{key}" if where else key)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _check_text(item, f"{where}[{i}]")


def _id(value: Any, where: str) -> int:
    """A uid or gid: an integer from 0 to 2**32 - 2 (2**32 - 1 means "no id" to the kernel)."""
    number = _int(value, where, 0)
    if not 0 <= number <= 0xFFFFFFFE:
        raise InvalidArgument(f"{where} {number} is out of range (0 to 4294967294)")
    return number


def _int(value: Any, where: str, default: int | None = None) -> int:
    if value is None and default is not None:
        return default
    if not isinstance(value, int) or isinstance(value, bool):
        raise InvalidArgument(f"{where} must be an integer, not {value!r}")
    return value


class Bundle:
    """A checked bundle: its directory, its spec (the ``config.json`` mapping) and its rootfs path."""

    __slots__ = ("path", "rootfs", "spec")

    def __init__(self, path: str, spec: dict[str, Any], rootfs: str) -> None:
        self.path = path
        self.spec = spec
        self.rootfs = rootfs

    @property
    def linux(self) -> dict[str, Any]:
        return _mapping(self.spec.get("linux"), "linux")

    @property
    def process(self) -> dict[str, Any]:
        return _mapping(self.spec.get("process"), "process")

    @property
    def annotations(self) -> dict[str, str]:
        return _mapping(self.spec.get("annotations"), "annotations")

    def namespaces(self) -> dict[str, str]:
        """OCI namespace type -> path to join, or "" for a new namespace."""
        return namespaces_of(self.spec)

    def hooks(self, phase: str) -> list[dict[str, Any]]:
        return _list(_mapping(self.spec.get("hooks"), "hooks").get(phase), f"hooks.{phase}")


def namespaces_of(spec: dict[str, Any]) -> dict[str, str]:
    """The namespaces of a spec (checked by :func:`load_bundle`): type -> path to join or ""."""
    linux = spec.get("linux") or {}
    return {ns["type"]: ns.get("path") or "" for ns in linux.get("namespaces") or ()}


def load_bundle(path: str) -> Bundle:
    """Read and check the bundle in directory ``path`` (see the module docstring for what is refused)."""
    path = os.path.abspath(path)
    config_path = os.path.join(path, "config.json")
    try:
        with open(config_path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise NotFound(f"bundle {path}: no config.json") from None
    except OSError as exc:
        raise InvalidArgument(f"bundle {path}: cannot read config.json: {exc.strerror}") from None
    try:
        spec = quickjson.loads(raw)
    except ValueError as exc:
        raise InvalidArgument(f"bundle {path}: config.json is not valid JSON: {exc}") from None
    if not isinstance(spec, dict):
        raise InvalidArgument(f"bundle {path}: config.json must hold a JSON object")
    root = _mapping(spec.get("root"), "root")
    root_path = root.get("path")
    if not isinstance(root_path, str) or not root_path:
        raise InvalidArgument(f"bundle {path}: root.path is required")
    rootfs = os.path.normpath(os.path.join(path, root_path))
    if not os.path.isdir(rootfs):
        raise InvalidArgument(f"bundle {path}: rootfs {rootfs} does not exist or is not a directory")
    check_spec(spec)
    return Bundle(path, spec, rootfs)


def check_spec(spec: dict[str, Any]) -> None:
    """Raise InvalidArgument for the first field of ``spec`` the runtime cannot honour."""
    _check_text({key: value for key, value in spec.items() if key not in ("annotations", "process")}, "")
    process = _mapping(spec.get("process"), "process")
    if not process:
        raise InvalidArgument("process is required")
    check_process(process)
    linux = _mapping(spec.get("linux"), "linux")
    seen: set[str] = set()
    for i, ns in enumerate(_list(linux.get("namespaces"), "linux.namespaces")):
        ns = _mapping(ns, f"linux.namespaces[{i}]")
        kind = ns.get("type")
        if kind not in NAMESPACE_TYPES:
            raise InvalidArgument(f"linux.namespaces[{i}]: unknown namespace type {kind!r} "
                                  f"(known: {', '.join(sorted(NAMESPACE_TYPES))})")
        if kind in seen:
            raise InvalidArgument(f"linux.namespaces: {kind} appears twice")
        seen.add(kind)
        ns_path = ns.get("path")
        if ns_path is not None and not isinstance(ns_path, str):
            raise InvalidArgument(f"linux.namespaces[{i}].path must be a string")
        if ns_path and not os.path.exists(ns_path):
            raise InvalidArgument(f"linux.namespaces[{i}]: {kind} namespace path {ns_path} does not exist")
    if "mount" not in seen:
        raise InvalidArgument("linux.namespaces: a mount namespace is required")
    for key in ("uidMappings", "gidMappings"):
        maps = _list(linux.get(key), f"linux.{key}")
        if maps and "user" not in seen:
            raise InvalidArgument(f"linux.{key} needs a user namespace")
        for j, entry in enumerate(maps):
            entry = _mapping(entry, f"linux.{key}[{j}]")
            for field in ("containerID", "hostID", "size"):
                _int(entry.get(field), f"linux.{key}[{j}].{field}")
    if "user" in seen and not namespaces_of(spec)["user"] and (
            not linux.get("uidMappings") or not linux.get("gidMappings")):
        raise InvalidArgument("a new user namespace needs linux.uidMappings and linux.gidMappings")
    for key in _mapping(linux.get("sysctl"), "linux.sysctl"):
        _check_sysctl(key, seen)
    for i, mount in enumerate(_list(spec.get("mounts"), "mounts")):
        mount = _mapping(mount, f"mounts[{i}]")
        dest = mount.get("destination")
        if not isinstance(dest, str) or not dest:
            raise InvalidArgument(f"mounts[{i}].destination is required")
        _strings(mount.get("options"), f"mounts[{i}].options")
    for phase, hooks in _mapping(spec.get("hooks"), "hooks").items():
        for j, hook in enumerate(_list(hooks, f"hooks.{phase}")):
            hook = _mapping(hook, f"hooks.{phase}[{j}]")
            hook_path = hook.get("path")
            if not isinstance(hook_path, str) or not os.path.isabs(hook_path):
                raise InvalidArgument(f"hooks.{phase}[{j}].path must be an absolute path")
            _strings(hook.get("args"), f"hooks.{phase}[{j}].args")
            _strings(hook.get("env"), f"hooks.{phase}[{j}].env")
    for i, path in enumerate(_strings(linux.get("maskedPaths"), "linux.maskedPaths")
                             + _strings(linux.get("readonlyPaths"), "linux.readonlyPaths")):
        if not path.startswith("/"):
            raise InvalidArgument(f"masked or read-only path {i} ({path!r}) must be absolute")


def check_process(process: dict[str, Any], where: str = "process") -> None:
    """Raise InvalidArgument for a malformed OCI process object."""
    _check_text(process, where)
    args = _strings(process.get("args"), f"{where}.args")
    if not args:
        raise InvalidArgument(f"{where}.args must not be empty")
    cwd = process.get("cwd", "/")
    if not isinstance(cwd, str) or not cwd.startswith("/"):
        raise InvalidArgument(f"{where}.cwd must be an absolute path, not {cwd!r}")
    _strings(process.get("env"), f"{where}.env")
    user = _mapping(process.get("user"), f"{where}.user")
    _id(user.get("uid"), f"{where}.user.uid")
    _id(user.get("gid"), f"{where}.user.gid")
    for i, gid in enumerate(_list(user.get("additionalGids"), f"{where}.user.additionalGids")):
        _id(gid, f"{where}.user.additionalGids[{i}]")
    caps = _mapping(process.get("capabilities"), f"{where}.capabilities")
    for kind in ("bounding", "effective", "inheritable", "permitted", "ambient"):
        _strings(caps.get(kind), f"{where}.capabilities.{kind}")
    for i, rlimit in enumerate(_list(process.get("rlimits"), f"{where}.rlimits")):
        rlimit = _mapping(rlimit, f"{where}.rlimits[{i}]")
        if not isinstance(rlimit.get("type"), str) or not rlimit["type"].startswith("RLIMIT_"):
            raise InvalidArgument(f"{where}.rlimits[{i}].type must be an RLIMIT_* name")
        _int(rlimit.get("soft"), f"{where}.rlimits[{i}].soft")
        _int(rlimit.get("hard"), f"{where}.rlimits[{i}].hard")


def load_process(path: str) -> dict[str, Any]:
    """Read an OCI process object (``exec --process FILE``) and check it."""
    try:
        with open(path, "rb") as f:
            process = quickjson.loads(f.read())
    except OSError as exc:
        raise InvalidArgument(f"cannot read process file {path}: {exc.strerror}") from None
    except ValueError as exc:
        raise InvalidArgument(f"process file {path} is not valid JSON: {exc}") from None
    if not isinstance(process, dict):
        raise InvalidArgument(f"process file {path} must hold a JSON object")
    check_process(process)
    return process


def _check_sysctl(key: str, namespaces: set[str]) -> None:
    if key in _IPC_SYSCTLS or key.startswith("fs.mqueue."):
        if "ipc" not in namespaces:
            raise InvalidArgument(f"linux.sysctl {key} needs an ipc namespace")
        return
    if key.startswith("net."):
        if "network" not in namespaces:
            raise InvalidArgument(f"linux.sysctl {key} needs a network namespace")
        return
    if key in ("kernel.hostname", "kernel.domainname"):
        if "uts" not in namespaces:
            raise InvalidArgument(f"linux.sysctl {key} needs a uts namespace")
        return
    raise InvalidArgument(f"linux.sysctl {key} is not namespaced: the runtime will not change it for the host")
