"""Running containers, side by side with containerd: ``berth run`` against ``ctr run``, and what the
supervising shims cost in memory.

    python3 bench/run_bench.py [--runs 20] [--containers 20] [--rounds 3]

1. ``berth run --rm IMAGE ID /bin/true`` as a whole CLI process (warm command server, warm group
   shim) and ``ctr run --rm IMAGE ID /bin/true`` against a private containerd (Debian's 1.6, runc),
   both on the same locally built busybox image, alternating run by run. Also berth's first run,
   which starts its shim. Medians over ``--runs``.
2. The daemons' RSS, idle.
3. ``--containers`` (20) detached ``sleep`` containers started at once (concurrent CLI processes) in
   each; the RSS and PSS (``smaps_rollup``) of what supervises them (berth's group shim against
   containerd's ``containerd-shim-runc-v2`` per container) and of the daemons; then all removed at once.
   ``--rounds`` (3) times, which peer goes first swapped every round; medians.

JSON to bench/results/. Needs root. Everything started here is stopped by PID at the end.
"""

from __future__ import annotations

import argparse
import contextlib
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

IMAGE = "localhost/busybox:latest"
BERTH = str(Path(sysconfig.get_path("scripts")) / "berth")


def timed(argv: list[str], env: dict[str, str] | None = None, expect: bytes = b"hi") -> float:
    started = time.perf_counter()
    result = subprocess.run(argv, capture_output=True, env=env, check=False)
    elapsed = time.perf_counter() - started
    if result.returncode != 0 or result.stdout.strip() != expect:
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


def at_once(commands: list[list[str]], env: dict[str, str] | None = None) -> float:
    """Start every command at the same moment; return the seconds until the last one ended."""
    started = time.perf_counter()
    procs = [subprocess.Popen(c, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env) for c in commands]
    for proc, command in zip(procs, commands, strict=True):
        _, err = proc.communicate()
        if proc.returncode != 0:
            raise SystemExit(f"{command} failed: {err.decode(errors='replace')}")
    return time.perf_counter() - started


def supervision(pids: list[int], containers: int) -> dict[str, float]:
    rss, pss = (sum(values) for values in zip(*(memory(pid) for pid in pids), strict=True))
    return {"processes": len(pids), "rss_mib": rss / 1024, "pss_mib": pss / 1024,
            "rss_per_container_mib": rss / 1024 / containers, "pss_per_container_mib": pss / 1024 / containers}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--containers", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3, help="bursts of --containers started and removed")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="berth-run-bench-"))
    #: The namespaces' parent cgroups the runtimes leave (containerd's /default, berth's /berth/default).
    parents = [h / name for h in Path("/sys/fs/cgroup").iterdir() for name in ("default", "berth/default", "berth")]
    existing = {p for p in parents if p.is_dir()}
    archive = write_oci_archive(work / "busybox.tar", {IMAGE: busybox_image()})
    berthd, address = start_daemon(work / "berth")
    env = {**os.environ, "BERTH_ADDRESS": address}
    peer = start_containerd(work)
    ctr = ["ctr", "--address", peer[1]] if peer is not None else None
    n = args.containers
    results: dict[str, object] = {"runs": args.runs, "containers": n}
    try:
        subprocess.run([BERTH, "images", "import", str(archive)], env=env, check=True, stdout=subprocess.DEVNULL)
        results["berth_first_run_s"] = timed([BERTH, "run", "--rm", IMAGE, "first", "echo", "hi"], env)
        if ctr is not None:
            subprocess.run([*ctr, "images", "import", "--snapshotter", "overlayfs", str(archive)], check=True,
                           stdout=subprocess.DEVNULL)
            timed([*ctr, "run", "--rm", IMAGE, "warm", "echo", "hi"])

        # 1. one container, /bin/true, run and removed, as a whole CLI process
        single: dict[str, list[float]] = {"berth": [], "containerd": []}
        for i in range(args.runs):
            single["berth"].append(timed([BERTH, "run", "--rm", IMAGE, f"b{i}", "/bin/true"], env, expect=b""))
            if ctr is not None:
                single["containerd"].append(timed([*ctr, "run", "--rm", IMAGE, f"c{i}", "/bin/true"], expect=b""))
        report(results, "run --rm /bin/true", {k: statistics.median(v) for k, v in single.items() if v})

        # 2. the daemons' own memory, idle
        results["berthd_idle_rss_mib"] = memory(berthd.pid)[0] / 1024
        if peer is not None:
            results["containerd_idle_rss_mib"] = memory(peer[0].pid)[0] / 1024

        # 3. n containers started detached at once, their supervision's memory, the daemons' RSS, removal;
        # --rounds times, the peers' order swapped every round (a single burst says little on this machine)
        starts: dict[str, list[float]] = {"berth": [], "containerd": []}
        removals: dict[str, list[float]] = {"berth": [], "containerd": []}
        cli = {"berth": BERTH, "containerd": " ".join(ctr or [])}
        for round_ in range(args.rounds):
            order = ["berth", "containerd"] if ctr is not None else ["berth"]
            if round_ % 2:
                order.reverse()
            for who in order:
                start = [BERTH] if who == "berth" else list(ctr or [])
                starts[who].append(at_once([[*start, "run", "-d", IMAGE, f"s{i}", "sleep", "600"] for i in range(n)],
                                           env if who == "berth" else None))
            if round_ == 0:
                measure_supervision(results, n, berthd, work, peer)
            time.sleep(0.5)
            for who in order:
                removals[who].append(at_once(
                    [["sh", "-c", f"{cli[who]} tasks rm -f s{i} && {cli[who]} containers rm s{i}"] for i in range(n)],
                    env if who == "berth" else None))
            time.sleep(0.5)
        results[f"{n} started at once, every round"] = starts
        results[f"{n} removed at once, every round"] = removals
        report(results, f"{n} started at once", {k: statistics.median(v) for k, v in starts.items() if v})
        report(results, f"{n} removed at once", {k: statistics.median(v) for k, v in removals.items() if v})
        for what, rounds in (("started", starts), ("removed", removals)):
            print(f"  {what}, each round: " + "; ".join(
                f"{who} " + " ".join(f"{t * 1000:.0f}" for t in times) for who, times in rounds.items() if times))
    finally:
        for i in range(n):
            subprocess.run([BERTH, "tasks", "rm", "-f", f"s{i}"], env=env, capture_output=True, check=False)
            subprocess.run([BERTH, "containers", "rm", f"s{i}"], env=env, capture_output=True, check=False)
        stop_daemon(berthd, address)
        if peer is not None:
            for i in range(n):
                subprocess.run(["ctr", "--address", peer[1], "tasks", "rm", "-f", f"s{i}"], capture_output=True,
                               check=False)
                subprocess.run(["ctr", "--address", peer[1], "containers", "rm", f"s{i}"], capture_output=True,
                               check=False)
            peer[0].send_signal(signal.SIGTERM)
            peer[0].wait(timeout=30)
        subprocess.run(["umount", "-R", str(work / "containerd" / "root")], capture_output=True, check=False)
        for parent in parents:
            if parent not in existing:
                with contextlib.suppress(OSError):
                    parent.rmdir()
        shutil.rmtree(work, ignore_errors=True)
    out = Path(__file__).parent / "results" / f"run-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(results, indent=2))
    print(f"results: {out}")


def measure_supervision(results: dict[str, object], n: int, berthd: subprocess.Popen[bytes], work: Path,
                        peer: tuple[subprocess.Popen[bytes], str] | None) -> None:
    """The RSS and PSS of what supervises the ``n`` running containers, and the daemons' RSS."""
    shims = processes_with(["berth.runtimes.shim", str(work / "berth" / "state")])
    results["berth_supervision"] = supervision(shims, n)
    results["berthd_rss_with_containers_mib"] = memory(berthd.pid)[0] / 1024
    if peer is not None:
        results["containerd_supervision"] = supervision(processes_with(["containerd-shim-runc-v2", peer[1]]), n)
        results["containerd_rss_with_containers_mib"] = memory(peer[0].pid)[0] / 1024
    for who in ("berth", "containerd"):
        data = results.get(f"{who}_supervision")
        if isinstance(data, dict):
            print(f"{who:10} supervision of {n}: {data['processes']} process(es), RSS {data['rss_mib']:.1f} MiB, "
                  f"PSS {data['pss_mib']:.1f} MiB = {data['rss_per_container_mib']:.2f} / "
                  f"{data['pss_per_container_mib']:.2f} MiB per container")
    print(f"daemon RSS idle / with {n}: berthd {results['berthd_idle_rss_mib']:.0f} / "
          f"{results['berthd_rss_with_containers_mib']:.0f} MiB"
          + (f", containerd {results['containerd_idle_rss_mib']:.0f} / "
             f"{results['containerd_rss_with_containers_mib']:.0f} MiB" if peer is not None else ""))


def report(results: dict[str, object], what: str, seconds: dict[str, float]) -> None:
    results[what] = seconds
    line = f"{what}: berth {seconds['berth'] * 1000:.0f} ms"
    if "containerd" in seconds:
        line += f", containerd {seconds['containerd'] * 1000:.0f} ms -> {seconds['berth'] / seconds['containerd']:.2f}x"
    print(line)


if __name__ == "__main__":
    main()
