"""berth-runtime, berth's own OCI runtime, against runc: the same bundles run through both, and what the
container sees compared (mounts, capabilities, ids, hostname, rlimits, namespaces, cgroup limits, masked
and read-only paths, seccomp, hooks); its runc-style lifecycle commands; and bad bundles refused with
a clear message and nothing left behind."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from berth.runtimes.runc.plugin import find_binary

BUSYBOX = Path("/bin/busybox")
BERTH_RUNTIME = find_binary("berth-runtime")
RUNC = shutil.which("runc")

pytestmark = pytest.mark.skipif(BERTH_RUNTIME is None or RUNC is None or os.geteuid() != 0,
                                reason="needs root, runc and berth-runtime installed")

Spec = dict[str, Any]


def make_rootfs(path: Path) -> None:
    """A busybox root filesystem: /bin/busybox with its applets, /etc/passwd and /etc/group."""
    for directory in ("bin", "dev", "etc", "proc", "sys", "tmp", "root"):
        (path / directory).mkdir(parents=True, exist_ok=True)
    shutil.copy(BUSYBOX, path / "bin" / "busybox")
    applets = subprocess.run([str(BUSYBOX), "--list"], capture_output=True, text=True, check=True).stdout.split()
    for applet in applets:
        if applet != "busybox":
            (path / "bin" / applet).symlink_to("busybox")
    (path / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534::/:/bin/false\n")
    (path / "etc" / "group").write_text("root:x:0:\nnogroup:x:65534:\n")


class Runtimes:
    """Runs bundles through runc and berth-runtime, each with its own state root; cleans both up."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.rootfs = base / "rootfs"
        make_rootfs(self.rootfs)
        self.roots = {"runc": base / "runc-root", "builtin": base / "builtin-root"}
        self.binaries = {"runc": str(RUNC), "builtin": str(BERTH_RUNTIME)}
        self.count = 0
        spec = subprocess.run([str(RUNC), "spec", "--bundle", str(base)], capture_output=True, check=True)
        assert spec.returncode == 0
        self.base_spec: Spec = json.loads((base / "config.json").read_text())
        (base / "config.json").unlink()

    def bundle(self, spec: Spec) -> Path:
        self.count += 1
        bundle = self.base / f"bundle{self.count}"
        bundle.mkdir()
        spec = json.loads(json.dumps(spec))
        spec["root"] = {"path": str(self.rootfs), "readonly": spec.get("root", {}).get("readonly", True)}
        (bundle / "config.json").write_text(json.dumps(spec))
        return bundle

    def spec(self, args: list[str], change: Callable[[Spec], None] | None = None) -> Spec:
        spec = json.loads(json.dumps(self.base_spec))
        spec["process"]["terminal"] = False
        spec["process"]["args"] = args
        spec["hostname"] = "comparison"
        if change is not None:
            change(spec)
        return spec

    def command(self, runtime: str, *args: str) -> list[str]:
        return [self.binaries[runtime], "--root", str(self.roots[runtime]), *args]

    def run(self, runtime: str, spec: Spec, *, check: bool = True) -> subprocess.CompletedProcess[str]:
        bundle = self.bundle(spec)
        container_id = f"cmp{self.count}"
        try:
            result = subprocess.run(self.command(runtime, "run", "--bundle", str(bundle), container_id),
                                    capture_output=True, text=True, timeout=60, check=False,
                                    stdin=subprocess.DEVNULL)
        finally:
            subprocess.run(self.command(runtime, "delete", "--force", container_id), capture_output=True,
                           check=False, timeout=30)
        if check:
            assert result.returncode == 0, f"{runtime}: {result.stderr}"
        return result

    def both(self, args: list[str], change: Callable[[Spec], None] | None = None) -> dict[str, str]:
        spec = self.spec(args, change)
        return {runtime: self.run(runtime, spec).stdout for runtime in ("runc", "builtin")}

    def cleanup(self) -> None:
        for runtime in self.roots:
            if not self.roots[runtime].is_dir():
                continue
            listed = subprocess.run(self.command(runtime, "list", "-q"), capture_output=True, text=True, check=False)
            for container_id in listed.stdout.split():
                subprocess.run(self.command(runtime, "delete", "--force", container_id), capture_output=True,
                               check=False)


@pytest.fixture(scope="module")
def runtimes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Runtimes]:
    made = Runtimes(tmp_path_factory.mktemp("bundles"))
    try:
        yield made
    finally:
        made.cleanup()


def host_ns(kind: str) -> str:
    return os.readlink(f"/proc/self/ns/{kind}")


def test_the_container_sees_the_same_through_both(runtimes: Runtimes) -> None:
    script = ("cat /proc/self/status | grep -E '^(Cap|NoNewPrivs|Seccomp:)'; id; hostname; ulimit -n; ulimit -u; "
              "awk '{print $5, $9}' /proc/self/mountinfo | sort; umask; pwd")
    seen = runtimes.both(["sh", "-c", script])
    assert seen["builtin"] == seen["runc"]
    assert "comparison" in seen["builtin"]


def test_namespaces_are_new_and_differ_from_the_hosts(runtimes: Runtimes) -> None:
    kinds = ("pid", "mnt", "uts", "ipc", "net")
    script = "; ".join(f"readlink /proc/self/ns/{kind}" for kind in kinds)
    for runtime in ("runc", "builtin"):
        seen = runtimes.run(runtime, runtimes.spec(["sh", "-c", script])).stdout.split()
        assert len(seen) == len(kinds)
        for kind, link in zip(kinds, seen, strict=True):
            assert link != host_ns(kind), f"{runtime}: the {kind} namespace is the host's"
    pid1 = runtimes.both(["sh", "-c", "echo $$"])
    assert pid1 == {"runc": "1\n", "builtin": "1\n"}


def test_user_rlimits_cwd_and_env(runtimes: Runtimes) -> None:
    def change(spec: Spec) -> None:
        spec["process"]["user"] = {"uid": 65534, "gid": 65534, "additionalGids": [0]}
        spec["process"]["rlimits"] = [{"type": "RLIMIT_NOFILE", "hard": 512, "soft": 256},
                                      {"type": "RLIMIT_NPROC", "hard": 100, "soft": 50}]
        spec["process"]["cwd"] = "/tmp"
        spec["process"]["env"] = ["PATH=/bin", "GREETING=ahoy"]
    seen = runtimes.both(["sh", "-c", "id -u; id -g; id -G; ulimit -n; ulimit -Hn; ulimit -u; pwd; echo $GREETING"],
                         change)
    assert seen["builtin"] == seen["runc"] == "65534\n65534\n65534 0\n256\n512\n50\n/tmp\nahoy\n"


def test_cgroup_limits(runtimes: Runtimes) -> None:
    def change(spec: Spec) -> None:
        spec["linux"]["resources"] = {"memory": {"limit": 64 << 20}, "pids": {"limit": 32},
                                      "cpu": {"quota": 50000, "period": 100000}}
        spec["linux"]["cgroupsPath"] = f"/berth-test-{os.getpid()}"  # one level: no parent is left behind
    script = ("ls /sys/fs/cgroup; cat /sys/fs/cgroup/memory/memory.limit_in_bytes /sys/fs/cgroup/pids/pids.max "
              "/sys/fs/cgroup/cpu/cpu.cfs_quota_us 2>/dev/null || cat /sys/fs/cgroup/memory.max "
              "/sys/fs/cgroup/pids.max /sys/fs/cgroup/cpu.max")
    seen = runtimes.both(["sh", "-c", script], change)
    assert seen["builtin"] == seen["runc"]
    assert str(64 << 20) in seen["builtin"]
    assert "32" in seen["builtin"].split()


def test_masked_and_read_only_paths(runtimes: Runtimes) -> None:
    script = ("cat /proc/kcore 2>/dev/null | head -c 1 | wc -c; ls /proc/acpi 2>/dev/null | wc -l; "
              "(echo 1 > /proc/sys/kernel/domainname) 2>/dev/null && echo wrote || echo refused; "
              "(echo h > /proc/sysrq-trigger) 2>/dev/null && echo wrote || echo refused")
    seen = runtimes.both(["sh", "-c", script])
    assert seen["builtin"] == seen["runc"] == "0\n0\nrefused\nrefused\n"


def test_seccomp_denies_a_filtered_syscall(runtimes: Runtimes) -> None:
    def change(spec: Spec) -> None:
        spec["linux"]["seccomp"] = {"defaultAction": "SCMP_ACT_ALLOW", "architectures": ["SCMP_ARCH_X86_64"],
                                    "syscalls": [{"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO",
                                                  "errnoRet": 1}]}
        spec["root"] = {"path": "rootfs", "readonly": False}
    seen = runtimes.both(["sh", "-c", "mkdir /tmp/x 2>&1 || true; grep Seccomp: /proc/self/status"], change)
    assert seen["builtin"] == seen["runc"]
    assert "Operation not permitted" in seen["builtin"]
    assert "Seccomp:\t2" in seen["builtin"]


def test_hooks_run_in_order_with_the_state_on_stdin(runtimes: Runtimes, tmp_path: Path) -> None:
    """Host hooks record their name and the state's status; startContainer runs in the container (its path
    is the container's), so it leaves a file in the container's writable rootfs."""
    outputs = {}
    for runtime in ("runc", "builtin"):
        record = tmp_path / f"{runtime}-hooks.log"
        rootfs = tmp_path / f"{runtime}-rootfs"
        shutil.copytree(runtimes.rootfs, rootfs, symlinks=True)

        def hook(name: str, record: Path = record) -> dict[str, Any]:
            script = (f"import json,sys; s=json.load(sys.stdin); "
                      f"open({str(record)!r},'a').write('{name} '+s['status']+'\\n')")
            return {"path": sys.executable, "args": [sys.executable, "-c", script]}

        def change(spec: Spec, hook: Callable[[str], dict[str, Any]] = hook, rootfs: Path = rootfs) -> None:
            spec["hooks"] = {name: [hook(name)] for name in ("prestart", "createRuntime", "createContainer",
                                                              "poststart", "poststop")}
            spec["hooks"]["startContainer"] = [{"path": "/bin/sh", "args": ["sh", "-c", "echo ran > /started"]}]
            spec["root"] = {"path": str(rootfs), "readonly": False}

        bundle = runtimes.bundle(runtimes.spec(["true"], change))
        spec = json.loads((bundle / "config.json").read_text())
        spec["root"] = {"path": str(rootfs), "readonly": False}
        (bundle / "config.json").write_text(json.dumps(spec))
        result = run_command(runtimes.command(runtime, "run", "--bundle", str(bundle), f"hooks-{runtime}"))
        run_command(runtimes.command(runtime, "delete", "--force", f"hooks-{runtime}"))
        assert result.returncode == 0, f"{runtime}: {result.stderr}"
        outputs[runtime] = record.read_text().splitlines()
        assert (rootfs / "started").read_text() == "ran\n", f"{runtime}: startContainer did not run"
    names = ["prestart", "createRuntime", "createContainer", "poststart", "poststop"]
    assert [line.split()[0] for line in outputs["runc"]] == names
    # The statuses the OCI runtime spec gives each moment (runc 1.1 says "created" for poststart).
    assert outputs["builtin"] == ["prestart creating", "createRuntime creating", "createContainer creating",
                                  "poststart running", "poststop stopped"]


def run_command(argv: list[str]) -> subprocess.CompletedProcess[str]:
    """Run a runtime command with its output in files, not pipes: after ``create`` the container holds
    the command's stdio (as runc's does), so a pipe would never reach end-of-file."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        returncode = subprocess.run(argv, stdout=out, stderr=err, stdin=subprocess.DEVNULL, timeout=60,
                                    check=False).returncode
        out.seek(0)
        err.seek(0)
        return subprocess.CompletedProcess(argv, returncode, out.read().decode(), err.read().decode())


def lifecycle(runtimes: Runtimes, runtime: str, container_id: str, *args: str, check: bool = True
              ) -> subprocess.CompletedProcess[str]:
    result = run_command(runtimes.command(runtime, *args))
    if check:
        assert result.returncode == 0, f"{runtime} {args}: {result.stderr}"
    return result


def test_the_create_start_split_and_the_runc_commands(runtimes: Runtimes) -> None:
    bundle = runtimes.bundle(runtimes.spec(["sleep", "300"]))
    cid = "lifecycle"
    run = functools.partial(lifecycle, runtimes, "builtin", cid)

    def status() -> str:
        return str(json.loads(run("state", cid).stdout)["status"])

    try:
        run("create", "--bundle", str(bundle), "--pid-file", str(bundle / "pid"), cid)
        state = json.loads(run("state", cid).stdout)
        pid = int((bundle / "pid").read_text())
        assert (state["status"], state["pid"], state["id"]) == ("created", pid, cid)
        assert Path(f"/proc/{pid}").exists()  # the init waits, set up, for start
        run("start", cid)
        assert status() == "running"
        refused = run("delete", cid, check=False)
        assert refused.returncode != 0
        assert "running" in refused.stderr
        assert run("list", "-q").stdout.split() == [cid]
        assert json.loads(run("list", "--format", "json").stdout)[0]["id"] == cid
        assert run("exec", cid, "sh", "-c", "echo in $(hostname)").stdout == "in comparison\n"
        assert pid in json.loads(run("ps", "--format", "json", cid).stdout)
        run("pause", cid)
        assert status() == "paused"
        run("resume", cid)
        assert status() == "running"
        run("update", "--pids-limit", "40", cid)
        assert run("exec", cid, "cat", "/sys/fs/cgroup/pids/pids.max").stdout.strip() == "40"
        run("kill", cid, "KILL")
        deadline = time.monotonic() + 10
        while status() != "stopped":
            assert time.monotonic() < deadline, "the container did not stop after SIGKILL"
            time.sleep(0.05)
        run("delete", cid)
        assert run("state", cid, check=False).returncode != 0
    finally:
        lifecycle(runtimes, "builtin", cid, "delete", "--force", cid, check=False)


@pytest.mark.parametrize(("problem", "change", "message"), [
    ("missing rootfs", lambda s: s.update(root={"path": "/nonexistent/rootfs"}), "/nonexistent/rootfs"),
    ("unknown namespace", lambda s: s["linux"]["namespaces"].append({"type": "bogus"}), "bogus"),
    ("mount escaping", lambda s: s["mounts"].append({"destination": "/escape/inside", "type": "tmpfs",
                                                     "source": "tmpfs"}), "escapes the container's root"),
])
def test_bad_bundles_are_refused_clearly_and_leave_nothing(runtimes: Runtimes, tmp_path: Path, problem: str,
                                                          change: Callable[[Spec], None], message: str) -> None:
    rootfs = tmp_path / "rootfs"
    shutil.copytree(runtimes.rootfs, rootfs, symlinks=True)
    (rootfs / "escape").symlink_to("../../../../../../../../tmp")  # a symlink climbing out of the rootfs
    spec = runtimes.spec(["true"])
    spec["root"] = {"path": str(rootfs), "readonly": True}
    change(spec)
    spec["linux"]["cgroupsPath"] = f"/berth-bad-{os.getpid()}"
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "config.json").write_text(json.dumps(spec))
    log = tmp_path / "log.json"
    result = run_command(runtimes.command("builtin", "--log", str(log), "--log-format", "json", "create",
                                          "--bundle", str(bundle), "bad"))
    try:
        assert result.returncode != 0, f"{problem}: accepted"
        assert message in result.stderr, f"{problem}: {result.stderr!r}"
        entries = [json.loads(line) for line in log.read_text().splitlines()]
        assert entries[-1]["level"] == "error"
        assert message in entries[-1]["msg"]
        assert not (runtimes.roots["builtin"] / "bad").exists()
        assert not Path(f"/sys/fs/cgroup/memory/berth-bad-{os.getpid()}").exists()
        assert not Path(f"/sys/fs/cgroup/pids/berth-bad-{os.getpid()}").exists()
        assert str(tmp_path) not in Path("/proc/self/mountinfo").read_text()  # nothing left mounted there
        assert not Path("/tmp/inside").exists()  # nothing was made outside the rootfs
    finally:
        lifecycle(runtimes, "builtin", "bad", "delete", "--force", "bad", check=False)


def test_invalid_json_is_refused(runtimes: Runtimes, tmp_path: Path) -> None:
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "config.json").write_text("{not json")
    result = subprocess.run(runtimes.command("builtin", "create", "--bundle", str(bundle), "badjson"),
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode != 0
    assert "config.json" in result.stderr
    with contextlib.suppress(FileNotFoundError):
        assert not (runtimes.roots["builtin"] / "badjson").exists()
