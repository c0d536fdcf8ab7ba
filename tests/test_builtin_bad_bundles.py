"""Bundles ``berth-runtime`` must refuse: each fails non-zero with a message naming the problem (on stderr
and as a JSON log line) and leaves no cgroup, mount, process or state directory behind."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.runtime_fixture import RuntimeLab, base_spec, runtime_lab

pytestmark = pytest.mark.privileged


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[RuntimeLab]:
    with runtime_lab(tmp_path) as lab:
        yield lab


def missing_rootfs(lab: RuntimeLab, bundle: Path) -> None:
    spec = json.loads((bundle / "config.json").read_text())
    spec["root"]["path"] = str(lab.base / "no-such-rootfs")
    (bundle / "config.json").write_text(json.dumps(spec))


def invalid_json(lab: RuntimeLab, bundle: Path) -> None:
    (bundle / "config.json").write_text('{"ociVersion": "1.0.2", "process": ')


def unknown_namespace(lab: RuntimeLab, bundle: Path) -> None:
    spec = json.loads((bundle / "config.json").read_text())
    spec["linux"]["namespaces"].append({"type": "bogus"})
    (bundle / "config.json").write_text(json.dumps(spec))


def escaping_mount(lab: RuntimeLab, bundle: Path) -> None:
    """A writable rootfs of its own whose /escape is a symlink to a host directory; a tmpfs mounted on
    /escape/x would land outside the rootfs."""
    rootfs = bundle / "rootfs"
    rootfs.mkdir()
    for folder in ("bin", "proc", "sys", "dev", "tmp"):
        (rootfs / folder).mkdir()
    outside = lab.base / "outside"
    (outside / "x").mkdir(parents=True)
    (rootfs / "escape").symlink_to("../../outside")
    spec = json.loads((bundle / "config.json").read_text())
    spec["root"] = {"path": str(rootfs), "readonly": False}
    spec["mounts"].append({"destination": "/escape/x", "type": "tmpfs", "source": "tmpfs"})
    (bundle / "config.json").write_text(json.dumps(spec))


def missing_program(lab: RuntimeLab, bundle: Path) -> None:
    """Found only in the container process, after the cgroups, namespaces and mounts are made."""
    spec = json.loads((bundle / "config.json").read_text())
    spec["process"]["args"] = ["/no/such/program"]
    (bundle / "config.json").write_text(json.dumps(spec))


def bad_mount_source(lab: RuntimeLab, bundle: Path) -> None:
    """A bind mount whose source is missing: the container process fails half-way through its mounts."""
    spec = json.loads((bundle / "config.json").read_text())
    spec["mounts"].append({"destination": "/mnt", "type": "bind", "source": str(lab.base / "no-such-source"),
                           "options": ["rbind"]})
    (bundle / "config.json").write_text(json.dumps(spec))


def edit_spec(change: Callable[[dict[str, Any]], None]) -> Callable[[RuntimeLab, Path], None]:
    def apply(lab: RuntimeLab, bundle: Path) -> None:
        spec = json.loads((bundle / "config.json").read_text())
        change(spec)
        (bundle / "config.json").write_text(json.dumps(spec))

    return apply


def deeply_nested(lab: RuntimeLab, bundle: Path) -> None:
    (bundle / "config.json").write_text("[" * 100_000 + "]" * 100_000)


CASES: dict[str, tuple[Callable[[RuntimeLab, Path], None], str]] = {
    "deeply nested JSON": (deeply_nested, "nested too deeply"),
    "NUL in the hostname": (edit_spec(lambda spec: spec.update(hostname="a\x00b")), "hostname holds a NUL"),
    "lone surrogate in an argument": (edit_spec(lambda spec: spec["process"].update(args=["/bin/\ud800"])),
                                      "process.args[0] is not valid Unicode"),
    "uid out of range": (edit_spec(lambda spec: spec["process"]["user"].update(uid=2**32)),
                         "process.user.uid 4294967296 is out of range"),

    "missing rootfs": (missing_rootfs, "no-such-rootfs"),
    "invalid JSON": (invalid_json, "config.json"),
    "unknown namespace": (unknown_namespace, "bogus"),
    "mount escaping the rootfs": (escaping_mount, "/escape/x"),
    "missing program": (missing_program, "/no/such/program"),
    "missing bind source": (bad_mount_source, "no-such-source"),
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("command", ["create", "run"])
def test_a_bad_bundle_fails_cleanly(lab: RuntimeLab, case: str, command: str) -> None:
    breaks, named = CASES[case]
    runtime = lab.runtime("berth-runtime")
    bundle = lab.bundle(["true"])
    breaks(lab, bundle)
    log = lab.base / "runtime.log"
    result = runtime.run("--log", str(log), "--log-format", "json", command, "--bundle", str(bundle), "bad",
                         check=False)
    assert result.returncode != 0
    assert result.stderr.startswith("berth-runtime: ")
    assert named in result.stderr
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert [line["level"] for line in lines] == ["error"]
    assert named in lines[0]["msg"]
    assert lines[0]["time"]
    assert runtime.container_ids() == []
    assert lab.cgroup_leftovers() == []
    assert lab.mount_leftovers() == []
    assert lab.process_leftovers() == []
    assert list((lab.base / "outside").rglob("*")) in ([], [lab.base / "outside" / "x"])


def test_errors_in_text_format(lab: RuntimeLab) -> None:
    runtime = lab.runtime("berth-runtime")
    log = lab.base / "runtime.log"
    result = runtime.run("--log", str(log), "start", "nope", check=False)
    assert result.returncode != 0
    assert "nope" in result.stderr
    assert log.read_text().startswith('time="')
    assert "level=error" in log.read_text()


def test_a_failing_prestart_hook_leaves_nothing(lab: RuntimeLab) -> None:
    spec: dict[str, Any] = base_spec()
    spec["hooks"] = {"prestart": [{"path": "/bin/false"}]}
    runtime = lab.runtime("berth-runtime")
    result = runtime.run("run", "--bundle", str(lab.bundle(["true"], spec)), "hooked", check=False)
    assert result.returncode != 0
    assert "prestart" in result.stderr
    assert runtime.container_ids() == []
    assert lab.cgroup_leftovers() == []
