"""Running containers, side by side with containerd: ``berth run`` against ``ctr run``, and what the
supervising shims cost in memory.

    python3 bench/run_bench.py [--runs 20] [--containers 10]

1. ``berth run --rm IMAGE ID echo hi`` as a whole CLI process (warm command server, warm group shim),
   and ``ctr run --rm IMAGE ID echo hi`` against a private containerd (Debian's 1.6, runc), both on
   the same locally built busybox image, alternating run by run. Also berth's first run, which starts
   its shim. Medians over ``--runs``.
2. ``--containers`` detached ``sleep`` containers in each, then the RSS and PSS (``smaps_rollup``) of
   the processes that supervise them: berth's group shim (one per namespace by default) against
   containerd's ``containerd-shim-runc-v2`` processes (one per container), per container.

JSON to bench/results/. Needs root. Everything started here is stopped by PID at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

from peers import start_containerd, start_daemon, stop_daemon  # bench/peers.py, beside this script

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from imagebuild import busybox_image, write_oci_archive

from berth.client.sync import Client

IMAGE = "localhost/busybox:latest"
BERTH = str(Path(sysconfig.get_path("scripts")) / "berth")


def timed(argv: list[str], env: dict[str, str] | None = None) -> float:
    started = time.perf_counter()
    result = subprocess.run(argv, capture_output=True, env=env, check=False)
    elapsed = time.perf_counter() - started
    if result.returncode != 0 or result.stdout.strip() != b"hi":
        raise SystemExit(f"{argv} failed ({result.returncode}): {result.stdout!r} {result.stderr!r}")
    return elapsed


def memory(pid: int) -> tuple[int, int]:
    """(RSS, PSS) of ``pid`` in KiB."""
    values = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        parts = line.split()
        if parts and parts[0] in ("Rss:", "Pss:"):
            values[parts[0]] = int(parts[1])
    return values["Rss:"], values["Pss:"]


def processes_with(words: list[str]) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if all(any(word.encode() in part for part in cmdline) for word in words):
            found.append(int(entry.name))
    return found


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--containers", type=int, default=10)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="berth-run-bench-"))
    archive = write_oci_archive(work / "busybox.tar", {IMAGE: busybox_image()})
    berthd, address = start_daemon(work / "berth")
    env = {**os.environ, "BERTH_ADDRESS": address}
    peer = start_containerd(work)
    results: dict[str, object] = {"runs": args.runs, "containers": args.containers}
    try:
        subprocess.run([BERTH, "images", "import", str(archive)], env=env, check=True, stdout=subprocess.DEVNULL)
        results["berth_first_run_s"] = timed([BERTH, "run", "--rm", IMAGE, "first", "echo", "hi"], env)
        berth_runs: list[float] = []
        ctr_runs: list[float] = []
        ctr = None
        if peer is not None:
            ctr = ["ctr", "--address", peer[1]]
            subprocess.run([*ctr, "images", "import", "--snapshotter", "overlayfs", str(archive)], check=True,
                           stdout=subprocess.DEVNULL)
            timed([*ctr, "run", "--rm", IMAGE, "warm", "echo", "hi"])
        for i in range(args.runs):
            berth_runs.append(timed([BERTH, "run", "--rm", IMAGE, f"b{i}", "echo", "hi"], env))
            if ctr is not None:
                ctr_runs.append(timed([*ctr, "run", "--rm", IMAGE, f"c{i}", "echo", "hi"]))
        results["berth_run_median_s"] = statistics.median(berth_runs)
        print(f"berth run --rm (warm shim): median {statistics.median(berth_runs) * 1000:.0f} ms "
              f"(first run, starting the shim: {results['berth_first_run_s'] * 1000:.0f} ms)")
        if ctr_runs:
            results["ctr_run_median_s"] = statistics.median(ctr_runs)
            print(f"ctr run --rm:               median {statistics.median(ctr_runs) * 1000:.0f} ms "
                  f"-> berth/containerd = {statistics.median(berth_runs) / statistics.median(ctr_runs):.2f}x")

        for i in range(args.containers):
            subprocess.run([BERTH, "run", "-d", IMAGE, f"s{i}", "sleep", "600"], env=env, check=True,
                           stdout=subprocess.DEVNULL)
        shims = processes_with(["berth.runtimes.shim", str(work / "berth" / "state")])
        rss, pss = (sum(values) for values in zip(*(memory(pid) for pid in shims), strict=True))
        results["berth_shims"] = {"processes": len(shims), "rss_kib": rss, "pss_kib": pss}
        print(f"berth: {len(shims)} shim process(es) for {args.containers} containers: RSS {rss / 1024:.1f} MiB, "
              f"PSS {pss / 1024:.1f} MiB = {rss / 1024 / args.containers:.2f} / "
              f"{pss / 1024 / args.containers:.2f} MiB per container")
        if ctr is not None and peer is not None:
            for i in range(args.containers):
                subprocess.run([*ctr, "run", "-d", IMAGE, f"s{i}", "sleep", "600"], check=True,
                               stdout=subprocess.DEVNULL)
            shims = processes_with(["containerd-shim-runc-v2", peer[1]])
            rss, pss = (sum(values) for values in zip(*(memory(pid) for pid in shims), strict=True))
            results["containerd_shims"] = {"processes": len(shims), "rss_kib": rss, "pss_kib": pss}
            print(f"containerd: {len(shims)} shim processes for {args.containers} containers: RSS "
                  f"{rss / 1024:.1f} MiB, PSS {pss / 1024:.1f} MiB = {rss / 1024 / args.containers:.2f} / "
                  f"{pss / 1024 / args.containers:.2f} MiB per container")
    finally:
        client = Client(address)
        for i in range(args.containers):
            subprocess.run([BERTH, "tasks", "rm", "-f", f"s{i}"], env=env, capture_output=True, check=False)
            subprocess.run([BERTH, "containers", "rm", f"s{i}"], env=env, capture_output=True, check=False)
        client.close()
        stop_daemon(berthd, address)
        if peer is not None:
            for i in range(args.containers):
                subprocess.run(["ctr", "--address", peer[1], "tasks", "kill", "-s", "9", f"s{i}"],
                               capture_output=True, check=False)
            time.sleep(0.5)
            for i in range(args.containers):
                subprocess.run(["ctr", "--address", peer[1], "tasks", "rm", f"s{i}"], capture_output=True,
                               check=False)
                subprocess.run(["ctr", "--address", peer[1], "containers", "rm", f"s{i}"], capture_output=True,
                               check=False)
            peer[0].send_signal(signal.SIGTERM)
            peer[0].wait(timeout=30)
        subprocess.run(["umount", "-R", str(work / "containerd" / "root")], capture_output=True, check=False)
        shutil.rmtree(work, ignore_errors=True)
    out = Path(__file__).parent / "results" / f"run-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(results, indent=2))
    print(f"results: {out}")


if __name__ == "__main__":
    main()
