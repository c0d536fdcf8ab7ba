"""What the benchmarks start: berthd itself, and the peers they run side by side with berth (a private
containerd, Debian's package)."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from berth.client.sync import Client


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


def start_daemon(work: Path, config: str = "version = 1\n") -> tuple[subprocess.Popen[bytes], str]:
    """A berthd on ``work`` (root, state, config) with a short socket path; returns it and its address."""
    work.mkdir(parents=True, exist_ok=True)
    sock_dir = Path(tempfile.mkdtemp(prefix="b"))
    address = str(sock_dir / "s.sock")
    (work / "config.toml").write_text(config)
    proc = subprocess.Popen([sys.executable, "-m", "berth.plugins.berthd", "--config", str(work / "config.toml"),
                             "--root", str(work / "root"), "--state", str(work / "state"), "--address", address,
                             "--log-level", "warn"])
    for _ in range(200):
        try:
            Client(address, timeout=2).version()
            return proc, address
        except Exception:
            time.sleep(0.05)
    proc.kill()
    raise SystemExit("berthd did not start")


def stop_daemon(proc: subprocess.Popen[bytes], address: str) -> None:
    """SIGTERM the daemon (SIGKILL after 15 s) and remove its socket directory."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    shutil.rmtree(Path(address).parent, ignore_errors=True)
