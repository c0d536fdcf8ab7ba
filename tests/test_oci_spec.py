"""OCI runtime spec generation: containerd's defaults, every option, user resolution through the image's
/etc/passwd and /etc/group (a hostile rootfs reads nothing of the host), the default seccomp profile
checked against libseccomp, plugins' spec adjustments, and real containers run with runc from the
generated specs (busybox rootfs)."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyseccomp
import pytest

from berth.core.errdefs import Internal, InvalidArgument, NotFound
from berth.core.metadata.containers import Container, Runtime
from berth.core.plugin import hookimpl, load_plugins
from berth.runtimes.oci import (
    DEFAULT_CAPABILITIES,
    DEFAULT_PATH,
    SpecOptions,
    apply_spec_adjustments,
    build_spec,
    default_seccomp_profile,
    generate_spec,
    parse_mount,
    read_user_files,
    resolve_user,
)
from berth.runtimes.oci.user import read_in_root

BUSYBOX = Path("/bin/busybox")
RUNC = Path("/usr/sbin/runc")
APPLETS = ("sh", "id", "env", "pwd", "touch", "mount", "echo", "cat", "seq", "sleep", "hostname")
IMAGE = {"architecture": "amd64", "os": "linux",
         "config": {"Entrypoint": ["/bin/sh", "-c"], "Cmd": ["echo hi"], "Env": ["FOO=bar", "PATH=/bin"],
                    "WorkingDir": "/work", "User": "", "Labels": {"org.example": "x"}, "StopSignal": "SIGQUIT"}}


def make_rootfs(root: Path) -> Path:
    """A busybox root filesystem with users ``app`` (1000) and ``svc`` (1001, no passwd group) and
    groups ``app`` (1000) and ``extra`` (2000, members app and root)."""
    (root / "bin").mkdir(parents=True)
    shutil.copy2(BUSYBOX, root / "bin" / "busybox")
    for applet in APPLETS:
        (root / "bin" / applet).symlink_to("busybox")
    for name in ("etc", "work", "proc", "sys", "dev", "tmp", "mnt"):
        (root / name).mkdir()
    (root / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n# a comment\n"
                                         "app:x:1000:1000::/home/app:/bin/sh\nsvc:x:1001:3000::/:/bin/sh\n"
                                         "broken-line\n")
    (root / "etc" / "group").write_text("root:x:0:\napp:x:1000:\nextra:x:2000:app,root\nother:x:2001:svc\n")
    return root


# ------------------------------------------------------------------------------------------ defaults


def test_defaults_are_containerds(tmp_path: Path) -> None:
    spec = build_spec("c1", IMAGE, namespace="ns1", rootfs=make_rootfs(tmp_path / "rootfs"))
    assert spec["ociVersion"] == "1.0.2-dev"
    process = spec["process"]
    assert process["args"] == ["/bin/sh", "-c", "echo hi"]
    assert process["env"] == ["FOO=bar", "PATH=/bin"]
    assert process["cwd"] == "/work"
    assert process["user"] == {"uid": 0, "gid": 0, "additionalGids": [0, 2000]}
    assert process["noNewPrivileges"] is True
    assert process["terminal"] is False
    assert process["rlimits"] == [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}]
    caps = process["capabilities"]
    assert len(DEFAULT_CAPABILITIES) == 14
    assert caps["bounding"] == caps["effective"] == caps["permitted"] == list(DEFAULT_CAPABILITIES)
    assert "CAP_SYS_ADMIN" not in caps["bounding"]
    assert spec["root"] == {"path": "rootfs", "readonly": False}
    assert spec["hostname"] == "c1"
    mounts = {m["destination"]: m for m in spec["mounts"]}
    assert list(mounts) == ["/proc", "/dev", "/dev/pts", "/dev/shm", "/dev/mqueue", "/sys", "/sys/fs/cgroup"]
    assert mounts["/dev/pts"]["options"] == ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]
    assert "size=65536k" in mounts["/dev/shm"]["options"]
    assert "ro" in mounts["/sys"]["options"]
    assert mounts["/sys/fs/cgroup"]["type"] == "cgroup"
    assert "ro" in mounts["/sys/fs/cgroup"]["options"]
    linux = spec["linux"]
    assert [n["type"] for n in linux["namespaces"]] == ["pid", "ipc", "uts", "mount", "network"]
    assert linux["cgroupsPath"] == "/berth/ns1/c1"
    assert "/proc/kcore" in linux["maskedPaths"]
    assert "/proc/sysrq-trigger" in linux["readonlyPaths"]
    assert {d["path"] for d in linux["devices"]} == {"/dev/null", "/dev/zero", "/dev/full", "/dev/random",
                                                     "/dev/urandom", "/dev/tty"}
    rules = linux["resources"]["devices"]
    assert rules[0] == {"allow": False, "access": "rwm"}
    assert {"allow": True, "type": "c", "major": 136, "access": "rwm"} in rules
    assert "seccomp" not in linux
    assert spec["annotations"] == {"org.example": "x", "org.opencontainers.image.stopSignal": "SIGQUIT"}
    json.dumps(spec)


def test_an_image_without_env_gets_the_default_path_and_without_command_is_refused() -> None:
    spec = build_spec("c", {"config": {"Cmd": ["/bin/true"]}})
    assert spec["process"]["env"] == ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]
    assert spec["process"]["cwd"] == "/"
    with pytest.raises(InvalidArgument, match="no command"):
        build_spec("c", {"config": {}})
    with pytest.raises(InvalidArgument, match="container id"):
        build_spec("bad/id", IMAGE)


# ------------------------------------------------------------------------------------------- options


def test_every_option(tmp_path: Path) -> None:
    rootfs = make_rootfs(tmp_path / "rootfs")
    options = SpecOptions(
        args=["echo", "bye"], env=["FOO=baz", "NEW=1", "PATH"], cwd="/tmp", user="app",
        mounts=[parse_mount("type=bind,src=/srv,dst=/data,options=rbind:ro"),
                {"destination": "/dev/shm", "type": "tmpfs", "source": "shm", "options": ["size=1m"]}],
        read_only=True, memory_limit=64 << 20, cpus=1.5, pids_limit=20, cap_add=["sys_admin", "CAP_NET_ADMIN"],
        cap_drop=["CAP_NET_RAW"], seccomp=True, labels={"l": "1", "org.example": "label"},
        annotations={"org.example": "annotation"}, hostname="box", tty=True,
        namespace_paths={"network": "/var/run/netns/x"}, etc_dir=tmp_path / "etc", hosts=[("10.0.0.2", "box", "b")],
        dns=["10.0.0.1"], rootfs_path="/abs/rootfs")
    spec = build_spec("c2", IMAGE, options, rootfs=rootfs)
    process = spec["process"]
    assert process["args"] == ["/bin/sh", "-c", "echo", "bye"]  # the entrypoint stays in front
    # PATH unset by the options, so the default comes back; TERM for the TTY.
    assert process["env"] == [DEFAULT_PATH, "FOO=baz", "NEW=1", "TERM=xterm"]
    assert process["cwd"] == "/tmp"
    assert process["terminal"] is True
    assert process["user"] == {"uid": 1000, "gid": 1000, "additionalGids": [1000, 2000]}
    caps = process["capabilities"]["bounding"]
    assert "CAP_SYS_ADMIN" in caps
    assert "CAP_NET_ADMIN" in caps
    assert "CAP_NET_RAW" not in caps
    assert spec["root"] == {"path": "/abs/rootfs", "readonly": True}
    assert spec["hostname"] == "box"
    resources = spec["linux"]["resources"]
    assert resources["memory"] == {"limit": 64 << 20}
    assert resources["cpu"] == {"quota": 150000, "period": 100000}
    assert resources["pids"] == {"limit": 20}
    assert {"type": "network", "path": "/var/run/netns/x"} in spec["linux"]["namespaces"]
    mounts = {m["destination"]: m for m in spec["mounts"]}
    assert mounts["/data"] == {"destination": "/data", "type": "bind", "source": "/srv", "options": ["rbind", "ro"]}
    assert mounts["/dev/shm"]["options"] == ["size=1m"]  # replaced the default
    assert [m["destination"] for m in spec["mounts"]].count("/dev/shm") == 1
    for name in ("hostname", "hosts", "resolv.conf"):
        assert mounts[f"/etc/{name}"]["source"] == str(tmp_path / "etc" / name)
        assert "ro" in mounts[f"/etc/{name}"]["options"]
    assert (tmp_path / "etc" / "hostname").read_text() == "box\n"
    assert "10.0.0.2\tbox b" in (tmp_path / "etc" / "hosts").read_text()
    assert (tmp_path / "etc" / "resolv.conf").read_text() == "nameserver 10.0.0.1\n"
    seccomp = spec["linux"]["seccomp"]
    # CAP_SYS_ADMIN was added: the profile opens mount and unrestricted clone.
    assert any("mount" in rule["names"] for rule in seccomp["syscalls"])
    assert spec["annotations"]["org.example"] == "annotation"
    assert spec["annotations"]["l"] == "1"


def test_privileged_and_cgroup_options(tmp_path: Path) -> None:
    spec = build_spec("c3", IMAGE, SpecOptions(privileged=True, seccomp=True, systemd_cgroup=True), namespace="k8s")
    caps = spec["process"]["capabilities"]["bounding"]
    assert "CAP_SYS_ADMIN" in caps
    assert len(caps) > 30
    assert spec["linux"]["maskedPaths"] == []
    assert spec["linux"]["readonlyPaths"] == []
    assert spec["linux"]["resources"]["devices"] == [{"allow": True, "access": "rwm"}]
    assert any(d["path"] == "/dev/null" for d in spec["linux"]["devices"])
    assert not any(d["path"].startswith("/dev/pts/") for d in spec["linux"]["devices"])
    assert "seccomp" not in spec["linux"]
    assert all("ro" not in m["options"] for m in spec["mounts"] if m["type"] in ("sysfs", "cgroup"))
    assert spec["linux"]["cgroupsPath"] == "system.slice:berth-k8s:c3"
    assert build_spec("c3", IMAGE, SpecOptions(cgroups_path="/x/y"))["linux"]["cgroupsPath"] == "/x/y"
    dropped = build_spec("c3", IMAGE, SpecOptions(cap_drop=["ALL"], cap_add=["KILL"]))
    assert dropped["process"]["capabilities"]["bounding"] == ["CAP_KILL"]


@pytest.mark.parametrize(("options", "message"), [
    (SpecOptions(cwd="relative"), "absolute"),
    (SpecOptions(memory_limit=0), "memory"),
    (SpecOptions(cpus=-1), "cpus"),
    (SpecOptions(pids_limit=0), "pids"),
    (SpecOptions(cap_add=["CAP_NOPE"]), "unknown capability"),
    (SpecOptions(env=["=x"]), "no name"),
    (SpecOptions(namespace_paths={"time": "/x"}), "unknown namespace"),
    (SpecOptions(mounts=[{"destination": "rel", "type": "bind", "source": "/", "options": []}]), "absolute"),
    (SpecOptions(user="a:b:c"), "invalid user"),
    (SpecOptions(user="4294967296"), "out of range"),
])
def test_bad_options_are_refused(options: SpecOptions, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        build_spec("c", IMAGE, options)


def test_parse_mount() -> None:
    assert parse_mount("src=/a,dst=/b") == {"destination": "/b", "type": "bind", "source": "/a", "options": ["rbind"]}
    assert parse_mount("type=tmpfs,source=tmpfs,target=/t,options=size=1m")["options"] == ["size=1m"]
    for bad in ("src=/a", "src=/a,dst=b", "src=/a,dst=/b,bogus=1", "junk"):
        with pytest.raises(InvalidArgument):
            parse_mount(bad)


# -------------------------------------------------------------------------------------------- users


@pytest.mark.parametrize(("user", "expected"), [
    ("", (0, 0, (0, 2000))),
    ("root", (0, 0, (0, 2000))),
    ("app", (1000, 1000, (1000, 2000))),
    ("1000", (1000, 1000, (1000, 2000))),
    ("svc", (1001, 3000, (3000, 2001))),
    ("4242", (4242, 0, (0,))),  # a uid the image does not know: gid 0
    ("app:extra", (1000, 2000, (2000,))),
    ("1000:5", (1000, 5, (5, 2000))),
    ("4242:4243", (4242, 4243, (4243,))),
    ("svc:root", (1001, 0, (0, 2001))),
])
def test_user_resolution(tmp_path: Path, user: str, expected: tuple[int, int, tuple[int, ...]]) -> None:
    rootfs = make_rootfs(tmp_path / "rootfs")
    resolved = resolve_user(rootfs, user)
    assert (resolved.uid, resolved.gid, resolved.additional_gids) == expected
    assert resolve_user(read_user_files(rootfs), user) == resolved  # the files kept for the next containers


def test_unknown_names_are_not_found(tmp_path: Path) -> None:
    rootfs = make_rootfs(tmp_path / "rootfs")
    with pytest.raises(NotFound, match="nobody"):
        resolve_user(rootfs, "nobody")
    with pytest.raises(NotFound, match="nogroup"):
        resolve_user(rootfs, "app:nogroup")
    with pytest.raises(NotFound):
        resolve_user(None, "app")  # no rootfs: names cannot resolve
    assert resolve_user(None, "7:8").to_spec() == {"uid": 7, "gid": 8, "additionalGids": [8]}
    with pytest.raises(NotFound, match="rootfs"):
        resolve_user(tmp_path / "missing", "app")


def test_symlinks_resolve_inside_the_rootfs(tmp_path: Path) -> None:
    rootfs = make_rootfs(tmp_path / "rootfs")
    (rootfs / "etc" / "real").mkdir()
    os.replace(rootfs / "etc" / "passwd", rootfs / "etc" / "real" / "passwd")
    (rootfs / "etc" / "passwd").symlink_to("/etc/../etc/real/./passwd")  # absolute: from the rootfs
    assert resolve_user(rootfs, "app").uid == 1000
    (rootfs / "etc" / "passwd").unlink()
    (rootfs / "etc" / "passwd").symlink_to("real/passwd")
    assert resolve_user(rootfs, "app").uid == 1000


@pytest.mark.parametrize("target", ["/etc/shadow", "../../../../../../../../etc/shadow", "../../..",
                                    "/proc/self/root/etc/shadow"])
def test_a_hostile_passwd_link_never_reads_the_host(tmp_path: Path, target: str) -> None:
    rootfs = make_rootfs(tmp_path / "rootfs")
    (rootfs / "etc" / "passwd").unlink()
    (rootfs / "etc" / "passwd").symlink_to(target)
    # The host's /etc/passwd has root; nothing of it may be seen: only numeric users resolve.
    assert read_in_root(rootfs, "etc/passwd") is None
    with pytest.raises(NotFound):
        resolve_user(rootfs, "root")
    assert resolve_user(rootfs, "0").gid == 0


def test_a_passwd_link_into_a_host_path_through_a_directory_link(tmp_path: Path) -> None:
    secret = tmp_path / "host-secret"
    secret.mkdir()
    (secret / "passwd").write_text("root:x:0:0::/:/bin/sh\nintruder:x:66:66::/:/bin/sh\n")
    rootfs = make_rootfs(tmp_path / "rootfs")
    shutil.rmtree(rootfs / "etc")
    (rootfs / "etc").symlink_to(secret)  # absolute host path: resolved inside the rootfs, where it is absent
    with pytest.raises(NotFound):
        resolve_user(rootfs, "intruder")
    (rootfs / "etc").unlink()
    (rootfs / "etc").symlink_to("../host-secret")  # climbs out: stopped at the rootfs
    with pytest.raises(NotFound):
        resolve_user(rootfs, "intruder")


def test_loops_fifos_and_huge_files(tmp_path: Path) -> None:
    rootfs = make_rootfs(tmp_path / "rootfs")
    (rootfs / "etc" / "passwd").unlink()
    (rootfs / "etc" / "passwd").symlink_to("passwd")
    with pytest.raises(InvalidArgument, match="loop"):
        resolve_user(rootfs, "app")
    (rootfs / "etc" / "passwd").unlink()
    os.mkfifo(rootfs / "etc" / "passwd")  # would block a plain open
    assert read_in_root(rootfs, "etc/passwd") is None
    (rootfs / "etc" / "passwd").unlink()
    with (rootfs / "etc" / "passwd").open("wb") as f:
        f.truncate(5 << 20)
    with pytest.raises(InvalidArgument, match="larger"):
        resolve_user(rootfs, "app")


# ------------------------------------------------------------------------------------------ seccomp


def test_default_seccomp_profile_structure() -> None:
    for machine, arches in (("x86_64", ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"]),
                            ("aarch64", ["SCMP_ARCH_ARM", "SCMP_ARCH_AARCH64"])):
        profile = default_seccomp_profile(DEFAULT_CAPABILITIES, machine)
        assert json.loads(json.dumps(profile)) == profile
        assert profile["defaultAction"] == "SCMP_ACT_ERRNO"
        assert profile["architectures"] == arches
        names = [name for rule in profile["syscalls"] for name in rule["names"]]
        for name in names:  # every name is one libseccomp knows, on some architecture
            assert any(pyseccomp.resolve_syscall(getattr(pyseccomp.Arch, a.removeprefix("SCMP_ARCH_")), name) != -1
                       for a in ARCH_NAMES), name
        for rule in profile["syscalls"]:
            assert rule["action"] in ("SCMP_ACT_ALLOW", "SCMP_ACT_ERRNO")
            for arg in rule.get("args", []):
                assert arg["op"] in ("SCMP_CMP_EQ", "SCMP_CMP_MASKED_EQ")
        allowed = {n for rule in profile["syscalls"] if rule["action"] == "SCMP_ACT_ALLOW" and not rule["args"]
                   for n in rule["names"]}
        assert {"read", "write", "execve", "exit_group"} <= allowed
        assert not {"mount", "unshare", "setns", "reboot", "kexec_load", "init_module"} & allowed
        clone3 = next(rule for rule in profile["syscalls"] if rule["names"] == ["clone3"])
        assert clone3 == {"names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": 38}
        clone = next(rule for rule in profile["syscalls"] if rule["names"] == ["clone"])
        assert clone["args"] == [{"index": 0, "value": 0x7E020000, "valueTwo": 0, "op": "SCMP_CMP_MASKED_EQ"}]
    admin = default_seccomp_profile(["CAP_SYS_ADMIN", "CAP_SYS_PTRACE"], "x86_64")
    opened = {n for rule in admin["syscalls"] if not rule.get("args") and rule["action"] == "SCMP_ACT_ALLOW"
              for n in rule["names"]}
    assert {"mount", "clone", "clone3", "setns", "process_vm_readv"} <= opened
    assert not any(rule["names"] == ["clone3"] and rule["action"] == "SCMP_ACT_ERRNO" for rule in admin["syscalls"])
    with pytest.raises(ValueError, match="s390x"):
        default_seccomp_profile(machine="s390x")


ARCH_NAMES = ("SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32", "SCMP_ARCH_ARM", "SCMP_ARCH_AARCH64")


# ------------------------------------------------------------------------------------ plugin hook


class _Adjuster:
    def __init__(self, name: str) -> None:
        self.name = name

    @hookimpl
    def berth_adjust_spec(self, spec: dict[str, Any], container: Container) -> None:
        spec.setdefault("annotations", {})["order"] = spec.get("annotations", {}).get("order", "") + self.name
        spec["process"]["env"].append(f"FROM_{self.name}={container.id}")


class _Broken:
    @hookimpl
    def berth_adjust_spec(self, spec: dict[str, Any], container: Container) -> None:
        raise RuntimeError("boom")


def test_plugins_adjust_the_spec_in_load_order() -> None:
    loaded = load_plugins((), entry_points=False, extra=[_Adjuster("a"), _Adjuster("b")])
    spec = build_spec("c4", IMAGE)
    container = Container(id="c4", runtime=Runtime(name="io.berth.runtime.v1.runc"), spec=spec)
    assert apply_spec_adjustments(loaded.manager, spec, container) is spec
    assert spec["annotations"]["order"] == "ab"
    assert spec["process"]["env"][-2:] == ["FROM_a=c4", "FROM_b=c4"]
    broken = load_plugins((), entry_points=False, extra=[_Broken()])
    with pytest.raises(Internal, match="boom"):
        apply_spec_adjustments(broken.manager, spec, container)


async def test_generate_spec_runs_in_a_thread(tmp_path: Path) -> None:
    spec = await generate_spec("c5", IMAGE, SpecOptions(user="app"), rootfs=make_rootfs(tmp_path / "rootfs"))
    assert spec["process"]["user"]["uid"] == 1000


# --------------------------------------------------------------------------------- runc, for real

needs_runc = pytest.mark.skipif(os.geteuid() != 0 or not RUNC.exists() or not BUSYBOX.exists()
                                or platform.machine() != "x86_64",
                                reason="runs containers with runc as root (busybox-static and runc installed)")


@dataclass
class Runc:
    state: Path
    base: Path
    cgroup_parent: str
    rootfs: Path
    ids: list[str]

    def run(self, name: str, options: SpecOptions, *, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        container_id = f"{name}-{uuid.uuid4().hex[:8]}"
        self.ids.append(container_id)
        bundle = self.base / container_id
        bundle.mkdir()
        options.rootfs_path = str(self.rootfs)
        options.cgroups_path = f"/{self.cgroup_parent}/{container_id}"
        spec = build_spec(container_id, IMAGE, options, rootfs=self.rootfs)
        (bundle / "config.json").write_text(json.dumps(spec))
        try:
            return subprocess.run([str(RUNC), "--root", str(self.state), "run", "--bundle", str(bundle), container_id],
                                  capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
                                  check=False)
        finally:
            self.delete(container_id)

    def delete(self, container_id: str) -> None:
        subprocess.run([str(RUNC), "--root", str(self.state), "delete", "--force", container_id],
                       capture_output=True, timeout=30, check=False)


def _cgroup_dirs(parent: str) -> list[Path]:
    return [Path("/sys/fs/cgroup") / hierarchy / parent for hierarchy in os.listdir("/sys/fs/cgroup")] + \
        [Path("/sys/fs/cgroup") / parent]


@pytest.fixture(scope="module")
def runc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Runc]:
    base = tmp_path_factory.mktemp("runc")
    rootfs = make_rootfs(base / "rootfs")
    parent = f"berthtest-{uuid.uuid4().hex[:8]}"
    helper = Runc(state=base / "state", base=base, cgroup_parent=parent, rootfs=rootfs, ids=[])
    try:
        yield helper
    finally:
        for container_id in helper.ids:  # anything left by a failed test, by id
            helper.delete(container_id)
        for directory in _cgroup_dirs(parent):
            with contextlib.suppress(FileNotFoundError, NotADirectoryError):
                for child in directory.iterdir():
                    if child.is_dir():
                        child.rmdir()
                directory.rmdir()


@needs_runc
def test_runc_exit_status_env_cwd_and_user(runc: Runc) -> None:
    assert runc.run("exit", SpecOptions(args=["exit 7"])).returncode == 7
    result = runc.run("env", SpecOptions(args=["echo $FOO $BAR; pwd; id; hostname"], env=["BAR=qux"], user="app",
                                         hostname="boxy"))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "bar qux"
    assert lines[1] == "/work"
    assert lines[2] == "uid=1000(app) gid=1000(app) groups=1000(app),2000(extra)"
    assert lines[3] == "boxy"


@needs_runc
def test_runc_read_only_rootfs_and_etc_files(runc: Runc, tmp_path: Path) -> None:
    result = runc.run("ro", SpecOptions(args=["touch /x || echo refused; touch /tmp/y && echo writable-bind;"
                                              " cat /etc/hostname"],
                                        read_only=True, hostname="rofs", etc_dir=tmp_path / "etc",
                                        mounts=[parse_mount(f"type=bind,src={tmp_path},dst=/tmp")]))
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["refused", "writable-bind", "rofs"]
    assert (tmp_path / "y").exists()


@needs_runc
def test_runc_default_capabilities_refuse_mount_and_sysrq(runc: Runc) -> None:
    result = runc.run("caps", SpecOptions(args=["mount -t tmpfs none /mnt && echo mounted; "
                                                "echo h > /proc/sysrq-trigger && echo wrote; echo done"]))
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["done"]
    seccomp = runc.run("seccomp", SpecOptions(args=["echo ok"], seccomp=True))
    assert (seccomp.returncode, seccomp.stdout) == (0, "ok\n"), seccomp.stderr


@needs_runc
def test_runc_pids_limit_stops_a_fork_bomb(runc: Runc) -> None:
    result = runc.run("pids", SpecOptions(args=["for i in $(seq 40); do sleep 1 & done; wait; echo finished"],
                                          pids_limit=8))
    assert "can't fork" in result.stderr
    assert result.returncode != 0
    assert "finished" not in result.stdout
    unlimited = runc.run("nopids", SpecOptions(args=["for i in $(seq 40); do true & done; wait; echo finished"]))
    assert (unlimited.returncode, unlimited.stdout) == (0, "finished\n"), unlimited.stderr


@needs_runc
def test_runc_memory_and_cpu_limits_reach_the_cgroup(runc: Runc) -> None:
    # cgroup v1 (this host's hybrid layout) or v2: the container sees its own cgroup at /sys/fs/cgroup.
    script = ("cat /sys/fs/cgroup/memory/memory.limit_in_bytes 2>/dev/null || cat /sys/fs/cgroup/memory.max; "
              "cat /sys/fs/cgroup/cpu/cpu.cfs_quota_us 2>/dev/null || cat /sys/fs/cgroup/cpu.max")
    result = runc.run("limits", SpecOptions(args=[script], memory_limit=32 << 20, cpus=0.5))
    assert result.returncode == 0, result.stderr
    memory, cpu = result.stdout.splitlines()
    assert memory == str(32 << 20)
    assert cpu in ("50000", "50000 100000")


@needs_runc
def test_runc_privileged_can_mount(runc: Runc) -> None:
    result = runc.run("priv", SpecOptions(args=["mount -t tmpfs none /mnt && echo mounted"], privileged=True))
    assert (result.returncode, result.stdout) == (0, "mounted\n"), result.stderr
