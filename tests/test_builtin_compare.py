"""The same bundles through ``berth-runtime`` and ``runc``: the container must see the same world
(mounts, capabilities, ids, hostname, rlimits, namespaces, cgroup limits, masked and read-only paths,
seccomp, hooks)."""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.runtime_fixture import RuntimeLab, base_spec, runtime_lab

pytestmark = pytest.mark.privileged

# What the container reports, one "key: value" block per probe.
PROBE = r"""
echo "== mounts"
sed 's/ - /|/' /proc/self/mountinfo | awk -F'|' '{split($1, a, " "); split($2, b, " "); print a[5], b[1]}'
echo "== status"; grep -E '^(Cap(Prm|Eff|Bnd|Inh|Amb)|NoNewPrivs|Seccomp):' /proc/self/status
echo "== id"; id
echo "== hostname"; hostname
echo "== ulimit"; ulimit -n; ulimit -Hn
echo "== ns"; for n in cgroup ipc mnt net pid uts; do echo "$n $(readlink /proc/self/ns/$n)"; done
echo "== cgroup"; cat /sys/fs/cgroup/memory/memory.limit_in_bytes /sys/fs/cgroup/pids/pids.max
echo "== masked"
for f in /proc/kcore /proc/keys /proc/timer_list; do echo "$f $(head -c 16 $f | wc -c)"; done
ls -A /proc/acpi | wc -l
echo "== readonly"
for f in domainname hostname; do (echo x > /proc/sys/kernel/$f) 2>&1 | sed 's/^.*: //'; done
echo "== cwd"; pwd; echo "$HOME"; umask
"""


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[RuntimeLab]:
    with runtime_lab(tmp_path) as lab:
        yield lab


def sections(text: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    current = ""
    for line in text.splitlines():
        if line.startswith("== "):
            current = line[3:]
            out[current] = []
        elif current:
            out[current].append(line)
    return out


def run_both(lab: RuntimeLab, spec: dict[str, Any], args: list[str]) -> dict[str, tuple[int, str, str]]:
    """Run the bundle through both runtimes in the foreground: name -> (status, stdout, stderr)."""
    results = {}
    for name in ("runc", "berth-runtime"):
        runtime = lab.runtime(name)
        bundle = lab.bundle(args, spec, name=f"{name}-{lab.bundles}")
        result = runtime.run("run", "--bundle", str(bundle), "c1", check=False)
        results[name] = (result.returncode, result.stdout, result.stderr)
    return results


def limited_spec() -> dict[str, Any]:
    spec = base_spec()
    spec["hostname"] = "probe-host"
    spec["process"]["rlimits"] = [{"type": "RLIMIT_NOFILE", "soft": 512, "hard": 768}]
    spec["process"]["cwd"] = "/tmp"
    spec["linux"]["resources"] = {"memory": {"limit": 64 << 20}, "pids": {"limit": 42}}
    return spec


def host_namespaces() -> dict[str, str]:
    return {n: os.readlink(f"/proc/self/ns/{n}") for n in ("cgroup", "ipc", "mnt", "net", "pid", "uts")}


def test_the_container_sees_what_runc_shows(lab: RuntimeLab) -> None:
    results = run_both(lab, limited_spec(), ["sh", "-c", PROBE])
    (runc_status, runc_out, _), (ours_status, ours_out, ours_err) = results["runc"], results["berth-runtime"]
    assert (ours_status, runc_status) == (0, 0), ours_err
    ours, theirs = sections(ours_out), sections(runc_out)
    for section in ("mounts", "status", "id", "hostname", "ulimit", "cgroup", "masked", "readonly", "cwd"):
        assert ours[section] == theirs[section], section
    assert ours["hostname"] == ["probe-host"]
    assert ours["ulimit"] == ["512", "768"]
    assert ours["cgroup"] == [str(64 << 20), "42"]
    assert ours["masked"] == ["/proc/kcore 0", "/proc/keys 0", "/proc/timer_list 0", "0"]
    assert ours["readonly"] == ["Read-only file system", "Read-only file system"]
    host = host_namespaces()
    seen = dict(line.split(" ", 1) for line in ours["ns"])
    new = {"ipc", "mnt", "net", "pid", "uts"}
    assert {n for n in new if seen[n] == host[n]} == set()
    assert seen["cgroup"] == host["cgroup"]  # runc's default spec keeps the host's cgroup namespace


def test_a_user_and_its_capabilities_match_runc(lab: RuntimeLab) -> None:
    spec = base_spec()
    spec["process"]["user"] = {"uid": 1000, "gid": 1000, "additionalGids": [5, 7]}
    caps = ["CAP_CHOWN", "CAP_NET_BIND_SERVICE", "CAP_KILL"]
    spec["process"]["capabilities"] = {"bounding": caps, "permitted": caps[:2], "effective": caps[:2],
                                       "inheritable": caps[:2], "ambient": caps[:1]}
    spec["process"]["noNewPrivileges"] = True
    results = run_both(lab, spec, ["sh", "-c", PROBE])
    (_, runc_out, _), (ours_status, ours_out, ours_err) = results["runc"], results["berth-runtime"]
    assert ours_status == 0, ours_err
    ours, theirs = sections(ours_out), sections(runc_out)
    assert ours["status"] == theirs["status"]
    assert ours["id"] == theirs["id"]
    assert ours["cwd"] == theirs["cwd"]
    assert ours["id"][0].startswith("uid=1000(user) gid=1000(user)")


def test_seccomp_denies_a_filtered_syscall_as_runc_does(lab: RuntimeLab) -> None:
    spec = base_spec()
    spec["linux"]["seccomp"] = {
        "defaultAction": "SCMP_ACT_ALLOW", "architectures": ["SCMP_ARCH_X86_64"],
        "syscalls": [{"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1}],
    }
    spec["mounts"].append({"destination": "/tmp", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid"]})
    results = run_both(lab, spec, ["sh", "-c", "mkdir /tmp/x; echo status=$?; grep Seccomp: /proc/self/status;"
                                              " touch /tmp/file && echo touched"])
    for name, (status, out, err) in results.items():
        assert status == 0, (name, err)
        assert "status=1" in out, name
        assert "Seccomp:\t2" in out, name
        assert "touched" in out, name
    assert re.sub(r"\S+: ", "", results["runc"][2]) == re.sub(r"\S+: ", "", results["berth-runtime"][2])


HOOK = '#!/bin/sh\nread state\necho "$1 $state" >> "$2"\n'
HOOK_KINDS = ("prestart", "createRuntime", "createContainer", "startContainer", "poststart", "poststop")


def test_hooks_run_in_order_with_the_state_on_stdin(lab: RuntimeLab) -> None:
    """startContainer runs in the container (after the pivot), the others see the host's files: the hook
    directory is bind-mounted at /hooks so every hook can log to the same file."""
    logs = {}
    for name in ("runc", "berth-runtime"):
        hooks = lab.base / f"hookdir-{name}"
        hooks.mkdir()
        (hooks / "hook.sh").write_text(HOOK)
        (hooks / "hook.sh").chmod(0o755)
        spec = base_spec()
        spec["mounts"].append({"destination": "/hooks", "type": "bind", "source": str(hooks),
                               "options": ["rbind", "rw"]})
        spec["hooks"] = {kind: [{"path": "/hooks/hook.sh" if kind == "startContainer" else str(hooks / "hook.sh"),
                                 "args": ["hook.sh", kind, "/hooks/log" if kind == "startContainer" else
                                          str(hooks / "log")]}] for kind in HOOK_KINDS}
        runtime = lab.runtime(name)
        bundle = lab.bundle(["true"], spec, name=f"hooks-{name}")
        runtime.run("run", "--bundle", str(bundle), "hooked")
        lines = (hooks / "log").read_text().splitlines()
        kinds = [line.split(" ", 1)[0] for line in lines]
        # startContainer (in the container, before execve) and poststart (in the runtime, after start)
        # race each other, in runc too
        assert kinds[:3] == list(HOOK_KINDS[:3]), (name, kinds)
        assert kinds[5:] == ["poststop"], (name, kinds)
        assert sorted(kinds[3:5]) == ["poststart", "startContainer"], (name, kinds)
        states = [json.loads(line.split(" ", 1)[1]) for line in sorted(lines, key=lambda ln: HOOK_KINDS.index(
            ln.split(" ", 1)[0]))]
        assert {s["id"] for s in states} == {"hooked"}
        assert states[0]["bundle"] == str(bundle)
        logs[name] = [(s["status"], s["pid"] > 0 if "pid" in s else None) for s in states]
    # runc 1.1 hands poststart the state it read before the start ("created"); the container is running
    poststart = HOOK_KINDS.index("poststart")
    assert logs["berth-runtime"].pop(poststart) == ("running", True)
    assert logs["runc"].pop(poststart) == ("created", True)
    assert logs["berth-runtime"] == logs["runc"]


@pytest.fixture
def open_lab() -> Iterator[RuntimeLab]:
    """A lab in a directory the container's mapped root (an unprivileged host uid) can traverse:
    pytest's own temporary directories are 0700."""
    base = Path(tempfile.mkdtemp(prefix="berth-userns-", dir="/tmp"))
    base.chmod(0o755)
    try:
        with runtime_lab(base) as lab:
            yield lab
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_a_user_namespace_with_id_maps_matches_runc(open_lab: RuntimeLab) -> None:
    lab = open_lab
    spec = base_spec()
    spec["linux"]["namespaces"].append({"type": "user"})
    spec["linux"]["uidMappings"] = [{"containerID": 0, "hostID": 100000, "size": 65536}]
    spec["linux"]["gidMappings"] = [{"containerID": 0, "hostID": 100000, "size": 65536}]
    spec["mounts"].append({"destination": "/tmp", "type": "tmpfs", "source": "tmpfs"})
    probe = "cat /proc/self/uid_map /proc/self/gid_map; id; touch /tmp/file && echo wrote; readlink /proc/self/ns/user"
    results = run_both(lab, spec, ["sh", "-c", probe])
    outputs = {}
    for name, (status, out, err) in results.items():
        assert status == 0, (name, err)
        outputs[name] = out.splitlines()
    assert outputs["berth-runtime"][:-1] == outputs["runc"][:-1]
    assert outputs["berth-runtime"][0].split() == ["0", "100000", "65536"]
    assert outputs["berth-runtime"][-1] != os.readlink("/proc/self/ns/user")
