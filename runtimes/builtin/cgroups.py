"""A container's cgroups: cgroup v1 (one directory per mounted hierarchy) and cgroup v2 (one directory).

The layout is read from ``/proc/self/mountinfo``: a *pure v2* host has cgroup2 at ``/sys/fs/cgroup``; a
*v1* or *hybrid* host has one cgroup (v1) mount per hierarchy (``cpu``, ``memory``, ``name=systemd``,
...) and, when hybrid, a cgroup2 mount (``/sys/fs/cgroup/unified``) that the container joins as well.

``linux.cgroupsPath`` works as runc's cgroupfs driver: absolute paths start at each hierarchy's root,
relative ones (and the default, the container id) at the caller's own cgroup. :class:`Cgroups` creates
the directories, writes ``linux.resources`` in each version's files (v2 converts cpu shares and blkio
weights, and limits devices with an eBPF program), adds processes, freezes, reports statistics and
removes the directories again. It records itself as a plain mapping (:meth:`Cgroups.to_record`) in the
container's state.
"""

from __future__ import annotations

import errno
import os
import time

from berth.core.errdefs import FailedPrecondition, InvalidArgument

TYPE_CHECKING = False  # not typing's: importing typing costs every runtime call ~5 ms
if TYPE_CHECKING:
    from typing import Any

__all__ = ["DEFAULT_DEVICE_RULES", "Cgroups", "device_rules", "hierarchies", "own_procs_file"]

_ROOT = "/sys/fs/cgroup"
_UNIFIED = ""  # the key of the cgroup2 hierarchy, in both layouts

#: Devices every container may use whatever its rules say (as runc allows them): mknod of any device,
#: the standard nodes the runtime creates, the pty multiplexer and ptys, the console, and tun.
DEFAULT_DEVICE_RULES: tuple[dict[str, Any], ...] = (
    {"allow": True, "type": "c", "major": -1, "minor": -1, "access": "m"},
    {"allow": True, "type": "b", "major": -1, "minor": -1, "access": "m"},
    *({"allow": True, "type": "c", "major": 1, "minor": minor, "access": "rwm"} for minor in (3, 5, 7, 8, 9)),
    *({"allow": True, "type": "c", "major": 5, "minor": minor, "access": "rwm"} for minor in (0, 1, 2)),
    {"allow": True, "type": "c", "major": 136, "minor": -1, "access": "rwm"},
    {"allow": True, "type": "c", "major": 10, "minor": 200, "access": "rwm"},
)


class Hierarchy:
    """One mounted cgroup hierarchy: its key (``memory``, ``cpu,cpuacct``, ``name=systemd``, "" for v2)."""

    __slots__ = ("key", "mount_root", "mountpoint")

    def __init__(self, key: str, mountpoint: str, mount_root: str) -> None:
        self.key = key
        self.mountpoint = mountpoint
        self.mount_root = mount_root


def _unescape(field: str) -> str:
    return field.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\")


def hierarchies() -> tuple[int, list[Hierarchy]]:
    """The cgroup version (1 for v1 and hybrid, 2 for pure v2) and the mounted hierarchies."""
    v1: list[Hierarchy] = []
    unified: Hierarchy | None = None
    seen: set[str] = set()
    with open("/proc/self/mountinfo") as f:
        for line in f:
            head, _, tail = line.partition(" - ")
            fields, extra = head.split(), tail.split()
            if len(extra) < 3 or extra[0] not in ("cgroup", "cgroup2"):
                continue
            root, mountpoint = _unescape(fields[3]), _unescape(fields[4])
            if extra[0] == "cgroup2":
                if unified is None and mountpoint.startswith(_ROOT):
                    unified = Hierarchy(_UNIFIED, mountpoint, root)
                continue
            options = extra[2].split(",")
            names = [opt for opt in options if opt.startswith("name=")]
            key = names[0] if names else ",".join(opt for opt in options if opt in _V1_CONTROLLERS)
            if key and key not in seen:
                seen.add(key)
                v1.append(Hierarchy(key, mountpoint, root))
    if not v1:
        if unified is None:
            raise FailedPrecondition("no cgroup filesystem is mounted")
        return 2, [unified]
    return 1, [*v1, *([unified] if unified else [])]


_V1_CONTROLLERS = frozenset(("cpu", "cpuacct", "cpuset", "memory", "devices", "freezer", "blkio", "pids", "net_cls",
                             "net_prio", "perf_event", "hugetlb", "rdma", "misc"))


def _own_cgroups() -> dict[str, str]:
    """This process's cgroup per hierarchy key, from /proc/self/cgroup."""
    own: dict[str, str] = {}
    with open("/proc/self/cgroup") as f:
        for line in f:
            _, controllers, path = line.rstrip("\n").split(":", 2)
            own[controllers] = path
    return own


def own_procs_file() -> str | None:
    """The ``cgroup.procs`` file of the cgroup this process is in (in the first hierarchy mounted), or
    ``None`` without a cgroup filesystem. Reads ``/proc``: blocking."""
    try:
        paths = Cgroups.plan(".", "").paths  # "." is where this process is
    except (FailedPrecondition, InvalidArgument, OSError):
        return None
    return next((os.path.join(path, "cgroup.procs") for path in paths.values()), None)


def _write(path: str, value: str) -> None:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise FailedPrecondition(f"cgroup: cannot open {path}: {exc.strerror}") from None
    try:
        os.write(fd, value.encode())
    except OSError as exc:
        raise FailedPrecondition(f"cgroup: cannot write {value!r} to {path}: {exc.strerror}") from None
    finally:
        os.close(fd)


def _read(path: str) -> str:
    with open(path) as f:
        return f.read().strip()


def _read_int(path: str) -> int:
    try:
        value = _read(path)
    except OSError:
        return 0
    return 0 if value == "max" else int(value)


def device_rules(spec: dict[str, Any]) -> list[dict[str, Any]]:
    """The device cgroup rules of a spec, in order: ``linux.resources.devices``, an allow rule for each
    ``linux.devices`` node, then :data:`DEFAULT_DEVICE_RULES`. Later rules win over earlier ones."""
    linux = spec.get("linux") or {}
    rules = [dict(rule) for rule in (linux.get("resources") or {}).get("devices") or ()]
    for device in linux.get("devices") or ():
        rules.append({"allow": True, "type": device.get("type", "c"), "major": device.get("major", -1),
                      "minor": device.get("minor", -1), "access": "rwm"})
    rules.extend(DEFAULT_DEVICE_RULES)
    for rule in rules:
        kind = rule.get("type") or "a"
        if kind not in ("a", "b", "c", "u", "p"):
            raise InvalidArgument(f"device rule {rule}: type must be a, b or c")
        access = rule.get("access") or "rwm"
        if not set(access) <= set("rwm"):
            raise InvalidArgument(f"device rule {rule}: access must be made of r, w and m")
        rule["type"], rule["access"] = "c" if kind in ("u", "p") else kind, access
        rule["major"] = -1 if rule.get("major") is None else rule["major"]
        rule["minor"] = -1 if rule.get("minor") is None else rule["minor"]
    return rules


class Cgroups:
    """The cgroup directories of one container, by hierarchy key (v2: the single key "")."""

    def __init__(self, version: int, paths: dict[str, str], created: list[str] | None = None) -> None:
        self.version = version
        self.paths = paths
        self.created = created or []
        self._warm_up: Any = None  # the lock the thread of start_warm_up releases when it is done

    @classmethod
    def plan(cls, cgroups_path: str, container_id: str) -> Cgroups:
        """Where the container's cgroups go (nothing is created yet)."""
        if ":" in cgroups_path:
            raise InvalidArgument(f"linux.cgroupsPath {cgroups_path!r} is a systemd slice: only the cgroupfs "
                                  "driver is supported")
        path = os.path.normpath(cgroups_path or container_id)
        if path.startswith("..") or "/../" in path:
            raise InvalidArgument(f"linux.cgroupsPath {cgroups_path!r} leaves the cgroup tree")
        version, found = hierarchies()
        own = _own_cgroups() if not path.startswith("/") else {}
        paths: dict[str, str] = {}
        for hierarchy in found:
            group = path if path.startswith("/") else os.path.join(own.get(hierarchy.key, "/"), path)
            if hierarchy.mount_root != "/" and (group + "/").startswith(hierarchy.mount_root + "/"):
                group = group[len(hierarchy.mount_root):] or "/"
            paths[hierarchy.key] = os.path.normpath(hierarchy.mountpoint + "/" + group.lstrip("/"))
        return cls(version, paths)

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> Cgroups:
        return cls(record["version"], dict(record["paths"]), list(record.get("created") or ()))

    def to_record(self) -> dict[str, Any]:
        return {"version": self.version, "paths": self.paths, "created": self.created}

    def _path(self, key: str) -> str | None:
        """The directory of the hierarchy that holds controller ``key`` (v2: the one directory)."""
        if self.version == 2:
            return self.paths[_UNIFIED]
        for hierarchy, path in self.paths.items():
            if key in hierarchy.split(","):
                return path
        return None

    def create(self) -> None:
        """Create the directories (parents too, recording each one made) and prepare them: cpusets
        copied from the parent in v1, the parents' controllers enabled in v2."""
        for path in self.paths.values():
            missing: list[str] = []
            walk = path
            while not os.path.isdir(walk):
                missing.append(walk)
                walk = os.path.dirname(walk)
            for directory in reversed(missing):
                if self.version == 2:
                    self._enable_controllers(os.path.dirname(directory))
                try:
                    os.mkdir(directory, 0o755)
                except FileExistsError:
                    continue
                except OSError as exc:
                    raise FailedPrecondition(f"cgroup: cannot create {directory}: {exc.strerror}") from None
                self.created.append(directory)
        cpuset = self._path("cpuset") if self.version == 1 else None
        if cpuset:
            self._init_cpuset(cpuset)

    def _init_cpuset(self, path: str) -> None:
        """A new v1 cpuset is empty: give it its parent's cpus and mems, from the top down."""
        for name in ("cpuset.cpus", "cpuset.mems"):
            chain = []
            walk = path
            while os.path.exists(os.path.join(walk, name)) and not _read(os.path.join(walk, name)):
                chain.append(walk)
                walk = os.path.dirname(walk)
            value = _read(os.path.join(walk, name)) if chain else ""
            for directory in reversed(chain):
                _write(os.path.join(directory, name), value)

    @staticmethod
    def _enable_controllers(parent: str) -> None:
        try:
            available = _read(os.path.join(parent, "cgroup.controllers")).split()
            enabled = _read(os.path.join(parent, "cgroup.subtree_control")).split()
        except OSError:
            return
        wanted = [c for c in available if c not in enabled]
        if wanted:
            _write(os.path.join(parent, "cgroup.subtree_control"), " ".join("+" + c for c in wanted))

    def start_warm_up(self) -> None:
        """Start a thread that moves this process into the cgroup it is already in (errors ignored), so
        that a migration into these cgroups soon after costs no grace period; :meth:`finish_warm_up`
        waits for it, and must be called before this process forks a child that will call :meth:`add`.

        The kernel makes the first cgroup migration after a quiet spell wait for an RCU grace period (the
        writer side of ``cgroup_threadgroup_rwsem``: 5-20 ms on this machine), and one soon after another
        does not. Meanwhile the runtime imports, forks and mounts, none of which waits on that lock;
        cgroup file writes do wait (on ``cgroup_mutex``), so this starts once the directories are made.
        """
        import _thread

        procs = own_procs_file()
        if procs is None:
            return
        done = _thread.allocate_lock()
        done.acquire()

        def migrate() -> None:
            try:
                _write(procs, str(os.getpid()))
            except FailedPrecondition:
                pass
            finally:
                done.release()

        _thread.start_new_thread(migrate, ())
        self._warm_up = done

    def finish_warm_up(self) -> None:
        """Wait for the thread of :meth:`start_warm_up`, if one runs."""
        done, self._warm_up = self._warm_up, None
        if done is not None:
            done.acquire()

    def add(self, pid: int) -> None:
        """Move process ``pid`` (0: the caller) into every directory."""
        for path in self.paths.values():
            _write(os.path.join(path, "cgroup.procs"), str(pid))

    def pids(self) -> list[int]:
        """The processes in the container's cgroup (empty once it is gone)."""
        path = self._path("pids") or self._path("freezer") or next(iter(self.paths.values()))
        try:
            with open(os.path.join(path, "cgroup.procs")) as f:
                return [int(line) for line in f if line.strip()]
        except FileNotFoundError:
            return []

    # ---- resources ----------------------------------------------------------------------------------

    def apply(self, resources: dict[str, Any], spec_for_devices: dict[str, Any] | None = None) -> None:
        """Write ``linux.resources`` into the cgroup files; ``spec_for_devices`` (the whole spec) also
        sets the device rules (see :func:`device_rules`)."""
        if self.version == 1:
            self._apply_v1(resources)
        else:
            self._apply_v2(resources)
        if spec_for_devices is not None:
            rules = device_rules(spec_for_devices)
            if self.version == 1:
                self._devices_v1(rules)
            else:
                from berth.runtimes.builtin import devicefilter

                devicefilter.attach(self.paths[_UNIFIED], rules)

    def _set(self, controller: str, name: str, value: object) -> None:
        path = self._path(controller)
        if path is None:
            raise FailedPrecondition(f"cgroup: the {controller} controller is not mounted, cannot set {name}")
        _write(os.path.join(path, name), str(value))

    def _apply_v1(self, res: dict[str, Any]) -> None:
        memory = res.get("memory") or {}
        limit, swap = memory.get("limit"), memory.get("swap")
        if limit is not None or swap is not None:
            self._memory_v1(limit, swap)
        for key, name in (("reservation", "memory.soft_limit_in_bytes"), ("kernel", "memory.kmem.limit_in_bytes"),
                          ("kernelTCP", "memory.kmem.tcp.limit_in_bytes"), ("swappiness", "memory.swappiness")):
            if memory.get(key) is not None:
                self._set("memory", name, memory[key])
        if memory.get("disableOOMKiller"):
            self._set("memory", "memory.oom_control", 1)
        cpu = res.get("cpu") or {}
        for key, controller, name in (("shares", "cpu", "cpu.shares"), ("period", "cpu", "cpu.cfs_period_us"),
                                      ("quota", "cpu", "cpu.cfs_quota_us"),
                                      ("realtimePeriod", "cpu", "cpu.rt_period_us"),
                                      ("realtimeRuntime", "cpu", "cpu.rt_runtime_us"), ("idle", "cpu", "cpu.idle"),
                                      ("cpus", "cpuset", "cpuset.cpus"), ("mems", "cpuset", "cpuset.mems")):
            value = cpu.get(key)
            if value is not None and value != "" and not (key in ("shares", "period") and value == 0):
                self._set(controller, name, value)
        pids = (res.get("pids") or {}).get("limit")
        if pids is not None:
            self._set("pids", "pids.max", pids if pids > 0 else "max")
        blkio = res.get("blockIO") or {}
        if blkio.get("weight"):
            self._set("blkio", "blkio.weight", blkio["weight"])
        if blkio.get("leafWeight"):
            self._set("blkio", "blkio.leaf_weight", blkio["leafWeight"])
        for device in blkio.get("weightDevice") or ():
            if device.get("weight"):
                self._set("blkio", "blkio.weight_device", f"{device['major']}:{device['minor']} {device['weight']}")
            if device.get("leafWeight"):
                self._set("blkio", "blkio.leaf_weight_device",
                          f"{device['major']}:{device['minor']} {device['leafWeight']}")
        for key, name in _THROTTLE_V1.items():
            for device in blkio.get(key) or ():
                self._set("blkio", name, f"{device['major']}:{device['minor']} {device['rate']}")
        for page in res.get("hugepageLimits") or ():
            self._set("hugetlb", f"hugetlb.{page['pageSize']}.limit_in_bytes", page["limit"])
        network = res.get("network") or {}
        if network.get("classID") is not None:
            self._set("net_cls", "net_cls.classid", network["classID"])
        for prio in network.get("priorities") or ():
            self._set("net_prio", "net_prio.ifpriomap", f"{prio['name']} {prio['priority']}")

    def _memory_v1(self, limit: int | None, swap: int | None) -> None:
        path = self._path("memory")
        if path is None:
            raise FailedPrecondition("cgroup: the memory controller is not mounted")
        memsw = os.path.join(path, "memory.memsw.limit_in_bytes")
        if swap is not None and not os.path.exists(memsw):
            raise FailedPrecondition("cgroup: memory.swap is set but this kernel has no swap accounting")
        # memsw must stay >= limit at every step: raise it first when growing, last when shrinking.
        current = _read_int(memsw) if swap is not None else 0
        if swap is not None and (swap == -1 or (limit is not None and limit != -1 and current < limit)):
            _write(memsw, str(swap))
            swap = None
        if limit is not None:
            _write(os.path.join(path, "memory.limit_in_bytes"), str(limit))
        if swap is not None:
            _write(memsw, str(swap))

    def _devices_v1(self, rules: list[dict[str, Any]]) -> None:
        path = self._path("devices")
        if path is None:
            return
        for rule in rules:
            if rule["type"] == "a" and rule["major"] == -1 and rule["minor"] == -1 and rule["access"] == "rwm":
                _write(os.path.join(path, "devices.allow" if rule["allow"] else "devices.deny"), "a")
                continue
            major = "*" if rule["major"] == -1 else rule["major"]
            minor = "*" if rule["minor"] == -1 else rule["minor"]
            _write(os.path.join(path, "devices.allow" if rule["allow"] else "devices.deny"),
                   f"{rule['type']} {major}:{minor} {rule['access']}")

    def _apply_v2(self, res: dict[str, Any]) -> None:
        path = self.paths[_UNIFIED]
        for name, value in _v2_values(res):
            _write(os.path.join(path, name), value)

    # ---- freezer ------------------------------------------------------------------------------------

    def freeze(self, frozen: bool) -> None:
        """Freeze (``pause``) or thaw (``resume``) every process, waiting until the kernel says it is done."""
        if self.version == 2:
            path = self.paths[_UNIFIED]
            _write(os.path.join(path, "cgroup.freeze"), "1" if frozen else "0")
            want = "frozen 1" if frozen else "frozen 0"
            self._wait(lambda: want in _read(os.path.join(path, "cgroup.events")).splitlines())
            return
        freezer = self._path("freezer")
        if freezer is None:
            raise FailedPrecondition("cgroup: the freezer controller is not mounted")
        state = os.path.join(freezer, "freezer.state")
        want = "FROZEN" if frozen else "THAWED"
        for _ in range(1000):
            _write(state, want)
            if self._wait(lambda: _read(state) != "FREEZING", raise_on_timeout=False) and _read(state) == want:
                return
        raise FailedPrecondition(f"cgroup: {freezer} did not become {want}")

    def is_frozen(self) -> bool:
        try:
            if self.version == 2:
                return "frozen 1" in _read(os.path.join(self.paths[_UNIFIED], "cgroup.events")).splitlines()
            path = self._path("freezer")
            return path is not None and _read(os.path.join(path, "freezer.state")) == "FROZEN"
        except OSError:
            return False

    @staticmethod
    def _wait(done: Any, raise_on_timeout: bool = True) -> bool:
        delay = 0.0005
        for _ in range(200):
            if done():
                return True
            time.sleep(delay)
            delay = min(delay * 2, 0.01)
        if raise_on_timeout:
            raise FailedPrecondition("cgroup: timed out waiting for the freezer")
        return False

    # ---- removal ------------------------------------------------------------------------------------

    def destroy(self) -> None:
        """Remove the container's directories and the parents it created; missing ones are fine.
        Raises FailedPrecondition if a directory still has processes after a few seconds."""
        leaves = set(self.paths.values())
        for path in sorted(leaves, key=len, reverse=True):
            for attempt in range(300):
                try:
                    os.rmdir(path)
                    break
                except FileNotFoundError:
                    break
                except OSError as exc:
                    if exc.errno != errno.EBUSY or attempt == 299:
                        raise FailedPrecondition(f"cgroup: cannot remove {path}: {exc.strerror}") from None
                    time.sleep(0.01)
        for directory in sorted(set(self.created) - leaves, key=len, reverse=True):
            try:
                os.rmdir(directory)
            except OSError:  # a sibling container still uses this parent
                continue

    # ---- statistics ---------------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """Usage figures as ``runc events --stats`` reports them (cpu, memory, pids)."""
        return self._stats_v1() if self.version == 1 else self._stats_v2()

    def _stats_v1(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        cpuacct = self._path("cpuacct")
        if cpuacct:
            percpu = _read(os.path.join(cpuacct, "cpuacct.usage_percpu")).split()
            ticks = _keyed(os.path.join(cpuacct, "cpuacct.stat"))
            hz = os.sysconf("SC_CLK_TCK")
            out["cpu"] = {"usage": {"total": _read_int(os.path.join(cpuacct, "cpuacct.usage")),
                                    "percpu": [int(v) for v in percpu],
                                    "kernel": ticks.get("system", 0) * 1_000_000_000 // hz,
                                    "user": ticks.get("user", 0) * 1_000_000_000 // hz}}
        cpu = self._path("cpu")
        if cpu:
            stat = _keyed(os.path.join(cpu, "cpu.stat"))
            out.setdefault("cpu", {})["throttling"] = {"periods": stat.get("nr_periods", 0),
                                                       "throttledPeriods": stat.get("nr_throttled", 0),
                                                       "throttledTime": stat.get("throttled_time", 0)}
        memory = self._path("memory")
        if memory:
            def entry(prefix: str) -> dict[str, int]:
                return {"limit": _read_int(os.path.join(memory, f"{prefix}.limit_in_bytes")),
                        "usage": _read_int(os.path.join(memory, f"{prefix}.usage_in_bytes")),
                        "max": _read_int(os.path.join(memory, f"{prefix}.max_usage_in_bytes")),
                        "failcnt": _read_int(os.path.join(memory, f"{prefix}.failcnt"))}
            raw = _keyed(os.path.join(memory, "memory.stat"))
            out["memory"] = {"usage": entry("memory"), "swap": entry("memory.memsw"), "kernel": entry("memory.kmem"),
                             "cache": raw.get("cache", 0), "raw": raw}
        pids = self._path("pids")
        if pids:
            out["pids"] = {"current": _read_int(os.path.join(pids, "pids.current")),
                           "limit": _read_int(os.path.join(pids, "pids.max"))}
        return out

    def _stats_v2(self) -> dict[str, Any]:
        path = self.paths[_UNIFIED]
        out: dict[str, Any] = {}
        cpu = _keyed(os.path.join(path, "cpu.stat"))
        out["cpu"] = {"usage": {"total": cpu.get("usage_usec", 0) * 1000,
                                "kernel": cpu.get("system_usec", 0) * 1000, "user": cpu.get("user_usec", 0) * 1000},
                      "throttling": {"periods": cpu.get("nr_periods", 0),
                                     "throttledPeriods": cpu.get("nr_throttled", 0),
                                     "throttledTime": cpu.get("throttled_usec", 0) * 1000}}
        if os.path.exists(os.path.join(path, "memory.current")):
            raw = _keyed(os.path.join(path, "memory.stat"))
            out["memory"] = {"usage": {"usage": _read_int(os.path.join(path, "memory.current")),
                                       "limit": _read_int(os.path.join(path, "memory.max")),
                                       "max": _read_int(os.path.join(path, "memory.peak"))},
                             "cache": raw.get("file", 0), "raw": raw}
        if os.path.exists(os.path.join(path, "pids.current")):
            out["pids"] = {"current": _read_int(os.path.join(path, "pids.current")),
                           "limit": _read_int(os.path.join(path, "pids.max"))}
        return out


_THROTTLE_V1 = {"throttleReadBpsDevice": "blkio.throttle.read_bps_device",
                "throttleWriteBpsDevice": "blkio.throttle.write_bps_device",
                "throttleReadIOPSDevice": "blkio.throttle.read_iops_device",
                "throttleWriteIOPSDevice": "blkio.throttle.write_iops_device"}
_THROTTLE_V2 = {"throttleReadBpsDevice": "rbps", "throttleWriteBpsDevice": "wbps",
                "throttleReadIOPSDevice": "riops", "throttleWriteIOPSDevice": "wiops"}


def _keyed(path: str) -> dict[str, int]:
    """A flat-keyed cgroup file (``name value`` lines) as a mapping."""
    out: dict[str, int] = {}
    try:
        with open(path) as f:
            for line in f:
                key, _, value = line.partition(" ")
                if value.strip().lstrip("-").isdigit():
                    out[key] = int(value)
    except OSError:
        pass
    return out


def _v2_values(res: dict[str, Any]) -> list[tuple[str, str]]:
    """The cgroup v2 (file, value) writes for ``linux.resources``, in order (a file may come back: io.max
    takes one device per write)."""
    out: dict[str, str] = {}
    memory = res.get("memory") or {}
    limit, swap = memory.get("limit"), memory.get("swap")
    if memory.get("reservation") is not None:
        out["memory.low"] = str(memory["reservation"])
    if limit is not None:
        out["memory.max"] = "max" if limit == -1 else str(limit)
    if swap is not None:
        # The spec's swap is memory+swap, v2's swap.max is swap alone.
        if swap == -1:
            out["memory.swap.max"] = "max"
        elif limit is None or limit == -1:
            raise InvalidArgument("memory.swap needs memory.limit on cgroup v2")
        elif swap < limit:
            raise InvalidArgument(f"memory.swap ({swap}) must be at least memory.limit ({limit})")
        else:
            out["memory.swap.max"] = str(swap - limit)
    if memory.get("disableOOMKiller"):
        raise InvalidArgument("memory.disableOOMKiller is not available on cgroup v2")
    cpu = res.get("cpu") or {}
    if cpu.get("shares"):
        out["cpu.weight"] = str(1 + ((int(cpu["shares"]) - 2) * 9999) // 262142)
    if cpu.get("quota") is not None or cpu.get("period"):
        quota = cpu.get("quota")
        out["cpu.max"] = f"{'max' if quota is None or quota <= 0 else quota} {cpu.get('period') or 100000}"
    if cpu.get("idle") is not None:
        out["cpu.idle"] = str(cpu["idle"])
    if cpu.get("cpus"):
        out["cpuset.cpus"] = cpu["cpus"]
    if cpu.get("mems"):
        out["cpuset.mems"] = cpu["mems"]
    pids = (res.get("pids") or {}).get("limit")
    if pids is not None:
        out["pids.max"] = str(pids) if pids > 0 else "max"
    blkio = res.get("blockIO") or {}
    if blkio.get("weight"):
        out["io.weight"] = f"default {1 + (int(blkio['weight']) - 10) * 9999 // 990}"
    for page in res.get("hugepageLimits") or ():
        out[f"hugetlb.{page['pageSize']}.max"] = str(page["limit"])
    for key, value in (res.get("unified") or {}).items():
        if "/" in key or key.startswith("."):
            raise InvalidArgument(f"linux.resources.unified: {key!r} is not a cgroup file name")
        out[key] = str(value)
    writes = list(out.items())
    for device in blkio.get("weightDevice") or ():
        if device.get("weight"):
            weight = 1 + (int(device["weight"]) - 10) * 9999 // 990
            writes.append(("io.weight", f"{device['major']}:{device['minor']} {weight}"))
    limits: dict[str, list[str]] = {}
    for key, name in _THROTTLE_V2.items():
        for device in blkio.get(key) or ():
            limits.setdefault(f"{device['major']}:{device['minor']}", []).append(f"{name}={device['rate']}")
    writes.extend(("io.max", f"{device} {' '.join(parts)}") for device, parts in limits.items())
    return writes
