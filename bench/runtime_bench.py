"""berth-runtime against runc, whole processes, side by side in one run.

    python3 bench/runtime_bench.py [--runs 20]

For each runtime, on the same busybox bundle running ``true``: ``run`` (one command: create, start,
wait, delete; issue #6's measure, target at most 1.5x runc), ``--version`` (the start-up floor), and
``create`` + ``start`` + (its ``true`` exits) + ``delete`` as three separate commands, the way
containerd's shim calls them. Runs alternate between the runtimes, each after a pause (``--gap``,
0.1 s): the first cgroup migration after a quiet spell waits for an RCU grace period (5-20 ms here), and
a run right after another would find it already passed. Medians and the ratios are printed and written
to bench/results/. Needs root. Every container is deleted at the end.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from runtime_fixture import make_rootfs  # the tests' busybox rootfs

from berth.runtimes.runc.plugin import find_binary


def timed(argv: list[str], gap: float = 0.0) -> float:
    time.sleep(gap)
    started = time.perf_counter()
    with tempfile.TemporaryFile() as out:  # create's container keeps its stdio: no pipes
        code = subprocess.run(argv, stdout=out, stderr=out, stdin=subprocess.DEVNULL, check=False).returncode
        if code != 0:
            out.seek(0)
            raise SystemExit(f"{argv} failed: {out.read().decode(errors='replace')}")
    return time.perf_counter() - started


def lifecycle(binary: str, root: Path, bundle: Path, container_id: str, gap: float) -> float:
    base = [binary, "--root", str(root)]
    total = timed([*base, "create", "--bundle", str(bundle), container_id], gap)
    total += timed([*base, "start", container_id])
    deadline = time.monotonic() + 10
    while json.loads(subprocess.run([*base, "state", container_id], capture_output=True, check=True).stdout
                     )["status"] != "stopped":
        if time.monotonic() > deadline:
            raise SystemExit(f"{container_id} did not stop")
        time.sleep(0.005)
    return total + timed([*base, "delete", container_id])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--gap", type=float, default=0.1, help="seconds of quiet before each timed run")
    args = parser.parse_args()
    runtimes = {"runc": shutil.which("runc"), "berth-runtime": find_binary("berth-runtime")}
    if None in runtimes.values():
        raise SystemExit(f"not installed: {[name for name, path in runtimes.items() if path is None]}")
    work = Path(tempfile.mkdtemp(prefix="berth-runtime-bench-"))
    try:
        make_rootfs(work / "rootfs")
        subprocess.run([str(runtimes["runc"]), "spec", "--bundle", str(work)], check=True)
        spec = json.loads((work / "config.json").read_text())
        spec["process"].update(terminal=False, args=["true"])
        (work / "config.json").write_text(json.dumps(spec))
        run: dict[str, list[float]] = {name: [] for name in runtimes}
        version: dict[str, list[float]] = {name: [] for name in runtimes}
        cycle: dict[str, list[float]] = {name: [] for name in runtimes}
        for i in range(args.runs):
            for name, binary in runtimes.items():
                assert binary is not None
                run[name].append(timed([binary, "--root", str(work / f"{name}-root"), "run", "--bundle", str(work),
                                        f"run{i}"], args.gap))
                version[name].append(timed([binary, "--version"]))
                cycle[name].append(lifecycle(binary, work / f"{name}-root", work, f"bench{i}", args.gap))
        results = {}
        for name in runtimes:
            results[name] = {"run_ms": statistics.median(run[name]) * 1000,
                             "version_ms": statistics.median(version[name]) * 1000,
                             "create_start_delete_ms": statistics.median(cycle[name]) * 1000}
            print(f"{name:14} run {results[name]['run_ms']:6.1f} ms   --version {results[name]['version_ms']:6.1f} ms"
                  f"   create+start+delete {results[name]['create_start_delete_ms']:6.1f} ms")
        ratios = {key: results["berth-runtime"][key] / results["runc"][key]
                  for key in ("run_ms", "create_start_delete_ms")}
        print(f"berth-runtime / runc: run {ratios['run_ms']:.2f}x (target 1.5x), "
              f"create+start+delete {ratios['create_start_delete_ms']:.2f}x")
        out = Path(__file__).parent / "results" / f"runtime-{time.strftime('%Y%m%d-%H%M%S')}.json"
        out.write_text(json.dumps({"runs": args.runs, **results, "ratios": ratios}, indent=2))
        print(f"results: {out}")
    finally:
        for name, binary in runtimes.items():
            root = work / f"{name}-root"
            if binary is not None and root.is_dir():
                listed = subprocess.run([binary, "--root", str(root), "list", "-q"], capture_output=True, text=True)
                for container_id in listed.stdout.split():
                    subprocess.run([binary, "--root", str(root), "delete", "--force", container_id],
                                   capture_output=True)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
