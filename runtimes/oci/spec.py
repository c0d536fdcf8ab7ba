"""OCI runtime spec generation: an image config plus :class:`SpecOptions` give a ``config.json``.

The defaults are containerd's (``oci/spec.go``, ``oci/spec_opts.go``, 1.x capabilities): pid, ipc,
uts, mount and network namespaces; ``/proc``, ``/dev``, ``/dev/pts``, ``/dev/shm``, ``/dev/mqueue``,
``/sys`` and a read-only ``/sys/fs/cgroup``; 14 capabilities; masked and read-only ``/proc`` and
``/sys`` paths; ``RLIMIT_NOFILE`` 1024; ``noNewPrivileges``; the standard device nodes, every other
device denied by the device cgroup; the cgroup ``/berth/<namespace>/<id>``.

:func:`build_spec` does blocking I/O (it reads the rootfs's ``/etc/passwd`` and ``/etc/group`` and
writes the container's ``/etc`` files); from trio, await :func:`generate_spec`.
"""

from __future__ import annotations

import copy
import os
import stat
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from berth.core.errdefs import InvalidArgument
from berth.core.identifiers import validate_identifier
from berth.core.linux import ALL_CAPABILITIES, DEFAULT_MOUNTS, MASKED_PATHS, READONLY_PATHS
from berth.runtimes.oci.seccomp import default_seccomp_profile
from berth.runtimes.oci.user import UserFiles, resolve_user

__all__ = [
    "ALL_CAPABILITIES",
    "DEFAULT_CAPABILITIES",
    "DEFAULT_PATH",
    "OCI_VERSION",
    "SpecOptions",
    "build_spec",
    "generate_spec",
    "parse_mount",
]

OCI_VERSION = "1.0.2-dev"
DEFAULT_PATH = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
#: The OCI image annotation that carries the image's ``StopSignal``.
STOP_SIGNAL_ANNOTATION = "org.opencontainers.image.stopSignal"

#: containerd 1.x's default capability set.
DEFAULT_CAPABILITIES = (
    "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FSETID", "CAP_FOWNER", "CAP_MKNOD", "CAP_NET_RAW", "CAP_SETGID",
    "CAP_SETUID", "CAP_SETFCAP", "CAP_SETPCAP", "CAP_NET_BIND_SERVICE", "CAP_SYS_CHROOT", "CAP_KILL",
    "CAP_AUDIT_WRITE",
)


_NAMESPACES = ("pid", "ipc", "uts", "mount", "network")


#: (path, type, major, minor) of the device nodes every container gets.
_DEVICES = (("/dev/null", "c", 1, 3), ("/dev/zero", "c", 1, 5), ("/dev/full", "c", 1, 7),
            ("/dev/random", "c", 1, 8), ("/dev/urandom", "c", 1, 9), ("/dev/tty", "c", 5, 0))
#: (type, major, minor) the device cgroup allows besides those: /dev/console, /dev/pts/*, /dev/ptmx.
_EXTRA_ALLOWED = (("c", 5, 1), ("c", 136, None), ("c", 5, 2))
#: /dev entries a privileged container does not get from the host (it has its own).
_HOST_DEV_SKIP = frozenset({"pts", "shm", "fd", "mqueue", "console", ".lxc", ".lxd-mounts", ".udev"})

_CPU_PERIOD = 100_000


@dataclass(kw_only=True)
class SpecOptions:
    """What a container asks for on top of its image's config. Empty values keep the image's."""

    #: Replaces the image's ``Cmd`` (the ``Entrypoint`` stays in front).
    args: list[str] | None = None
    #: ``KEY=VALUE`` set over the image's environment; a bare ``KEY`` unsets it.
    env: list[str] = field(default_factory=list)
    cwd: str = ""
    #: ``name``, ``uid``, ``name:group``, ``uid:gid``: replaces the image's ``User``.
    user: str = ""
    #: OCI mounts (``destination``, ``type``, ``source``, ``options``), see :func:`parse_mount`. One at a
    #: default mount's destination replaces that default.
    mounts: list[dict[str, Any]] = field(default_factory=list)
    read_only: bool = False
    #: Bytes.
    memory_limit: int | None = None
    #: CPUs (fractions allowed), as a CFS quota over a 100 ms period.
    cpus: float | None = None
    pids_limit: int | None = None
    #: Every capability this process holds, every host device, no masked or read-only paths, writable /sys,
    #: no seccomp.
    privileged: bool = False
    cap_add: list[str] = field(default_factory=list)
    cap_drop: list[str] = field(default_factory=list)
    #: Apply containerd's default seccomp profile.
    seccomp: bool = False
    #: Become annotations (after the image's labels; ``annotations`` win over both).
    labels: dict[str, str] = field(default_factory=dict)
    annotations: dict[str, str] = field(default_factory=dict)
    #: Default: the container id (cut to 63 characters).
    hostname: str = ""
    tty: bool = False
    #: Namespace paths to join instead of new ones, by type (``network``: a netns made by a network plugin).
    namespace_paths: dict[str, str] = field(default_factory=dict)
    #: Use a systemd cgroup path (``system.slice:berth-<namespace>:<id>``) instead of ``/berth/<namespace>/<id>``.
    systemd_cgroup: bool = False
    #: Replaces the cgroup path altogether.
    cgroups_path: str = ""
    #: A directory of this container's own where ``hostname``, ``hosts`` and ``resolv.conf`` are written
    #: and bind-mounted into the container; ``None`` leaves the image's files.
    etc_dir: Path | None = None
    #: Extra ``/etc/hosts`` entries, ``(address, names...)``.
    hosts: list[tuple[str, ...]] = field(default_factory=list)
    #: Name servers for ``/etc/resolv.conf``; empty: the host's, without loopback ones.
    dns: list[str] = field(default_factory=list)
    #: ``root.path`` in the spec (relative to the bundle, or absolute).
    rootfs_path: str = "rootfs"


def parse_mount(text: str) -> dict[str, Any]:
    """``type=bind,src=/a,dst=/b,options=rbind:ro`` (ctr's ``--mount``) → an OCI mount.

    ``source``/``src`` and ``destination``/``dst``/``target`` are accepted; ``type`` defaults to
    ``bind`` and a bind mount gets ``rbind`` unless it names ``bind``.

    Raises:
        InvalidArgument: an unknown key, a missing or relative destination.
    """
    fields: dict[str, str] = {}
    for part in text.split(","):
        key, sep, value = part.partition("=")
        if not sep:
            raise InvalidArgument(f"mount {text!r}: {part!r} is not KEY=VALUE")
        key = {"src": "source", "dst": "destination", "target": "destination"}.get(key, key)
        if key not in ("type", "source", "destination", "options"):
            raise InvalidArgument(f"mount {text!r}: unknown key {key!r} (type, src, dst, options)")
        fields[key] = value
    destination = fields.get("destination", "")
    if not destination.startswith("/"):
        raise InvalidArgument(f"mount {text!r}: the destination must be an absolute path")
    kind = fields.get("type") or "bind"
    options = [o for o in fields.get("options", "").split(":") if o]
    if kind == "bind" and "bind" not in options and "rbind" not in options:
        options.insert(0, "rbind")
    return {"destination": destination, "type": kind, "source": fields.get("source", ""), "options": options}


def _merge_env(base: Sequence[str], overrides: Sequence[str]) -> list[str]:
    """containerd's ``replaceOrAppendEnvValues``: set or append ``K=V``; a bare ``K`` removes ``K``."""
    out: dict[str, str | None] = {}
    for entry in base:
        key = entry.partition("=")[0]
        out[key] = entry
    for entry in overrides:
        key, sep, _ = entry.partition("=")
        if not key:
            raise InvalidArgument(f"environment entry {entry!r} has no name")
        if sep:
            out[key] = entry
        elif key in out:
            out[key] = None
    return [entry for entry in out.values() if entry is not None]


def _capability(name: str) -> str:
    upper = name.upper()
    full = upper if upper.startswith("CAP_") else f"CAP_{upper}"
    if full != "CAP_ALL" and full not in ALL_CAPABILITIES:
        raise InvalidArgument(f"unknown capability {name!r}")
    return full


def _available_capabilities() -> list[str]:
    """The capabilities this process holds (``CapEff`` of ``/proc/self/status``), as containerd's
    ``cap.Current``: a container cannot be given what its runtime lacks (runc would fail to apply it).
    Without that file: every capability of ``/proc/sys/kernel/cap_last_cap``."""
    try:
        status = Path("/proc/self/status").read_text()
        mask = int(next(line.split()[1] for line in status.splitlines() if line.startswith("CapEff:")), 16)
    except (OSError, StopIteration, ValueError, IndexError):
        try:
            last = int(Path("/proc/sys/kernel/cap_last_cap").read_text())
        except (OSError, ValueError):
            last = len(ALL_CAPABILITIES) - 1
        mask = (1 << (last + 1)) - 1
    return [name for number, name in enumerate(ALL_CAPABILITIES) if mask >> number & 1]


def _capabilities(options: SpecOptions) -> list[str]:
    """The default (or, privileged, every) capability, less ``cap_drop``, plus ``cap_add`` (as Docker:
    ``--cap-drop ALL --cap-add KILL`` leaves only ``CAP_KILL``)."""
    caps = _available_capabilities() if options.privileged else list(DEFAULT_CAPABILITIES)
    for name in options.cap_drop:
        cap = _capability(name)
        caps = [] if cap == "CAP_ALL" else [c for c in caps if c != cap]
    for name in options.cap_add:
        cap = _capability(name)
        additions = _available_capabilities() if cap == "CAP_ALL" else [cap]
        caps += [c for c in additions if c not in caps]
    return caps


def _host_devices(root: Path = Path("/dev")) -> list[dict[str, Any]]:
    """Every character and block device under ``root`` (containerd's ``HostDevices``)."""
    found: list[dict[str, Any]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not (Path(dirpath) == root and d in _HOST_DEV_SKIP)]
        for name in filenames:
            if Path(dirpath) == root and name in _HOST_DEV_SKIP:
                continue
            path = Path(dirpath) / name
            try:
                st = path.lstat()
            except OSError:
                continue
            if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
                found.append({"path": str(path), "type": "c" if stat.S_ISCHR(st.st_mode) else "b",
                              "major": os.major(st.st_rdev), "minor": os.minor(st.st_rdev),
                              "fileMode": stat.S_IMODE(st.st_mode), "uid": st.st_uid, "gid": st.st_gid})
    return found


def _resolv_conf(options: SpecOptions) -> str:
    if options.dns:
        return "".join(f"nameserver {server}\n" for server in options.dns)
    try:
        host = Path("/etc/resolv.conf").read_text()
    except OSError:
        return ""
    kept = []
    for line in host.splitlines():
        words = line.split()
        if len(words) >= 2 and words[0] == "nameserver" and (words[1].startswith("127.") or words[1] == "::1"):
            continue  # the host's loopback resolver is not reachable from the container's network
        kept.append(line)
    return "\n".join(kept) + "\n"


def _etc_files(options: SpecOptions, hostname: str) -> list[dict[str, Any]]:
    """Write ``hostname``, ``hosts`` and ``resolv.conf`` into ``options.etc_dir`` and return their mounts."""
    assert options.etc_dir is not None
    directory = options.etc_dir
    directory.mkdir(parents=True, exist_ok=True)
    hosts = ["127.0.0.1\tlocalhost", "::1\tlocalhost ip6-localhost ip6-loopback"]
    hosts += ["\t".join((entry[0], " ".join(entry[1:]))) for entry in options.hosts]
    if not any(hostname in entry[1:] for entry in options.hosts):
        hosts.append(f"127.0.1.1\t{hostname}")
    files = {"hostname": hostname + "\n", "hosts": "\n".join(hosts) + "\n", "resolv.conf": _resolv_conf(options)}
    mounts = []
    for name, text in files.items():
        path = directory / name
        temporary = path.with_name(f".{name}.tmp")
        temporary.write_text(text)
        temporary.chmod(0o644)
        os.replace(temporary, path)
        mounts.append({"destination": f"/etc/{name}", "type": "bind", "source": str(path),
                       "options": ["rbind", "rprivate", "ro" if options.read_only else "rw"]})
    return mounts


def _resources(options: SpecOptions) -> dict[str, Any]:
    resources: dict[str, Any] = {}
    if options.privileged:
        resources["devices"] = [{"allow": True, "access": "rwm"}]
    else:
        rules: list[dict[str, Any]] = [{"allow": False, "access": "rwm"}]
        allowed = [(kind, major, minor) for _, kind, major, minor in _DEVICES] + list(_EXTRA_ALLOWED)
        for kind, major, minor in allowed:
            rule: dict[str, Any] = {"allow": True, "type": kind, "major": major, "access": "rwm"}
            if minor is not None:
                rule["minor"] = minor
            rules.append(rule)
        resources["devices"] = rules
    if options.memory_limit is not None:
        if options.memory_limit <= 0:
            raise InvalidArgument("memory limit must be a positive number of bytes")
        resources["memory"] = {"limit": options.memory_limit}
    if options.cpus is not None:
        if options.cpus <= 0:
            raise InvalidArgument("cpus must be positive")
        resources["cpu"] = {"quota": max(1000, round(options.cpus * _CPU_PERIOD)), "period": _CPU_PERIOD}
    if options.pids_limit is not None:
        if options.pids_limit <= 0:
            raise InvalidArgument("pids limit must be positive")
        resources["pids"] = {"limit": options.pids_limit}
    return resources


def _mounts(options: SpecOptions, etc_mounts: list[dict[str, Any]]) -> list[dict[str, Any]]:
    mounts: list[dict[str, Any]] = [copy.deepcopy(dict(m)) for m in DEFAULT_MOUNTS]
    if options.privileged:
        for mount in mounts:
            if mount["type"] in ("sysfs", "cgroup"):
                mount["options"] = ["rw" if o == "ro" else o for o in mount["options"]]
    extra = [*etc_mounts, *(copy.deepcopy(m) for m in options.mounts)]
    for mount in extra:
        destination = mount.get("destination")
        if not isinstance(destination, str) or not destination.startswith("/"):
            raise InvalidArgument(f"mount {mount!r}: the destination must be an absolute path")
    replaced = {os.path.normpath(m["destination"]) for m in extra}
    return [m for m in mounts if m["destination"] not in replaced] + extra


def build_spec(container_id: str, image_config: Mapping[str, Any], options: SpecOptions | None = None, *,
               namespace: str = "default", rootfs: Path | UserFiles | None = None) -> dict[str, Any]:
    """The OCI runtime spec (a JSON-ready dict) of container ``container_id`` in ``namespace``.

    Args:
        image_config: the OCI image config document (its ``config`` object holds ``Entrypoint``, ``Cmd``,
            ``Env``, ``WorkingDir``, ``User``, ``Labels``, ``StopSignal``); ``{}`` for none.
        options: what the container asks for on top of the image.
        rootfs: the container's root filesystem on this host, read (safely) to resolve the user, or its
            :class:`UserFiles` read before; without it only numeric users resolve.

    Blocking: it reads the rootfs and writes ``options.etc_dir``; from trio use :func:`generate_spec`.

    Raises:
        InvalidArgument: no command to run, a relative cwd, a bad option, an unknown capability.
        NotFound: a user or group name the image's ``/etc/passwd`` or ``/etc/group`` lacks.
    """
    options = options or SpecOptions()
    validate_identifier(container_id, "container id")
    validate_identifier(namespace, "namespace")
    config = image_config.get("config") or {}
    if not isinstance(config, Mapping):
        raise InvalidArgument("image config: 'config' must be an object")

    args = [*(config.get("Entrypoint") or []), *(options.args if options.args else (config.get("Cmd") or []))]
    if not args or not all(isinstance(a, str) for a in args):
        raise InvalidArgument(f"container {container_id}: no command to run (the image has no Entrypoint or Cmd)")
    env = _merge_env(list(config.get("Env") or []), options.env)
    if not any(entry.startswith("PATH=") for entry in env):
        env.insert(0, DEFAULT_PATH)
    if options.tty:
        env = _merge_env(env, ["TERM=xterm"])
    cwd = options.cwd or config.get("WorkingDir") or "/"
    if not cwd.startswith("/"):
        raise InvalidArgument(f"working directory {cwd!r} must be an absolute path")
    user = resolve_user(rootfs, options.user or config.get("User") or "")
    caps = _capabilities(options)
    hostname = options.hostname or container_id[:63]

    annotations: dict[str, str] = {}
    annotations.update(config.get("Labels") or {})
    if config.get("StopSignal"):
        annotations[STOP_SIGNAL_ANNOTATION] = str(config["StopSignal"])
    annotations.update(options.labels)
    annotations.update(options.annotations)

    namespaces = []
    for kind in _NAMESPACES:
        entry = {"type": kind}
        if options.namespace_paths.get(kind):
            entry["path"] = options.namespace_paths[kind]
        namespaces.append(entry)
    unknown = set(options.namespace_paths) - set(_NAMESPACES)
    if unknown:
        raise InvalidArgument(f"unknown namespace types {sorted(unknown)} (one of {', '.join(_NAMESPACES)})")

    if options.cgroups_path:
        cgroups_path = options.cgroups_path
    elif options.systemd_cgroup:
        cgroups_path = f"system.slice:berth-{namespace}:{container_id}"
    else:
        cgroups_path = f"/berth/{namespace}/{container_id}"

    etc_mounts = _etc_files(options, hostname) if options.etc_dir is not None else []
    devices = (_host_devices() if options.privileged else
               [{"path": path, "type": kind, "major": major, "minor": minor, "fileMode": 0o666, "uid": 0, "gid": 0}
                for path, kind, major, minor in _DEVICES])
    linux: dict[str, Any] = {
        "namespaces": namespaces,
        "devices": devices,
        "resources": _resources(options),
        "cgroupsPath": cgroups_path,
        "maskedPaths": [] if options.privileged else list(MASKED_PATHS),
        "readonlyPaths": [] if options.privileged else list(READONLY_PATHS),
    }
    if options.seccomp and not options.privileged:
        linux["seccomp"] = default_seccomp_profile(caps)

    spec: dict[str, Any] = {
        "ociVersion": OCI_VERSION,
        "process": {
            "terminal": options.tty,
            "user": user.to_spec(),
            "args": args,
            "env": env,
            "cwd": cwd,
            "capabilities": {"bounding": list(caps), "effective": list(caps), "permitted": list(caps)},
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
            "noNewPrivileges": True,
        },
        "root": {"path": options.rootfs_path, "readonly": options.read_only},
        "hostname": hostname,
        "mounts": _mounts(options, etc_mounts),
        "linux": linux,
    }
    if annotations:
        spec["annotations"] = annotations
    return spec


async def generate_spec(container_id: str, image_config: Mapping[str, Any], options: SpecOptions | None = None,
                        *, namespace: str = "default", rootfs: Path | UserFiles | None = None) -> dict[str, Any]:
    """:func:`build_spec` in a worker thread (same arguments, result and errors)."""
    return await trio.to_thread.run_sync(
        lambda: build_spec(container_id, image_config, options, namespace=namespace, rootfs=rootfs))
