"""The container's root filesystem, set up by its init inside the new mount namespace.

In order (the OCI runtime spec's, and runc's): the propagation of ``/`` (``linux.rootfsPropagation``,
``rslave`` by default), the rootfs bind-mounted on itself, every entry of ``mounts`` in order with its
options, ``/dev`` (nodes, symlinks, ``/dev/ptmx``) unless ``/dev`` is bind-mounted from the host, then
``pivot_root`` (or ``MS_MOVE`` + ``chroot`` for ``noPivotRoot``). After the pivot: masked and read-only
paths and a read-only rootfs.

Mount destinations are resolved inside the rootfs by :func:`resolve_in_root`: a symlink is followed
relative to the rootfs (an absolute target starts at the rootfs), and a path or symlink that would climb
above the rootfs is refused with :class:`~berth.core.errdefs.InvalidArgument`.
"""

from __future__ import annotations

import errno
import os
import stat

from berth.core.errdefs import InvalidArgument
from berth.core.linux import (
    MNT_DETACH,
    MOUNT_FLAGS,
    MOUNT_PROPAGATION,
    MS_BIND,
    MS_MOVE,
    MS_NOATIME,
    MS_NODEV,
    MS_NODIRATIME,
    MS_NOEXEC,
    MS_NOSUID,
    MS_PRIVATE,
    MS_RDONLY,
    MS_REC,
    MS_RELATIME,
    MS_REMOUNT,
    MS_SLAVE,
)
from berth.runtimes.builtin import linux
from berth.runtimes.builtin.cgroups import Cgroups, hierarchies

TYPE_CHECKING = False  # not typing's: importing typing costs every runtime call ~5 ms
if TYPE_CHECKING:
    from typing import Any

__all__ = ["DEFAULT_DEVICES", "Mounter", "finalize_rootfs", "parse_options", "pivot", "resolve_in_root"]

#: path, type, major, minor: the nodes every container gets (with linux.devices on top).
DEFAULT_DEVICES = (("/dev/null", "c", 1, 3), ("/dev/zero", "c", 1, 5), ("/dev/full", "c", 1, 7),
                   ("/dev/random", "c", 1, 8), ("/dev/urandom", "c", 1, 9), ("/dev/tty", "c", 5, 0))
_DEV_SYMLINKS = (("/proc/self/fd", "/dev/fd"), ("/proc/self/fd/0", "/dev/stdin"), ("/proc/self/fd/1", "/dev/stdout"),
                 ("/proc/self/fd/2", "/dev/stderr"))

# Options that change how the runtime mounts, not the mount itself.
_EXTENSIONS = frozenset(("tmpcopyup",))
_UNSUPPORTED = frozenset(("idmap", "ridmap"))
# Flags a bind remount has to repeat when the kernel has locked them on the source.
_LOCKABLE = ((linux.ST_NOSUID, MS_NOSUID), (linux.ST_NODEV, MS_NODEV), (linux.ST_NOEXEC, MS_NOEXEC),
             (linux.ST_NOATIME, MS_NOATIME), (linux.ST_NODIRATIME, MS_NODIRATIME),
             (linux.ST_RELATIME, MS_RELATIME))


class MountOptions:
    """Options split the way mount(2) wants them."""

    __slots__ = ("data", "extensions", "flags", "propagation")

    def __init__(self, flags: int, propagation: list[int], data: str, extensions: set[str]) -> None:
        self.flags = flags
        self.propagation = propagation
        self.data = data
        self.extensions = extensions


def parse_options(options: list[str]) -> MountOptions:
    """mount(2) flags, propagation changes, the data string (every option mount(2) has no flag for) and
    the runtime's own extensions (``tmpcopyup``)."""
    flags, propagation, data, extensions = 0, [], [], set()
    for option in options:
        if option in MOUNT_FLAGS:
            clear, flag = MOUNT_FLAGS[option]
            flags = flags & ~flag if clear else flags | flag
        elif option in MOUNT_PROPAGATION:
            propagation.append(MOUNT_PROPAGATION[option])
        elif option in _EXTENSIONS:
            extensions.add(option)
        elif option in _UNSUPPORTED:
            raise InvalidArgument(f"mount option {option!r} is not supported by this runtime")
        else:
            data.append(option)
    return MountOptions(flags, propagation, ",".join(data), extensions)


def resolve_in_root(root: str, path: str) -> str:
    """The host path of the container path ``path`` under ``root``, symlinks followed inside ``root``.

    Components that do not exist yet are kept as written. Raises InvalidArgument when ``..`` or a symlink
    would lead above ``root``, naming the symlink.
    """
    pending = [part for part in path.split("/") if part not in ("", ".")]
    done: list[str] = []
    links = 0
    through = ""
    while pending:
        part = pending.pop(0)
        if part == "..":
            if not done:
                how = f" through the symlink {through}" if through else ""
                raise InvalidArgument(f"path {path} escapes the container's root filesystem{how}")
            done.pop()
            continue
        candidate = os.path.join(root, *done, part)
        try:
            info = os.lstat(candidate)
        except (FileNotFoundError, NotADirectoryError):
            done.append(part)
            continue
        if not stat.S_ISLNK(info.st_mode):
            done.append(part)
            continue
        links += 1
        if links > 40:
            raise InvalidArgument(f"path {path}: too many levels of symbolic links")
        target = os.readlink(candidate)
        through = f"/{'/'.join([*done, part])} -> {target}"
        if target.startswith("/"):
            done = []
        pending = [p for p in target.split("/") if p not in ("", ".")] + pending
    return os.path.join(root, *done)


def _locked_flags(path: str) -> int:
    flags = 0
    try:
        current = os.statvfs(path).f_flag
    except OSError:
        return 0
    for st_flag, ms_flag in _LOCKABLE:
        if current & st_flag:
            flags |= ms_flag
    return flags


def bind_remount(path: str, flags: int) -> None:
    """Change the flags of the bind mount at ``path``, keeping any the kernel has locked on it."""
    flags = (flags & ~MS_REC) | MS_BIND | MS_REMOUNT
    try:
        linux.mount(None, path, None, flags)
    except PermissionError:
        linux.mount(None, path, None, flags | _locked_flags(path))


def _make_target(path: str, directory: bool) -> None:
    if directory:
        os.makedirs(path, 0o755, exist_ok=True)
        return
    os.makedirs(os.path.dirname(path), 0o755, exist_ok=True)
    if not os.path.lexists(path):
        os.close(os.open(path, os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC, 0o644))


class Mounter:
    """Mounts a spec's filesystems under ``rootfs`` (host paths, before the pivot)."""

    def __init__(self, spec: dict[str, Any], rootfs: str, bundle: str, cgroups: Cgroups | None,
                 cgroup_ns: bool, user_ns: bool) -> None:
        self.spec = spec
        self.rootfs = rootfs
        self.bundle = bundle
        self.cgroups = cgroups
        self.cgroup_ns = cgroup_ns
        self.user_ns = user_ns

    def prepare(self) -> None:
        """Propagation, the rootfs bind, the spec's mounts, then /dev."""
        linux_spec = self.spec.get("linux") or {}
        propagation = linux_spec.get("rootfsPropagation") or "rslave"
        if propagation not in MOUNT_PROPAGATION:
            raise InvalidArgument(f"linux.rootfsPropagation {propagation!r} is not a propagation type")
        linux.mount(None, "/", None, MOUNT_PROPAGATION[propagation] | MS_REC)
        self._make_parent_private()
        linux.mount(self.rootfs, self.rootfs, None, MS_BIND | MS_REC)
        bind_dev = False
        for i, mount in enumerate(self.spec.get("mounts") or ()):
            options = parse_options(mount.get("options") or [])
            dest = resolve_in_root(self.rootfs, mount["destination"])
            if dest.rstrip("/") == self.rootfs.rstrip("/"):
                raise InvalidArgument(f"mounts[{i}]: cannot mount over the rootfs itself")
            if options.flags & MS_BIND and os.path.normpath(mount["destination"]) == "/dev":
                bind_dev = True
            self.mount(mount, options, dest)
        if not bind_dev:
            self._setup_dev(linux_spec.get("devices") or [])

    def _make_parent_private(self) -> None:
        """pivot_root refuses a new root whose parent mount is shared: make that mount private."""
        best, shared = "", False
        with open("/proc/self/mountinfo") as f:
            for line in f:
                fields = line.split(" - ")[0].split()
                mountpoint = fields[4].replace("\\040", " ")
                if (self.rootfs + "/").startswith(mountpoint.rstrip("/") + "/") and len(mountpoint) >= len(best):
                    best, shared = mountpoint, any(opt.startswith("shared:") for opt in fields[6:])
        if shared:
            linux.mount(None, best, None, MS_PRIVATE)

    def mount(self, mount: dict[str, Any], options: MountOptions, dest: str) -> None:
        """One ``mounts`` entry at host path ``dest``."""
        kind = mount.get("type") or ""
        source = mount.get("source") or ""
        flags = options.flags
        if flags & MS_BIND or kind == "bind":
            if not os.path.isabs(source):
                source = os.path.join(self.bundle, source)
            if not os.path.exists(source):
                raise InvalidArgument(f"bind mount source {source} does not exist")
            _make_target(dest, os.path.isdir(source))
            linux.mount(source, dest, None, MS_BIND | (flags & MS_REC))
            if flags & ~(MS_BIND | MS_REC):
                bind_remount(dest, flags)
        elif kind == "cgroup":
            self._mount_cgroup(dest, options)
        else:
            _make_target(dest, True)
            if "tmpcopyup" in options.extensions:
                self._tmpcopyup(source, kind, dest, options)
            else:
                self._mount_fs(source, dest, kind, options)
        for propagation in options.propagation:
            linux.mount(None, dest, None, propagation)

    def _mount_fs(self, source: str, dest: str, kind: str, options: MountOptions) -> None:
        try:
            linux.mount(source, dest, kind, options.flags, options.data)
        except PermissionError:
            # In a user namespace sysfs and mqueue need a network or ipc namespace of their own:
            # like runc, bind the host's instead.
            fallback = {"sysfs": "/sys", "mqueue": "/dev/mqueue"}.get(kind)
            if not self.user_ns or fallback is None:
                raise
            linux.mount(fallback, dest, None, MS_BIND | MS_REC)
            bind_remount(dest, options.flags)

    def _tmpcopyup(self, source: str, kind: str, dest: str, options: MountOptions) -> None:
        """Mount ``kind`` over ``dest`` with the directory's current content copied into it."""
        staging = os.path.join(os.path.dirname(dest), f".berth-tmpcopyup-{os.getpid()}")
        os.mkdir(staging, 0o700)
        try:
            linux.mount(source, staging, kind, options.flags, options.data)
            for name in os.listdir(dest):
                _copy_tree(os.path.join(dest, name), os.path.join(staging, name))
            linux.mount(staging, dest, None, MS_MOVE)
        finally:
            os.rmdir(staging)

    def _mount_cgroup(self, dest: str, options: MountOptions) -> None:
        """``/sys/fs/cgroup``: the container's own cgroups, as a cgroup namespace shows them or, without
        one, bind-mounted from the host (v1: a tmpfs holding one directory per hierarchy)."""
        version, found = hierarchies()
        flags = options.flags
        _make_target(dest, True)
        if version == 2:
            if self.cgroup_ns or self.cgroups is None:
                linux.mount("cgroup2", dest, "cgroup2", flags)
            else:
                linux.mount(self.cgroups.paths[""], dest, None, MS_BIND)
                bind_remount(dest, flags)
            return
        linux.mount("tmpfs", dest, "tmpfs", flags & ~MS_RDONLY, "mode=755")
        for hierarchy in found:
            if not hierarchy.key:
                continue  # the hybrid layout's cgroup2 holds no controllers: runc leaves it out too
            name = hierarchy.key.removeprefix("name=")
            target = os.path.join(dest, name)
            os.mkdir(target, 0o755)
            if self.cgroup_ns or self.cgroups is None:
                data = hierarchy.key if hierarchy.key.startswith("name=") else name
                linux.mount("cgroup", target, "cgroup", flags, data if "name=" not in data else "none," + data)
            else:
                linux.mount(self.cgroups.paths[hierarchy.key], target, None, MS_BIND)
                bind_remount(target, flags)
            if "," in name:
                for single in name.split(","):
                    os.symlink(name, os.path.join(dest, single))
        if flags & MS_RDONLY:
            linux.mount(None, dest, None, MS_REMOUNT | flags, "mode=755")

    def _setup_dev(self, devices: list[dict[str, Any]]) -> None:
        """The device nodes (``linux.devices`` and the defaults), /dev symlinks and /dev/ptmx."""
        nodes: dict[str, dict[str, Any]] = {}
        for path, kind, major, minor in DEFAULT_DEVICES:
            nodes[path] = {"path": path, "type": kind, "major": major, "minor": minor, "fileMode": 0o666}
        for device in devices:
            nodes[device["path"]] = device
        old_umask = os.umask(0)
        try:
            for device in nodes.values():
                self._make_device(device)
        finally:
            os.umask(old_umask)
        for source, link in _DEV_SYMLINKS:
            self._symlink(source, link)
        if os.path.exists("/proc/kcore"):
            self._symlink("/proc/kcore", "/dev/core")
        ptmx = resolve_in_root(self.rootfs, "/dev/ptmx")
        if os.path.lexists(ptmx):
            os.unlink(ptmx)
        os.symlink("pts/ptmx", ptmx)

    def _symlink(self, source: str, link: str) -> None:
        path = resolve_in_root(self.rootfs, link)
        try:
            os.symlink(source, path)
        except FileExistsError:
            if not os.path.islink(path) or os.readlink(path) != source:
                raise

    def _make_device(self, device: dict[str, Any]) -> None:
        path = resolve_in_root(self.rootfs, device["path"])
        if not path.startswith(resolve_in_root(self.rootfs, "/dev") + "/"):
            raise InvalidArgument(f"linux.devices: {device['path']} is not under /dev")
        os.makedirs(os.path.dirname(path), 0o755, exist_ok=True)
        kind = device.get("type", "c")
        if self.user_ns:
            # mknod is not allowed in a user namespace: bind the host's node instead.
            _make_target(path, False)
            linux.mount(device["path"], path, None, MS_BIND)
            return
        file_type = {"c": stat.S_IFCHR, "u": stat.S_IFCHR, "b": stat.S_IFBLK, "p": stat.S_IFIFO}.get(kind)
        if file_type is None:
            raise InvalidArgument(f"linux.devices: {device['path']} has unknown type {kind!r}")
        mode = int(device.get("fileMode", 0o666)) & 0o7777
        dev = os.makedev(int(device.get("major", 0)), int(device.get("minor", 0))) if kind != "p" else 0
        try:
            os.mknod(path, mode | file_type, dev)
        except FileExistsError:
            os.unlink(path)
            os.mknod(path, mode | file_type, dev)
        os.chown(path, int(device.get("uid", 0)), int(device.get("gid", 0)))


def _copy_tree(source: str, dest: str) -> None:
    info = os.lstat(source)
    if stat.S_ISLNK(info.st_mode):
        os.symlink(os.readlink(source), dest)
    elif stat.S_ISDIR(info.st_mode):
        os.mkdir(dest, stat.S_IMODE(info.st_mode))
        for name in os.listdir(source):
            _copy_tree(os.path.join(source, name), os.path.join(dest, name))
    elif stat.S_ISREG(info.st_mode):
        with open(source, "rb") as src, open(dest, "wb") as dst:
            dst.write(src.read())
        os.chmod(dest, stat.S_IMODE(info.st_mode))
    else:
        return
    os.lchown(dest, info.st_uid, info.st_gid)


def pivot(rootfs: str, no_pivot: bool) -> None:
    """Make ``rootfs`` the root: pivot_root and detach the old root, or move it over / and chroot."""
    if no_pivot:
        os.chdir(rootfs)
        linux.mount(rootfs, "/", None, MS_MOVE)
        os.chroot(".")
        os.chdir("/")
        return
    old_root = os.open("/", os.O_DIRECTORY | os.O_RDONLY | os.O_CLOEXEC)
    new_root = os.open(rootfs, os.O_DIRECTORY | os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fchdir(new_root)
        linux.pivot_root(".", ".")
        # The old root is now stacked on "/": keep its unmount from reaching the host, then drop it.
        os.fchdir(old_root)
        linux.mount(None, ".", None, MS_SLAVE | MS_REC)
        linux.umount2(".", MNT_DETACH)
        os.chdir("/")
    finally:
        os.close(old_root)
        os.close(new_root)


def finalize_rootfs(spec: dict[str, Any]) -> None:
    """After the pivot: read-only and masked paths, then a read-only root if ``root.readonly``."""
    linux_spec = spec.get("linux") or {}
    for path in linux_spec.get("readonlyPaths") or ():
        try:
            linux.mount(path, path, None, MS_BIND | MS_REC)
        except FileNotFoundError:
            continue
        bind_remount(path, MS_RDONLY | _locked_flags(path))
    for path in linux_spec.get("maskedPaths") or ():
        try:
            linux.mount("/dev/null", path, None, MS_BIND)
        except FileNotFoundError:
            continue
        except OSError as exc:
            if exc.errno != errno.ENOTDIR:
                raise
            linux.mount("tmpfs", path, "tmpfs", MS_RDONLY)
    if (spec.get("root") or {}).get("readonly"):
        bind_remount("/", MS_RDONLY | _locked_flags("/"))
