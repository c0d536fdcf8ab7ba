"""Benchmark berth's core: CLI start-up and msgpack-RPC round trips against a private berthd.

::

    python bench/core_bench.py            # full run (1-2 minutes on 2 cores)
    python bench/core_bench.py --quick    # smoke run (a few seconds)

Starts its own berthd in a temporary directory, measures, prints a table next to the targets,
writes ``bench/results/core-<timestamp>.json`` and stops the daemon. See ``bench/README.md`` for
how to read the numbers. It reports; it never fails on a slow number.
"""

from __future__ import annotations

import argparse
import array
import datetime as dt
import importlib.util
import json
import multiprocessing as mp
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack

from berth.client.sync import Client
from berth.core.errdefs import BerthError

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"

#: name -> (target, "lt" when lower is better / "gt" when higher is better, unit)
TARGETS: dict[str, tuple[float, str, str]] = {
    "berth_version_ms": (25.0, "lt", "ms"),
    "rpc_single_median_us": (150.0, "lt", "us"),
    "rpc_concurrent_total_rps": (15_000.0, "gt", "calls/s"),
}
CTR_VERSION_REFERENCE_MS = 14.0  # containerd's `ctr version` on the machine the targets were set on
CLEAN = "berth version, -S (no .pth hooks)"


#: A multiprocessing context (fork, spawn or forkserver); typeshed's BaseContext lacks ``Process``.
MPContext = Any


class BenchError(RuntimeError):
    """The benchmark could not run (the daemon did not start, a worker failed, ...)."""


# ---------------------------------------------------------------------------------------- statistics


def percentile(values: Sequence[float], p: float) -> float:
    """The ``p``-th percentile (0..100) with linear interpolation between closest ranks."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    if len(ordered) == 1:
        return float(ordered[0])
    rank = (len(ordered) - 1) * p / 100.0
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def summarize(values: Sequence[float]) -> dict[str, float]:
    return {"median": percentile(values, 50), "p10": percentile(values, 10), "p90": percentile(values, 90),
            "min": float(min(values)), "max": float(max(values)), "n": len(values)}


# ---------------------------------------------------------------------------------------- the daemon


@dataclass
class Daemon:
    pid: int
    address: str
    log_path: Path


def _wait_until_answering(proc: subprocess.Popen[bytes], address: str, log_path: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    last_error = "no attempt"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchError(f"berthd exited with status {proc.returncode}:\n{_tail(log_path)}")
        if os.path.exists(address):
            try:
                with Client(address, timeout=2.0) as client:
                    client.version()
                return
            except (BerthError, OSError) as err:
                last_error = str(err)
        time.sleep(0.02)
    raise BenchError(f"berthd did not answer on {address} within {timeout:.0f}s ({last_error}):\n{_tail(log_path)}")


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the daemon by its PID, wait, SIGKILL it if it does not go."""
    if proc.poll() is not None:
        return
    try:
        os.kill(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        print(f"berthd (pid {proc.pid}) ignored SIGTERM for 10s; sending SIGKILL", file=sys.stderr)
        try:
            os.kill(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            return
        proc.wait(timeout=10)


@contextmanager
def running_daemon() -> Iterator[Daemon]:
    """A private berthd in a fresh temporary directory; always stopped and cleaned up."""
    tmp = Path(tempfile.mkdtemp(prefix="berth-bench-"))
    address = str(tmp / "sock")
    log_path = tmp / "berthd.log"
    proc: subprocess.Popen[bytes] | None = None
    try:
        with open(log_path, "wb") as log_file:
            proc = subprocess.Popen(
                [sys.executable, "-m", "berth.plugins.berthd", "--root", str(tmp / "root"), "--state",
                 str(tmp / "state"), "--address", address, "--log-level", "error"],
                stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT)
        _wait_until_answering(proc, address, log_path, timeout=30.0)
        yield Daemon(proc.pid, address, log_path)
    finally:
        if proc is not None:
            _stop(proc)
        shutil.rmtree(tmp, ignore_errors=True)


def cpu_time_ns(pid: int) -> int | None:
    """Nanoseconds process ``pid`` has spent on a CPU, all its threads (live and exited) together.

    ``/proc/PID/stat`` counts in clock ticks (10 ms), which is plenty over the seconds a round takes;
    ``/proc/PID/schedstat`` is finer but covers the main thread only, and berthd runs sqlite work in
    worker threads.
    """
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        ticks = int(fields[11]) + int(fields[12])  # utime + stime
        return ticks * 1_000_000_000 // os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


# ---------------------------------------------------------------------------------------- whole process


def console_script(name: str) -> str:
    """The real console script next to this interpreter (not a pyenv shim found on PATH)."""
    path = Path(sysconfig.get_path("scripts")) / name
    if not path.exists():
        raise BenchError(f"{path} not found: is berth installed (pip install -e .) into {sys.executable}?")
    return str(path)


def _spawn_and_wait(argv: Sequence[str]) -> tuple[int, int, int]:
    """Run ``argv`` with stdout and stderr on /dev/null; return (status, wall ns, child CPU ns)."""
    actions = [(os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
               (os.POSIX_SPAWN_OPEN, 1, os.devnull, os.O_WRONLY, 0),
               (os.POSIX_SPAWN_OPEN, 2, os.devnull, os.O_WRONLY, 0)]
    start = time.perf_counter_ns()
    pid = os.posix_spawn(argv[0], list(argv), os.environ, file_actions=actions)
    _, status, usage = os.wait4(pid, 0)
    wall = time.perf_counter_ns() - start
    return os.waitstatus_to_exitcode(status), wall, int((usage.ru_utime + usage.ru_stime) * 1e9)


def _check_runs(label: str, argv: Sequence[str]) -> None:
    status, _, _ = _spawn_and_wait(argv)
    if status != 0:
        done = subprocess.run(argv, capture_output=True, text=True, check=False)
        raise BenchError(f"{label} ({' '.join(argv)}) exited {done.returncode}: {done.stderr.strip()[-500:]}")


_LIST_BERTH_MODULES = (
    "import sys, {module}\n"
    "for m in list(sys.modules.values()):\n"
    "    f = getattr(m, '__file__', None)\n"
    "    if m.__name__.startswith('berth') and f: print(f)\n"
)


def stale_bytecode(module: str) -> list[str]:
    """Source files ``import module`` loads whose cached .pyc is missing or out of date.

    With ``PYTHONDONTWRITEBYTECODE`` set (as in this sandbox), Python then compiles them again in
    every process, which is an artefact of editing the tree, not a cost an installed berth pays.
    """
    done = subprocess.run([sys.executable, "-c", _LIST_BERTH_MODULES.format(module=module)],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise BenchError(f"importing {module} failed: {done.stderr.strip()[-500:]}")
    stale = []
    for source in done.stdout.split():
        try:
            stat = os.stat(source)
            with open(importlib.util.cache_from_source(source), "rb") as f:
                header = f.read(16)
        except OSError:
            stale.append(source)
            continue
        flags = int.from_bytes(header[4:8], "little")
        mtime = int.from_bytes(header[8:12], "little")
        size = int.from_bytes(header[12:16], "little")
        if flags == 0 and (mtime != int(stat.st_mtime) & 0xFFFFFFFF or size != stat.st_size & 0xFFFFFFFF):
            stale.append(source)
    return stale


def refresh_bytecode(module: str) -> None:
    """Import ``module`` once with bytecode writing allowed, as an installed package's first run would."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    subprocess.run([sys.executable, "-c", f"import {module}"], env=env, capture_output=True, check=False)


def bench_processes(commands: dict[str, list[str]], runs: int) -> dict[str, Any]:
    """Run every command ``runs`` times, round-robin (so noise hits them all alike); ms per run."""
    for label, argv in commands.items():
        _check_runs(label, argv)  # also warms the page cache and writes any missing .pyc
    walls: dict[str, list[float]] = {label: [] for label in commands}
    cpus: dict[str, list[float]] = {label: [] for label in commands}
    for _ in range(runs):
        for label, argv in commands.items():
            status, wall, cpu = _spawn_and_wait(argv)
            if status != 0:
                raise BenchError(f"{label} exited {status} during the timed runs")
            walls[label].append(wall / 1e6)
            cpus[label].append(cpu / 1e6)
    return {label: {"argv": argv, "wall_ms": summarize(walls[label]), "cpu_ms": summarize(cpus[label]),
                    "wall_ms_runs": [round(v, 3) for v in walls[label]]}
            for label, argv in commands.items()}


def clean_start_argv(address: str) -> list[str] | None:
    """``berth --address SOCK version`` under ``python -S``: no site-packages .pth hooks at all.

    site-packages goes on ``sys.path`` by hand and ``berth`` is made a namespace-like package rooted
    at the checkout, which is what a regular (non-editable) install amounts to. ``None`` when the
    checkout's layout does not allow it (every ``berth.X`` must live in ``<root>/X``).
    """
    import berth.client
    import berth.core

    root = Path(berth.client.__file__).resolve().parent.parent
    if Path(berth.core.__file__).resolve().parent.parent != root:
        return None
    paths = list(dict.fromkeys([sysconfig.get_path("purelib"), sysconfig.get_path("platlib")]))
    snippet = (
        "import sys\n"
        f"sys.path.extend({paths!r})\n"
        "berth = type(sys)('berth')\n"
        f"berth.__path__ = [{str(root)!r}]\n"
        "sys.modules['berth'] = berth\n"
        "from berth.client.cli import main\n"
        "sys.argv[0] = 'berth'\n"
        "sys.exit(main())\n"
    )
    return [sys.executable, "-S", "-c", snippet, "--address", address, "version"]


def _parse_importtime(stderr: str) -> list[tuple[int, int, int, str]]:
    """``-X importtime`` lines as (self µs, cumulative µs, depth, module), in output order."""
    rows = []
    for line in stderr.splitlines():
        if not line.startswith("import time:") or "self [us]" in line:
            continue
        try:
            head, cumulative_part, name = line.split("|")
            self_us, cumulative_us = int(head.rsplit(":", 1)[1]), int(cumulative_part)
        except ValueError:
            continue
        depth = (len(name) - len(name.lstrip(" ")) - 1) // 2
        rows.append((self_us, cumulative_us, depth, name.strip()))
    return rows


def bench_import(module: str, runs: int) -> dict[str, Any]:
    """Import time of ``module`` alone (its cumulative line) and of ``site`` (which runs the .pth hooks)."""
    totals: list[float] = []
    site_totals: list[float] = []
    heaviest: list[tuple[int, str]] = []
    argv = [sys.executable, "-X", "importtime", "-c", f"import {module}"]
    subprocess.run(argv, capture_output=True, check=False)  # write any missing .pyc first
    for _ in range(runs):
        done = subprocess.run(argv, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise BenchError(f"importing {module} failed: {done.stderr.strip()[-500:]}")
        rows = _parse_importtime(done.stderr)
        index = next((i for i, row in enumerate(rows) if row[3] == module and row[2] == 0), None)
        if index is None:
            raise BenchError(f"no import time line for {module}")
        totals.append(rows[index][1] / 1000)
        site_totals.extend(row[1] / 1000 for row in rows if row[3] == "site" and row[2] == 0)
        subtree = []
        for row in reversed(rows[:index]):  # post-order: the module's imports come right before it
            if row[2] == 0:
                break
            subtree.append(row)
        heaviest = sorted(((row[0], row[3]) for row in [*subtree, rows[index]]), reverse=True)[:6]
    return {"module": module, "cumulative_ms": summarize(totals),
            "site_cumulative_ms": summarize(site_totals) if site_totals else None,
            "heaviest_self_us_last_run": [{"module": name, "self_us": us} for us, name in heaviest]}


# ---------------------------------------------------------------------------------------- RPC


def _rpc_worker(index: int, address: str, method: str, args: dict[str, Any] | None, warmup: int, calls: int,
                ready: Any, start: Any, results: Any) -> None:
    """One client process: connect, warm up, wait for the start signal, time ``calls`` calls."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # undo main()'s handler inherited through fork
    try:
        client = Client(address)  # no timeout: what `berth` without --timeout sends
        call = client.call
        for _ in range(warmup):
            call(method, args)
        ready.wait(timeout=120)
        if not start.wait(timeout=120):
            raise BenchError("no start signal")
        latencies = array.array("q", bytes(8 * calls))
        clock = time.perf_counter_ns
        cpu0 = time.process_time_ns()
        first = clock()
        for i in range(calls):
            t0 = clock()
            call(method, args)
            latencies[i] = clock() - t0
        end = clock()
        cpu = time.process_time_ns() - cpu0
        client.close()
        results.put((index, None, first, end, cpu, latencies.tobytes()))
    except BaseException as err:
        results.put((index, f"{type(err).__name__}: {err}", 0, 0, 0, b""))
        ready.abort()  # the parent stops waiting for the others at once


def run_rpc_round(ctx: MPContext, daemon: Daemon, method: str, args: dict[str, Any] | None,
                  clients: int, warmup: int, calls: int) -> dict[str, Any]:
    """``clients`` processes, each doing ``calls`` timed calls after ``warmup`` untimed ones."""
    ready = ctx.Barrier(clients + 1)
    start = ctx.Event()
    results = ctx.Queue()
    workers = [ctx.Process(target=_rpc_worker, args=(i, daemon.address, method, args, warmup, calls,
                                                     ready, start, results), daemon=True)
               for i in range(clients)]
    for worker in workers:
        worker.start()
    try:
        try:
            ready.wait(timeout=120)
        except Exception as err:  # BrokenBarrierError: a worker failed while warming up
            failures = _drain_failures(results)
            raise BenchError(f"workers did not get ready: {failures or err}") from None
        server_cpu0 = cpu_time_ns(daemon.pid)
        t0 = time.perf_counter_ns()
        start.set()
        collected = []
        for _ in workers:
            try:
                collected.append(results.get(timeout=300))
            except Exception:  # queue.Empty
                raise BenchError("a worker did not report within 300s") from None
        t_last = max((item[3] for item in collected if item[1] is None), default=t0)
        server_cpu1 = cpu_time_ns(daemon.pid)
        for worker in workers:
            worker.join(timeout=30)
    finally:
        for worker in workers:
            if worker.is_alive():
                worker.terminate()
                worker.join(timeout=5)
    failures = [f"client {item[0]}: {item[1]}" for item in collected if item[1] is not None]
    if failures:
        raise BenchError("; ".join(failures))
    per_client_median_us = []
    per_client_wall_s = []
    pooled: list[float] = []
    client_cpu_ns = 0
    for _, _, first, end, cpu, raw in collected:
        per_client_wall_s.append((end - first) / 1e9)
        latencies = array.array("q")
        latencies.frombytes(raw)
        us = [v / 1000 for v in latencies]
        per_client_median_us.append(percentile(us, 50))
        pooled.extend(us)
        client_cpu_ns += cpu
    total = clients * calls
    wall_ns = t_last - t0
    server_cpu = None if server_cpu0 is None or server_cpu1 is None else server_cpu1 - server_cpu0
    return {
        "clients": clients, "calls_per_client": calls, "total_calls": total, "wall_s": wall_ns / 1e9,
        "total_rps": total / (wall_ns / 1e9),
        "median_us": percentile(pooled, 50), "p90_us": percentile(pooled, 90), "p99_us": percentile(pooled, 99),
        "per_client_median_us": {"median": percentile(per_client_median_us, 50),
                                 "min": min(per_client_median_us), "max": max(per_client_median_us)},
        "per_client_wall_s": {"min": min(per_client_wall_s), "max": max(per_client_wall_s)},
        "server_cpu_us_per_call": None if server_cpu is None else server_cpu / 1000 / total,
        "server_cpu_busy": None if server_cpu is None else server_cpu / wall_ns,
        "client_cpu_us_per_call": client_cpu_ns / 1000 / total,
    }


def _drain_failures(results: Any) -> list[str]:
    failures = []
    try:
        while True:
            item = results.get(timeout=1)
            if item[1] is not None:
                failures.append(f"client {item[0]}: {item[1]}")
    except Exception:  # queue.Empty
        pass
    return failures


def _echo_server(listener: socket.socket, reply: bytes) -> None:
    """Answer every read with ``reply`` until the peer closes: the floor under any RPC round trip."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    conn, _ = listener.accept()
    listener.close()
    with conn:
        while conn.recv(256 * 1024):
            conn.sendall(reply)


def run_echo_floor(ctx: MPContext, directory: Path, warmup: int, calls: int) -> dict[str, Any]:
    """Round trips of version.get-sized msgpack frames to a process that only echoes a canned reply.

    Same socket type, same message sizes, same kind of process pair as a berth call, no RPC code:
    what is left is the kernel's and the machine's share (wake-ups across vCPUs dominate here).
    """
    path = directory / "echo.sock"
    path.unlink(missing_ok=True)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(1)
    request = msgpack.packb([0, 1, "version.get", [{"namespace": "default"}, {}]])
    reply = msgpack.packb([1, 1, None, {"version": "0.0.0", "revision": ""}])
    server = ctx.Process(target=_echo_server, args=(listener, reply), daemon=True)
    server.start()
    listener.close()
    latencies = array.array("q", bytes(8 * calls))
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(30)
            sock.connect(str(path))
            for _ in range(warmup):
                sock.sendall(request)
                sock.recv(256 * 1024)
            clock = time.perf_counter_ns
            cpu0 = time.process_time_ns()
            first = clock()
            for i in range(calls):
                t0 = clock()
                sock.sendall(request)
                if not sock.recv(256 * 1024):
                    raise BenchError("the echo server went away")
                latencies[i] = clock() - t0
            wall = clock() - first
            cpu = time.process_time_ns() - cpu0
    except OSError as err:
        raise BenchError(f"echo floor: {err}") from None
    finally:
        server.join(timeout=10)
        if server.is_alive():
            server.terminate()
            server.join(timeout=5)
        path.unlink(missing_ok=True)
    us = [v / 1000 for v in latencies]
    return {"median_us": percentile(us, 50), "p99_us": percentile(us, 99), "total_rps": calls / (wall / 1e9),
            "client_cpu_us_per_call": cpu / 1000 / calls}


def median_of(rounds: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in rounds if r.get(key) is not None]
    return statistics.median(values) if values else None


def bench_rpc(ctx: MPContext, daemon: Daemon, method: str, args: dict[str, Any] | None,
              settings: Settings, *, floor: bool = False) -> dict[str, Any]:
    """Single client then ``settings.clients`` clients, ``settings.repeats`` times; medians of the repeats.

    With ``floor``, each repeat first measures the raw socket echo floor (see :func:`run_echo_floor`).
    """
    singles = []
    concurrents = []
    floors = []
    for _ in range(settings.repeats):
        if floor:
            floors.append(run_echo_floor(ctx, Path(daemon.address).parent, settings.warmup, settings.calls))
        singles.append(run_rpc_round(ctx, daemon, method, args, 1, settings.warmup, settings.calls))
        concurrents.append(run_rpc_round(ctx, daemon, method, args, settings.clients, settings.client_warmup,
                                         settings.client_calls))
    keys_single = ["median_us", "p99_us", "total_rps", "server_cpu_us_per_call", "client_cpu_us_per_call"]
    keys_conc = ["total_rps", "median_us", "p99_us", "server_cpu_us_per_call", "server_cpu_busy",
                 "client_cpu_us_per_call"]
    single = {key: median_of(singles, key) for key in keys_single}
    single["calls_per_s"] = single.pop("total_rps")
    concurrent = {key: median_of(concurrents, key) for key in keys_conc}
    concurrent["per_client_median_us"] = statistics.median(
        r["per_client_median_us"]["median"] for r in concurrents)
    result: dict[str, Any] = {"method": method, "args": args, "single": single, "concurrent": concurrent,
                              "rounds": {"single": singles, "concurrent": concurrents}}
    if floors:
        result["echo_floor"] = {key: median_of(floors, key)
                                for key in ["median_us", "p99_us", "total_rps", "client_cpu_us_per_call"]}
        result["rounds"]["echo_floor"] = floors
    return result


# ---------------------------------------------------------------------------------------- driver


@dataclass
class Settings:
    runs: int
    repeats: int
    import_runs: int
    warmup: int
    calls: int
    clients: int
    client_warmup: int
    client_calls: int
    start_method: str


def _settings(argv: Sequence[str] | None) -> tuple[Settings, argparse.Namespace]:
    parser = argparse.ArgumentParser(description="benchmark berth's CLI start-up and RPC round trips")
    parser.add_argument("--quick", action="store_true", help="small counts: a smoke run of a few seconds")
    parser.add_argument("--runs", type=int, help="whole-process runs per command (default 40; quick 5)")
    parser.add_argument("--repeats", type=int, help="repeats of the RPC measurements (default 3; quick 1)")
    parser.add_argument("--calls", type=int, help="timed calls of the single client (default 5000; quick 500)")
    parser.add_argument("--clients", type=int, default=16, help="concurrent client processes (default 16)")
    parser.add_argument("--client-calls", type=int,
                        help="timed calls per concurrent client (default 3000; quick 200)")
    parser.add_argument("--start-method", choices=["fork", "spawn", "forkserver"], default="fork",
                        help="multiprocessing start method for the clients (default fork)")
    parser.add_argument("--keep-stale-bytecode", action="store_true",
                        help="do not rewrite the CLI modules' stale .pyc files before timing")
    parser.add_argument("--no-namespaces", action="store_true", help="skip the namespaces.list variant")
    parser.add_argument("--output", type=Path, help="JSON file (default bench/results/core-<timestamp>.json)")
    ns = parser.parse_args(argv)
    quick = ns.quick

    def pick(value: int | None, full: int, small: int) -> int:
        chosen = value if value is not None else (small if quick else full)
        if chosen < 1:
            parser.error("counts must be at least 1")
        return chosen

    settings = Settings(
        runs=pick(ns.runs, 40, 5), repeats=pick(ns.repeats, 3, 1), import_runs=pick(None, 10, 2),
        warmup=pick(None, 500, 50), calls=pick(ns.calls, 5000, 500), clients=pick(ns.clients, 16, 16),
        client_warmup=pick(None, 300, 30), client_calls=pick(ns.client_calls, 3000, 200),
        start_method=ns.start_method)
    return settings, ns


def _git_revision() -> str | None:
    try:
        head = subprocess.run(["git", "-C", str(BENCH_DIR), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(BENCH_DIR), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("-dirty" if dirty else "")


def _verdict(name: str, value: float | None) -> str:
    if value is None:
        return "n/a"
    target, direction, _ = TARGETS[name]
    ok = value < target if direction == "lt" else value > target
    return "meets" if ok else "MISSES"


def _fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def _print_report(results: dict[str, Any]) -> None:
    out = sys.stdout.write
    env = results["environment"]
    out(f"\nberth core bench  {results['timestamp']}  rev {env['git_revision']}  python {env['python']}  "
        f"cpus {env['cpus']}  load {env['loadavg_before']} -> {env['loadavg_after']}\n")
    proc = results["processes"]
    out(f"\nwhole process ({results['settings']['runs']} runs each, round-robin; ms)\n")
    out(f"  {'command':<34}{'median':>9}{'p10':>9}{'p90':>9}{'cpu med':>9}\n")
    for label, row in proc.items():
        w, c = row["wall_ms"], row["cpu_ms"]
        out(f"  {label:<34}{w['median']:>9.1f}{w['p10']:>9.1f}{w['p90']:>9.1f}{c['median']:>9.1f}\n")
    derived = results["derived"]
    out(f"  berth's own cost: {_fmt(derived['berth_own_cost_ms'])} ms (berth version - python3 -c pass), "
        f"{_fmt(derived['berth_own_cost_clean_ms'])} ms (the -S row - python3 -S -c pass)\n")
    out(f"  site-packages .pth hooks cost every python process {_fmt(derived['site_cost_ms'])} ms "
        f"(python3 -c pass - python3 -S -c pass)\n")
    imp = results["import"]
    site = imp["site_cumulative_ms"]
    out(f"  import {imp['module']}: {imp['cumulative_ms']['median']:.1f} ms cumulative (-X importtime, median); "
        f"site incl. .pth hooks: {_fmt(site['median'] if site else None)} ms\n")
    heavy = ", ".join(f"{h['module']} {h['self_us'] / 1000:.1f}" for h in imp["heaviest_self_us_last_run"])
    out(f"  heaviest self times (ms): {heavy}\n")
    out(f"  ctr: {results['ctr']['note']}\n")
    bytecode = results["bytecode"]
    if bytecode["stale_before"]:
        names = ", ".join(Path(p).name for p in bytecode["stale_before"])
        action = ("rewritten before timing" if bytecode["refreshed"] and not bytecode["stale_after"]
                  else "NOT rewritten: every run above recompiled them")
        out(f"  stale .pyc for {names} (PYTHONDONTWRITEBYTECODE={bytecode['PYTHONDONTWRITEBYTECODE']}): {action}\n")
    out(f"\nRPC round trips (median of {results['settings']['repeats']} repeats; latencies in µs)\n")
    out(f"  {'method':<16}{'clients':>8}{'median':>9}{'p99':>9}{'calls/s':>10}{'srv cpu/call':>14}"
        f"{'cli cpu/call':>14}\n")
    for rpc in results["rpc"]:
        s, c = rpc["single"], rpc["concurrent"]
        floor = rpc.get("echo_floor")
        if floor:
            out(f"  {'(raw echo floor)':<16}{1:>8}{_fmt(floor['median_us']):>9}{_fmt(floor['p99_us']):>9}"
                f"{_fmt(floor['total_rps'], 0):>10}{'-':>14}{_fmt(floor['client_cpu_us_per_call']):>14}\n")
        out(f"  {rpc['method']:<16}{1:>8}{_fmt(s['median_us']):>9}{_fmt(s['p99_us']):>9}"
            f"{_fmt(s['calls_per_s'], 0):>10}{_fmt(s['server_cpu_us_per_call']):>14}"
            f"{_fmt(s['client_cpu_us_per_call']):>14}\n")
        out(f"  {'':<16}{results['settings']['clients']:>8}{_fmt(c['median_us']):>9}{_fmt(c['p99_us']):>9}"
            f"{_fmt(c['total_rps'], 0):>10}{_fmt(c['server_cpu_us_per_call']):>14}"
            f"{_fmt(c['client_cpu_us_per_call']):>14}"
            f"   (per-client median {_fmt(c['per_client_median_us'])} µs, "
            f"daemon busy {_fmt(None if c['server_cpu_busy'] is None else 100 * c['server_cpu_busy'], 0)}%)\n")
    out("\ntargets\n")
    for name, (target, direction, unit) in TARGETS.items():
        value = results["targets"][name]["value"]
        sign = "<" if direction == "lt" else ">"
        out(f"  {name:<28}{_fmt(value):>12} {unit:<8} target {sign} {target:,.0f} {unit:<8} "
            f"{results['targets'][name]['verdict']}\n")
    out(f"  (containerd's `ctr version`: {CTR_VERSION_REFERENCE_MS:.0f} ms on the reference machine)\n")


def main(argv: Sequence[str] | None = None) -> int:
    settings, ns = _settings(argv)
    # A SIGTERM to the bench unwinds like Ctrl-C, so the daemon and the temporary directory go too.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    stamp = dt.datetime.now(dt.UTC)
    berth = console_script("berth")
    ctx = mp.get_context(settings.start_method)
    ctr = shutil.which("ctr")
    loadavg_before = [round(v, 2) for v in os.getloadavg()]
    try:
        with running_daemon() as daemon:
            commands = {
                "berth version": [berth, "--address", daemon.address, "version"],
                "python3 -c pass": [sys.executable, "-c", "pass"],
                "python3 -S -c pass": [sys.executable, "-S", "-c", "pass"],
                "python3 -c 'import berth.client.cli'": [sys.executable, "-c", "import berth.client.cli"],
            }
            clean = clean_start_argv(daemon.address)
            if clean is not None:
                commands[CLEAN] = clean
            ctr_note = "not on PATH (containerd reference not measured here)"
            if ctr is not None:
                ctr_note = f"found at {ctr}"
                if os.path.exists("/run/containerd/containerd.sock"):
                    commands["ctr version"] = [ctr, "version"]
                    ctr_note += "; containerd is running, `ctr version` timed alongside"
                else:
                    ctr_note += "; no /run/containerd/containerd.sock, so `ctr version` is not timed"
            stale = stale_bytecode("berth.client.cli")
            bytecode: dict[str, Any] = {
                "PYTHONDONTWRITEBYTECODE": os.environ.get("PYTHONDONTWRITEBYTECODE"),
                "stale_before": stale, "refreshed": False, "stale_after": stale}
            if stale and not ns.keep_stale_bytecode:
                refresh_bytecode("berth.client.cli")
                bytecode["refreshed"] = True
                bytecode["stale_after"] = stale_bytecode("berth.client.cli")
            print(f"berthd pid {daemon.pid} on {daemon.address}; timing whole processes ...", flush=True)
            processes = bench_processes(commands, settings.runs)
            print("timing the CLI module's import ...", flush=True)
            imports = bench_import("berth.client.cli", settings.import_runs)
            variants: list[tuple[str, dict[str, Any] | None]] = [("version.get", None)]
            if not ns.no_namespaces:
                variants.append(("namespaces.list", {"filters": []}))
            rpc = []
            for method, args in variants:
                print(f"timing {method} round trips ({settings.repeats} repeats) ...", flush=True)
                rpc.append(bench_rpc(ctx, daemon, method, args, settings, floor=method == "version.get"))
    except BenchError as err:
        print(f"core_bench: {err}", file=sys.stderr)
        return 1

    walls = {label: row["wall_ms"]["median"] for label, row in processes.items()}
    version_rpc = rpc[0]
    values = {
        "berth_version_ms": walls["berth version"],
        "rpc_single_median_us": version_rpc["single"]["median_us"],
        "rpc_concurrent_total_rps": version_rpc["concurrent"]["total_rps"],
    }
    results: dict[str, Any] = {
        "timestamp": stamp.isoformat(timespec="seconds"),
        "settings": {**settings.__dict__, "quick": ns.quick},
        "environment": {
            "python": platform.python_version(), "executable": sys.executable, "berth_script": berth,
            "platform": platform.platform(), "cpus": os.cpu_count(), "git_revision": _git_revision(),
            "loadavg_before": loadavg_before, "loadavg_after": [round(v, 2) for v in os.getloadavg()],
        },
        "bytecode": bytecode,
        "processes": processes,
        "derived": {
            "berth_own_cost_ms": walls["berth version"] - walls["python3 -c pass"],
            "site_cost_ms": walls["python3 -c pass"] - walls["python3 -S -c pass"],
            "cli_import_process_minus_pass_ms": walls["python3 -c 'import berth.client.cli'"]
            - walls["python3 -c pass"],
            "berth_own_cost_clean_ms": None if CLEAN not in walls else walls[CLEAN] - walls["python3 -S -c pass"],
        },
        "import": imports,
        "ctr": {"path": ctr, "note": ctr_note, "reference_ctr_version_ms": CTR_VERSION_REFERENCE_MS},
        "rpc": rpc,
        "targets": {name: {"value": values[name], "target": TARGETS[name][0], "direction": TARGETS[name][1],
                           "unit": TARGETS[name][2], "verdict": _verdict(name, values[name])}
                    for name in TARGETS},
    }
    _print_report(results)
    output = ns.output or RESULTS_DIR / f"core-{stamp.strftime('%Y%m%dT%H%M%SZ')}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwrote {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
