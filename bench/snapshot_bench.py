"""Snapshotter round trips and a 128-layer mount, through a real berthd.

    python3 bench/snapshot_bench.py [--repeats 20]

1. prepare + commit + remove as three ``berth snapshots`` CLI processes, per snapshotter (overlayfs,
   native, and btrfs on a loop device when available): through the launcher with its warm command
   server (client/cliserver.py) and with ``BERTH_CLI_SERVER=0`` (a full interpreter start-up per call),
   side by side with containerd's ``ctr snapshots prepare/commit/rm`` against a private containerd
   started here when Debian's containerd is installed (overlayfs and native; the figures measured
   earlier on this machine, 59/73/101 ms, stand in for what cannot be run).
2. the same three calls over one RPC connection (berth's own cost without process start-up).
3. a 128-layer overlayfs chain: time to Prepare on top of it and mount it (long lowerdir).

Medians over ``--repeats``; JSON to bench/results/. Needs root (real mounts).
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

from berth.client.sync import Client
from berth.core.snapshots.mount import mount_all, unmount_all
from berth.core.snapshots.snapshotter import Mount

CONTAINERD_MS = {"overlayfs": 59.0, "native": 73.0, "btrfs": 101.0}
LABELS = {"berth.io/gc.root": "bench"}


def cli_round_trip(berth: str, address: str, snapshotter: str, i: int, env: dict[str, str] | None = None) -> float:
    base = [berth, "--address", address, "snapshots", "--snapshotter", snapshotter]
    started = time.perf_counter()
    for args in (["prepare", "--label", "berth.io/gc.root=bench", f"a{i}"],
                 ["commit", "--label", "berth.io/gc.root=bench", f"c{i}", f"a{i}"], ["rm", f"c{i}"]):
        subprocess.run([*base, *args], check=True, stdout=subprocess.DEVNULL, env=env)
    return time.perf_counter() - started


def ctr_round_trip(address: str, snapshotter: str, i: int) -> float:
    base = ["ctr", "--address", address, "snapshots", "--snapshotter", snapshotter]
    started = time.perf_counter()
    for args in (["prepare", f"a{i}"], ["commit", f"c{i}", f"a{i}"], ["rm", f"c{i}"]):
        subprocess.run([*base, *args], check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def start_cli_server(python: str) -> tuple[int, dict[str, str], Path]:
    """The launcher's command server on a private socket; (its PID, the env that selects it, its dir)."""
    runtime = Path(tempfile.mkdtemp(prefix="berth-clibench-"))
    env = {**os.environ, "XDG_RUNTIME_DIR": str(runtime)}
    socket_path = runtime / "berth" / "cli.sock"
    subprocess.run([python, "-m", "berth.client.cliserver", str(socket_path)], env=env, check=True)
    deadline = time.monotonic() + 30
    while not (runtime / "berth" / "cli.pid").exists():
        if time.monotonic() > deadline:
            raise SystemExit("the command server did not start")
        time.sleep(0.05)
    return int((runtime / "berth" / "cli.pid").read_text()), env, runtime


def rpc_round_trip(client: Client, snapshotter: str, i: int) -> float:
    started = time.perf_counter()
    client.call("snapshots.prepare", {"snapshotter": snapshotter, "key": f"ra{i}", "labels": LABELS})
    client.call("snapshots.commit", {"snapshotter": snapshotter, "name": f"rc{i}", "key": f"ra{i}", "labels": LABELS})
    client.call("snapshots.remove", {"snapshotter": snapshotter, "key": f"rc{i}"})
    return time.perf_counter() - started


def layers_128(client: Client, work: Path) -> dict[str, float]:
    parent = ""
    for i in range(128):
        client.call("snapshots.prepare", {"key": f"l{i}-a", "parent": parent, "labels": LABELS})
        client.call("snapshots.commit", {"name": f"l{i}", "key": f"l{i}-a", "labels": LABELS})
        parent = f"l{i}"
    target = work / "mnt128"
    target.mkdir()
    started = time.perf_counter()
    mounts = [Mount.from_wire(m) for m in client.call(
        "snapshots.prepare", {"key": "top", "parent": parent, "labels": LABELS})["mounts"]]
    prepared = time.perf_counter()
    mount_all(mounts, target)
    mounted = time.perf_counter()
    unmount_all(target)
    return {"prepare_ms": (prepared - started) * 1000, "mount_ms": (mounted - prepared) * 1000,
            "lowerdir_bytes": len(",".join(mounts[0].options))}


def btrfs_loop(work: Path) -> tuple[str, str] | None:
    """Make a btrfs filesystem on a loop device; return (mountpoint, loop device) or None."""
    if shutil.which("mkfs.btrfs") is None:
        return None
    image = work / "btrfs.img"
    with image.open("wb") as f:
        f.truncate(1 << 30)
    loop = subprocess.run(["losetup", "--find", "--show", str(image)], capture_output=True, text=True)
    if loop.returncode:
        return None
    device = loop.stdout.strip()
    mountpoint = work / "btrfs"
    mountpoint.mkdir()
    subprocess.run(["mkfs.btrfs", "-q", device], check=True)
    subprocess.run(["mount", device, str(mountpoint)], check=True)
    return str(mountpoint), device


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root: snapshots mount filesystems")
    berth = str(Path(sysconfig.get_path("scripts")) / "berth")
    work = Path(tempfile.mkdtemp(prefix="berth-snapbench-"))
    loop = btrfs_loop(work)
    config = "version = 1\n"
    if loop:
        config += f'[plugins."io.berth.snapshotter.v1.btrfs"]\nroot_path = "{loop[0]}/sn"\n'
    proc, address = start_daemon(work, config)
    containerd = start_containerd(work)
    server_pid, server_env, server_dir = start_cli_server(sys.executable)
    cold_env = {**os.environ, "BERTH_CLI_SERVER": "0"}
    results: dict[str, object] = {}
    try:
        snapshotters = ["overlayfs", "native"] + (["btrfs"] if loop else [])
        client = Client(address, timeout=60)
        for name in snapshotters:
            warm = [cli_round_trip(berth, address, name, i, server_env) for i in range(args.repeats)]
            cold = [cli_round_trip(berth, address, name, i + args.repeats, cold_env) for i in range(args.repeats)]
            rpc = [rpc_round_trip(client, name, i) for i in range(args.repeats)]
            measured = containerd is not None and name != "btrfs"
            ctr = ([ctr_round_trip(containerd[1], name, i) for i in range(args.repeats)]  # type: ignore[index]
                   if measured else [CONTAINERD_MS[name] / 1000])
            results[name] = {"cli_ms": statistics.median(warm) * 1000,
                             "cli_no_server_ms": statistics.median(cold) * 1000,
                             "rpc_ms": statistics.median(rpc) * 1000,
                             "containerd_cli_ms": statistics.median(ctr) * 1000, "containerd_measured": measured}
        results["128_layers_overlayfs"] = layers_128(client, work)
        client.close()
    finally:
        os.kill(server_pid, signal.SIGTERM)
        shutil.rmtree(server_dir, ignore_errors=True)
        if containerd is not None:
            containerd[0].terminate()
            containerd[0].wait()
        stop_daemon(proc, address)
        if loop:
            subprocess.run(["umount", loop[0]], check=False)
            subprocess.run(["losetup", "-d", loop[1]], check=False)
        shutil.rmtree(work, ignore_errors=True)
    print(f"{'snapshotter':<12}{'berth CLI ms':>14}{'no server ms':>14}{'containerd ms':>15}{'ratio':>8}"
          f"{'berth RPC ms':>14}")
    for name, row in results.items():
        if isinstance(row, dict) and "cli_ms" in row:
            note = "" if row["containerd_measured"] else " (earlier figure)"
            print(f"{name:<12}{row['cli_ms']:>14.1f}{row['cli_no_server_ms']:>14.1f}{row['containerd_cli_ms']:>15.1f}"
                  f"{row['cli_ms'] / row['containerd_cli_ms']:>8.2f}{row['rpc_ms']:>14.2f}{note}")
    print("128 layers (overlayfs):", json.dumps(results["128_layers_overlayfs"]))
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    (out / f"snapshots-{time.strftime('%Y%m%d-%H%M%S')}.json").write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
