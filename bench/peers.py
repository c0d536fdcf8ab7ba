"""Peers the benchmarks run side by side with berth: a private containerd (Debian's package)."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path


def start_containerd(work: Path) -> tuple[subprocess.Popen[bytes], str] | None:
    """A private containerd (own root, state and socket) for the side-by-side figures, or None."""
    if shutil.which("containerd") is None or shutil.which("ctr") is None:
        return None
    root = work / "containerd"
    address = str(root / "containerd.sock")
    (root).mkdir()
    (root / "config.toml").write_text(
        f'version = 2\nroot = "{root}/root"\nstate = "{root}/state"\n'
        f'disabled_plugins = ["io.containerd.grpc.v1.cri"]\n[grpc]\naddress = "{address}"\n')
    proc = subprocess.Popen(["containerd", "--config", str(root / "config.toml")], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if subprocess.run(["ctr", "--address", address, "version"], capture_output=True).returncode == 0:
            return proc, address
        time.sleep(0.1)
    proc.kill()
    proc.wait()
    return None
