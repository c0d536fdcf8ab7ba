"""Pull + unpack of a ~200 MiB, 6-layer gzip image from a local registry: berth against containerd.

    python3 bench/pull_bench.py [--repeats 3] [--layers 6] [--files 2000] [--big 6] [--big-mib 10]

Builds a reproducible image (per layer: many small text files in nested directories and a few big
half-random files, see ``tests/layer_corpus.generated_tree``), pushes it with skopeo into Debian's
``docker-registry`` on 127.0.0.1, then, ``--repeats`` times and alternating the contenders:

* **berth**: ``images_pull(--plain-http)`` on a private berthd (overlayfs), then ``images rm --sync`` so the
  next run fetches and unpacks everything again;
* **containerd**: ``ctr images pull --plain-http`` on a private containerd (overlayfs, Debian's package),
  then ``ctr images rm --sync``.

Each run starts after ``sync``. Medians are printed with their ratio; the JSON goes to bench/results/.
Needs root, skopeo, docker-registry and (for the side-by-side figure) containerd.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from layer_corpus import build_layer, compress, generated_tree
from peers import start_containerd
from registry_fixture import start_registry

from berth.client.sync import Client
from berth.core.oci import OCI_CONFIG, OCI_LAYER_GZIP, OCI_MANIFEST


def write_layout(directory: Path, layers: list[tuple[bytes, bytes]]) -> None:
    """An OCI image layout with one image tagged ``v1``; ``layers`` are (tar, gzip) pairs."""
    blobs = directory / "blobs" / "sha256"
    blobs.mkdir(parents=True)

    def put(data: bytes) -> str:
        digest = hashlib.sha256(data).hexdigest()
        (blobs / digest).write_bytes(data)
        return f"sha256:{digest}"

    config = json.dumps({"architecture": "amd64", "os": "linux", "config": {},
                         "rootfs": {"type": "layers",
                                    "diff_ids": ["sha256:" + hashlib.sha256(tar).hexdigest() for tar, _ in layers]}
                         }).encode()
    manifest = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                           "config": {"mediaType": OCI_CONFIG, "digest": put(config), "size": len(config)},
                           "layers": [{"mediaType": OCI_LAYER_GZIP, "digest": put(blob), "size": len(blob)}
                                      for _, blob in layers]}).encode()
    index = {"schemaVersion": 2, "manifests": [{"mediaType": OCI_MANIFEST, "digest": put(manifest),
                                                "size": len(manifest),
                                                "annotations": {"org.opencontainers.image.ref.name": "v1"}}]}
    (directory / "index.json").write_text(json.dumps(index))
    (directory / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')


def start_berthd(work: Path) -> tuple[subprocess.Popen[bytes], str]:
    address = str(work / "berth.sock")
    (work / "berth.toml").write_text(f'version = 1\nroot = "{work}/berth-root"\nstate = "{work}/berth-state"\n'
                                     f'[rpc]\naddress = "{address}"\n')
    proc = subprocess.Popen([sys.executable, "-m", "berth.plugins.berthd", "--config", str(work / "berth.toml")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while not os.path.exists(address):
        if time.monotonic() > deadline:
            raise SystemExit("berthd did not start")
        time.sleep(0.05)
    return proc, address


def berth_pull(address: str, ref: str) -> float:
    with Client(address, timeout=600) as client:
        subprocess.run(["sync"], check=True)
        started = time.perf_counter()
        result = client.images_pull(ref, plain_http=True)
        elapsed = time.perf_counter() - started
        assert result["chain_id"], result
        client.images_delete(result["name"], sync=True)
    return elapsed


def containerd_pull(address: str, ref: str) -> float:
    subprocess.run(["sync"], check=True)
    started = time.perf_counter()
    subprocess.run(["ctr", "--address", address, "images", "pull", "--plain-http", ref], check=True,
                   stdout=subprocess.DEVNULL)
    elapsed = time.perf_counter() - started
    subprocess.run(["ctr", "--address", address, "images", "rm", "--sync", ref], check=True,
                   stdout=subprocess.DEVNULL)
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--files", type=int, default=2000)
    parser.add_argument("--big", type=int, default=6)
    parser.add_argument("--big-mib", type=int, default=10)
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root: unpacking mounts snapshots")
    work = Path(tempfile.mkdtemp(prefix="berth-pullbench-"))
    registry = berthd = containerd = None
    try:
        layers = []
        for index in range(args.layers):
            tar = build_layer(generated_tree(index, files=args.files, big_files=args.big,
                                             big_size=args.big_mib << 20, prefix=f"l{index}/"))
            layers.append((tar, compress(tar, "gzip")))
        compressed = sum(len(blob) for _, blob in layers)
        write_layout(work / "layout", layers)
        registry = start_registry(work / "registry")
        ref = registry.ref("bench", "v1")
        subprocess.run(["skopeo", "copy", "--dest-tls-verify=false", f"oci:{work / 'layout'}:v1", f"docker://{ref}"],
                       check=True, capture_output=True)
        berthd = start_berthd(work)
        containerd = start_containerd(work)
        berth_times, containerd_times = [], []
        for _ in range(args.repeats):
            berth_times.append(berth_pull(berthd[1], ref))
            if containerd is not None:
                containerd_times.append(containerd_pull(containerd[1], ref))
        results = {"compressed_mib": compressed / (1 << 20), "layers": args.layers,
                   "berth_s": statistics.median(berth_times), "berth_all": berth_times,
                   "containerd_s": statistics.median(containerd_times) if containerd_times else None,
                   "containerd_all": containerd_times}
    finally:
        for proc in (berthd, containerd):
            if proc is not None:
                proc[0].send_signal(signal.SIGTERM)
                proc[0].wait(60)
        if registry is not None:
            registry.stop()
        shutil.rmtree(work, ignore_errors=True)
    print(f"image: {results['compressed_mib']:.0f} MiB compressed, {args.layers} gzip layers")
    print(f"berth pull+unpack:      {results['berth_s']:.2f} s (median of {args.repeats})")
    if results["containerd_s"]:
        print(f"containerd pull+unpack: {results['containerd_s']:.2f} s")
        print(f"ratio berth/containerd: {results['berth_s'] / results['containerd_s']:.2f} (target <= 0.7)")
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    (out / f"pull-{time.strftime('%Y%m%d-%H%M%S')}.json").write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
