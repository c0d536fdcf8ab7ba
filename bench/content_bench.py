"""Ingest throughput of one large blob: through berthd's RPC, into the local store directly, and
``sha256sum`` of the same file (the floor: every path must hash every byte).

    python3 bench/content_bench.py [--size-mib 1024] [--repeats 3] [--chunk-mib 1] [--window 4]

Each path is run ``--repeats`` times, interleaved, on a fresh blob (random bytes written to a temp
file first, so the page cache holds it for every path). Reports median seconds, MiB/s and the ratio
to sha256sum; writes JSON to bench/results/. Target (issue [store]): the RPC path within 1.5x of
sha256sum.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trio

from berth.client.aio import open_client
from berth.core.namespaces import with_namespace
from berth.plugins.content.local.store import LocalStore

MIB = 1 << 20


def make_blob(path: Path, size: int) -> None:
    with path.open("wb") as f:
        remaining = size
        while remaining:
            chunk = os.urandom(min(remaining, 16 * MIB))
            f.write(chunk)
            remaining -= len(chunk)


def time_sha256sum(path: Path) -> float:
    started = time.perf_counter()
    subprocess.run(["sha256sum", str(path)], check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


async def ingest_rpc(address: str, path: Path, ref: str, chunk: int, window: int) -> float:
    """Stat, pipelined writes (``window`` in flight), commit; returns seconds."""
    async with open_client(address) as client:
        started = time.perf_counter()
        await client.call("content.write", {"action": "stat", "ref": ref})
        slots = trio.Semaphore(window)
        offset = 0
        async with trio.open_nursery() as nursery:
            with path.open("rb") as f:
                while data := await trio.to_thread.run_sync(f.read, chunk):
                    await slots.acquire()

                    async def send(at: int = offset, payload: bytes = data) -> None:
                        try:
                            await client.call("content.write",
                                              {"action": "write", "ref": ref, "offset": at, "data": payload})
                        finally:
                            slots.release()

                    nursery.start_soon(send)
                    offset += len(data)
        await client.call("content.write", {"action": "commit", "ref": ref, "total": offset})
        elapsed = time.perf_counter() - started
        await client.call("content.delete", {"digest": (await client.call(
            "content.list", {}))["infos"][0]["digest"]})
        return elapsed


async def ingest_direct(root: Path, path: Path, ref: str, chunk: int) -> float:
    store = LocalStore(root)
    started = time.perf_counter()
    writer = await store.writer(ref)
    with path.open("rb") as f:
        while data := await trio.to_thread.run_sync(f.read, chunk):
            await writer.write(data)
    await writer.commit()
    elapsed = time.perf_counter() - started
    await store.delete(writer.digest())
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--chunk-mib", type=int, default=1)
    parser.add_argument("--window", type=int, default=4)
    args = parser.parse_args()
    size = args.size_mib * MIB
    work = Path(tempfile.mkdtemp(prefix="berth-bench-"))
    socket_dir = Path(tempfile.mkdtemp(prefix="b"))
    address = str(socket_dir / "s.sock")
    blob = work / "blob"
    print(f"writing a {args.size_mib} MiB random blob ...", flush=True)
    make_blob(blob, size)
    daemon = subprocess.Popen([sys.executable, "-m", "berth.plugins.berthd", "--root", str(work / "root"),
                               "--state", str(work / "state"), "--address", address, "--log-level", "warn"])
    results: dict[str, list[float]] = {"sha256sum": [], "direct": [], "rpc": []}
    try:
        for _ in range(100):
            if os.path.exists(address):
                break
            time.sleep(0.1)
        for round_ in range(args.repeats):
            results["sha256sum"].append(time_sha256sum(blob))
            with with_namespace("default"):
                results["direct"].append(trio.run(ingest_direct, work / "direct", blob, f"direct-{round_}",
                                                  args.chunk_mib * MIB))
            results["rpc"].append(trio.run(ingest_rpc, address, blob, f"rpc-{round_}", args.chunk_mib * MIB,
                                           args.window))
    finally:
        daemon.send_signal(signal.SIGTERM)
        try:
            daemon.wait(timeout=15)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait()
        subprocess.run(["rm", "-rf", str(work), str(socket_dir)], check=False)
    floor = statistics.median(results["sha256sum"])
    print(f"\n{'path':<12}{'median s':>10}{'MiB/s':>10}{'x sha256sum':>13}")
    summary = {}
    for name, times in results.items():
        median = statistics.median(times)
        summary[name] = {"median_s": median, "mib_s": args.size_mib / median, "ratio": median / floor,
                         "runs": times}
        print(f"{name:<12}{median:>10.3f}{args.size_mib / median:>10.0f}{median / floor:>13.2f}")
    print(f"\ntarget: rpc within 1.5x of sha256sum -> {'met' if summary['rpc']['ratio'] <= 1.5 else 'NOT met'}")
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    (out / f"content-{time.strftime('%Y%m%d-%H%M%S')}.json").write_text(json.dumps(
        {"size_mib": args.size_mib, "chunk_mib": args.chunk_mib, "window": args.window, "results": summary},
        indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
