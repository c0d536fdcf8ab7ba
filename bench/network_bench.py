"""Attaching a container to a bridge: berth's network plugin against the same steps done with ``ip``.

    python3 bench/network_bench.py [--runs 100]

One attach is: a new network namespace (bind-mounted), a veth pair with one end in it as ``eth0``, the
host end on the bridge and up, ``lo`` up, an address, ``eth0`` up, the default route via the gateway.
berth does it with :meth:`BridgeNetworks.attach` (address allocation in its sqlite database included,
netlink through pyroute2 in a worker thread); the peer runs the iproute2 commands (``ip netns add``,
``ip link add ... type veth peer name eth0 netns``, ``ip link set ... master``, ``ip -n ... link/addr/route``).
Runs alternate; each attach is followed by its (untimed for ``ip``, timed for berth) detach. Medians and
the ratio are printed and written to bench/results/. Needs root; everything is removed at the end.
Traffic: none (nothing is sent).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import structlog
import trio

from berth.core.metadata.db import MetadataDB
from berth.core.network import NetworkRequest
from berth.plugins.network import netns, nft
from berth.plugins.network.bridge import BridgeNetworks
from berth.plugins.network.store import NetworkRecord, NetworkStore

SUBNET, GATEWAY, PREFIX = "10.123.250.0/24", "10.123.250.1", 24


def ip(*argv: str) -> None:
    subprocess.run(["ip", *argv], check=True, capture_output=True)


def ip_attach(bridge: str, name: str, veth: str, address: str) -> float:
    started = time.perf_counter()
    ip("netns", "add", name)
    ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", name)
    ip("link", "set", veth, "master", bridge, "mtu", "1500", "up")
    ip("-n", name, "link", "set", "lo", "up")
    ip("-n", name, "addr", "add", f"{address}/{PREFIX}", "dev", "eth0")
    ip("-n", name, "link", "set", "eth0", "up")
    ip("-n", name, "route", "add", "default", "via", GATEWAY)
    elapsed = time.perf_counter() - started
    ip("link", "del", veth)
    ip("netns", "del", name)
    return elapsed


async def run(runs: int, work: Path) -> dict[str, object]:
    bridge = f"bb{os.getpid() % 100000}"
    db = await MetadataDB.open(work / "meta.db")
    plugin = BridgeNetworks(NetworkStore(db), netns_dir=work / "netns", default=NetworkRecord(
        name="bridge", driver="bridge", subnet=SUBNET, gateway=GATEWAY, bridge=bridge, mtu=1500, nat=False))
    await plugin.start()
    attach: list[float] = []
    detach: list[float] = []
    peer: list[float] = []
    try:
        await plugin.attach("bench", "warm", NetworkRequest(mode="bridge"))  # the bridge and rules exist now
        await plugin.detach("bench", "warm")
        for i in range(runs):
            started = time.perf_counter()
            await plugin.attach("bench", f"c{i}", NetworkRequest(mode="bridge"))
            attach.append(time.perf_counter() - started)
            started = time.perf_counter()
            await plugin.detach("bench", f"c{i}")
            detach.append(time.perf_counter() - started)
            peer.append(await trio.to_thread.run_sync(ip_attach, bridge, f"bench{os.getpid()}-{i}", f"vp{i}",
                                                      "10.123.250.200"))
    finally:
        await plugin.reconcile([])
        await nft.forget_bridge(bridge)
        await nft.remove_table_if_unused()
        await trio.run_process(["ip", "link", "del", bridge], capture_stderr=True, check=False)
        for path in (work / "netns").glob("*/*"):
            netns.remove(path)
        await db.aclose()
    results = {"runs": runs, "berth_attach_ms": statistics.median(attach) * 1000,
               "berth_attach_p90_ms": sorted(attach)[int(runs * 0.9)] * 1000,
               "berth_detach_ms": statistics.median(detach) * 1000,
               "ip_attach_ms": statistics.median(peer) * 1000}
    results["ratio_ip_over_berth"] = results["ip_attach_ms"] / results["berth_attach_ms"]  # type: ignore[operator]
    return results


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=100)
    args = parser.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(30))  # warnings only
    work = Path(tempfile.mkdtemp(prefix="berth-network-bench-"))
    run_netns_was_there = Path("/run/netns").exists()
    try:
        results = trio.run(run, args.runs, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if not run_netns_was_there and not any(Path("/run/netns").iterdir()):
            # `ip netns add` made /run/netns (a mount of itself) and nobody else uses it: take it away again
            while subprocess.run(["umount", "/run/netns"], capture_output=True, check=False).returncode == 0:
                pass  # it may be mounted more than once
            with contextlib.suppress(OSError):
                Path("/run/netns").rmdir()
    print(f"berth attach   median {results['berth_attach_ms']:6.2f} ms  (p90 {results['berth_attach_p90_ms']:.2f} ms)"
          f"   detach {results['berth_detach_ms']:.2f} ms")
    print(f"ip commands    median {results['ip_attach_ms']:6.2f} ms")
    print(f"ip / berth: {results['ratio_ip_over_berth']:.2f}x  (target: berth under 20 ms)")
    out = Path(__file__).parent / "results" / f"network-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(results, indent=2))
    print(f"results: {out}")


if __name__ == "__main__":
    main()
