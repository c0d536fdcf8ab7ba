"""Layer apply speed: berth's differ against ``tar -xzf`` on the same generated gzip layers.

    python3 bench/differ_bench.py [--repeats 5] [--layers 6] [--files 2000] [--big 6] [--big-mib 10]

Builds ``--layers`` reproducible gzip layers (many small text files in nested directories plus a few big
half-random files each; see ``tests/layer_corpus.generated_tree``), then, ``--repeats`` times and
alternating the contenders so load on the shared machine hits both alike:

* **berth overlay**: every layer applied in order with ``WalkingDiffer.apply_stream`` straight into its own
  upperdir (overlay mounts with the earlier layers as lowerdirs, as the overlayfs snapshotter gives),
  the blob streamed from memory in 64 KiB chunks as a download would;
* **berth plain**: the same into one directory (a bind mount, as the native snapshotter gives);
* **tar -xzf**: GNU tar extracting every layer into its own directory (``--same-owner -p``).

Every run starts after ``sync`` with empty target directories; the figure is the wall time for all
layers. The contenders' order rotates from one repeat to the next. Medians are printed and the JSON goes
to bench/results/. Needs root (ownership, whiteouts). ``--dir /dev/shm`` measures CPU cost alone; on this
machine's ext4 (``discard``) a few hundred MiB of small files saturate the disk after the first run, and
every contender then takes the disk's time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from layer_corpus import build_layer, compress, generated_tree

from berth.core.oci import OCI_LAYER_GZIP
from berth.core.snapshots.snapshotter import Mount
from berth.plugins.differ.walking import WalkingDiffer

CHUNK = 64 << 10


async def _chunks(blob: bytes) -> AsyncIterator[bytes]:
    for offset in range(0, len(blob), CHUNK):
        yield blob[offset:offset + CHUNK]


def make_layers(args: argparse.Namespace) -> list[bytes]:
    layers = []
    for index in range(args.layers):
        entries = generated_tree(index, files=args.files, big_files=args.big, big_size=args.big_mib << 20,
                                 prefix=f"l{index}/")
        layers.append(compress(build_layer(entries), "gzip"))
    return layers


def run_berth(layers: list[bytes], work: Path, overlay: bool) -> float:
    differ = WalkingDiffer()
    uppers = []
    for index in range(len(layers)):
        upper = work / f"u{index}"
        upper.mkdir()
        uppers.append(upper)
    (work / "w").mkdir()

    async def main() -> None:
        for index, blob in enumerate(layers):
            if overlay and index:
                lowers = ":".join(str(u) for u in reversed(uppers[:index]))
                mounts = [Mount(type="overlay", source="overlay",
                                options=("index=off", f"workdir={work / 'w'}", f"upperdir={uppers[index]}",
                                         f"lowerdir={lowers}"))]
            else:
                mounts = [Mount(type="bind", source=str(uppers[index if overlay else 0]), options=("rbind", "rw"))]
            await differ.apply_stream(mounts, OCI_LAYER_GZIP, _chunks(blob))

    start = time.perf_counter()
    trio.run(main)
    return time.perf_counter() - start


def run_tar(paths: list[Path], work: Path) -> float:
    start = time.perf_counter()
    for index, path in enumerate(paths):
        target = work / f"t{index}"
        target.mkdir()
        subprocess.run(["tar", "-xzf", str(path), "-C", str(target), "--same-owner", "-p"], check=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--files", type=int, default=2000, help="small files per layer")
    parser.add_argument("--big", type=int, default=6, help="big files per layer")
    parser.add_argument("--big-mib", type=int, default=10)
    parser.add_argument("--dir", default="/var/tmp", help="where layers are extracted (the disk under test)")
    parser.add_argument("--output", default="")
    args = parser.parse_args()

    layers = make_layers(args)
    compressed = sum(len(blob) for blob in layers)
    top = Path(tempfile.mkdtemp(prefix="differ-bench-", dir=args.dir))
    results: dict[str, list[float]] = {"berth overlay": [], "berth plain": [], "tar -xzf": []}
    try:
        paths = []
        for index, blob in enumerate(layers):
            path = top / f"layer{index}.tar.gz"
            path.write_bytes(blob)
            paths.append(path)
        uncompressed = sum(len(build_layer(generated_tree(i, files=args.files, big_files=args.big,
                                                          big_size=args.big_mib << 20, prefix=f"l{i}/")))
                           for i in range(args.layers))
        print(f"{args.layers} layers: {compressed / 2**20:.0f} MiB gzip, {uncompressed / 2**20:.0f} MiB tar, "
              f"{args.layers * (args.files + args.big)} files")
        names = list(results)
        for repeat in range(args.repeats):
            for name in names[repeat % 3:] + names[:repeat % 3]:  # rotated: no contender always goes first
                work = top / "work"
                work.mkdir()
                subprocess.run(["sync"], check=True)
                if name == "tar -xzf":
                    elapsed = run_tar(paths, work)
                else:
                    elapsed = run_berth(layers, work, overlay=name == "berth overlay")
                results[name].append(elapsed)
                shutil.rmtree(work)
                print(f"  run {repeat + 1} {name:14} {elapsed:6.2f} s")
    finally:
        shutil.rmtree(top, ignore_errors=True)
    medians = {name: statistics.median(times) for name, times in results.items()}
    print("\nmedians:")
    for name, value in medians.items():
        print(f"  {name:14} {value:6.2f} s   ({value / medians['tar -xzf']:.2f}x tar)")
    output = Path(args.output) if args.output else \
        Path(__file__).parent / "results" / f"differ-{time.strftime('%Y%m%d-%H%M%S')}.json"
    output.parent.mkdir(exist_ok=True)
    output.write_text(json.dumps({
        "settings": vars(args), "compressed_bytes": compressed, "uncompressed_bytes": uncompressed,
        "runs": results, "medians": medians, "load_average": os.getloadavg(), "machine": platform.node(),
        "git": subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent).stdout.strip(),
    }, indent=2))
    print(f"\nJSON: {output}")


if __name__ == "__main__":
    main()
