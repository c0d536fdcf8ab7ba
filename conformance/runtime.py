"""The task lifecycle every runtime plugin must get right, case by case (containerd's runc shim behaviour:
``cmd/containerd-shim-runc-v2/process/init_state.go``, the ``Task`` API).

The cases drive a live berthd over RPC, so any ``io.berth.runtime.v1`` plugin it has loaded can be
checked the same way, berth's own or a third party's. Give a factory::

    def open_runtime() -> AbstractContextManager[RuntimeTarget]: ...

yielding where the daemon is, which runtime to use and an image (a busybox-like image, unpacked in the
target's snapshotter: the cases run ``sh``, ``sleep``, ``cat``, ``echo``, ``tty``), and call
:func:`check_runtime` (a fresh target per case), :func:`run_runtime_suite` (every case on one target),
or :func:`berth.conformance.pytest_plugin.runtime_tests` for one pytest test per case. Each case makes
its own containers (ids ``<prefix>-<case>-...``) and removes them, task and snapshot, even when it fails.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

from berth.client.sync import Client
from berth.core.errdefs import AlreadyExists, BerthError, FailedPrecondition, NotFound

__all__ = ["CASES", "RUNTIME_CASES", "OpenRuntime", "RuntimeTarget", "check_runtime", "run_runtime_case",
           "run_runtime_suite"]


@dataclass(frozen=True, kw_only=True)
class RuntimeTarget:
    """A berthd to run the cases on, and what to run them with."""

    #: berthd's socket.
    address: str
    #: The runtime plugin's id (``runc``, ``builtin``, ...).
    runtime: str
    #: A busybox-like image unpacked in ``snapshotter``.
    image: str
    namespace: str = "default"
    #: ``""``: the daemon's default.
    snapshotter: str = ""
    #: Container ids start with this.
    prefix: str = "conformance"
    #: Seconds any one call may take.
    timeout: float = 60.0


OpenRuntime = Callable[[], AbstractContextManager[RuntimeTarget]]


class CaseFailure(AssertionError):
    """A case found the runtime doing something else than the lifecycle says."""


def expect(condition: bool, message: str) -> None:
    if not condition:
        raise CaseFailure(message)


def expect_error(kind: type[BerthError], what: str, call: Callable[[], object]) -> None:
    try:
        call()
    except kind:
        return
    except BerthError as err:
        raise CaseFailure(f"{what}: expected {kind.__name__}, got {type(err).__name__}: {err}") from None
    raise CaseFailure(f"{what}: expected {kind.__name__}, and it succeeded")


_ROOT_PROCESS = {"cwd": "/", "env": ["PATH=/usr/sbin:/usr/bin:/sbin:/bin"], "user": {"uid": 0, "gid": 0}}


class Session:
    """The containers of one case, on one connection; :meth:`close` removes them all."""

    def __init__(self, target: RuntimeTarget, case: str) -> None:
        self.target = target
        self.case = case
        self.client = Client(target.address, namespace=target.namespace, timeout=target.timeout)
        self.made: list[str] = []

    def container(self, name: str, args: list[str], **options: Any) -> str:
        container_id = f"{self.target.prefix}-{self.case}-{name}".lower()[:76]
        self.client.call("containers.new", {"id": container_id, "image": self.target.image,
                                            "runtime": self.target.runtime, "snapshotter": self.target.snapshotter,
                                            "options": {"args": args, **options}})
        self.made.append(container_id)
        return container_id

    def task(self, name: str, args: list[str], *, stdio: dict[str, Any] | None = None, start: bool = True,
             **options: Any) -> str:
        container_id = self.container(name, args, **options)
        self.call("tasks.create", container_id, stdio=stdio or {})
        if start:
            self.call("tasks.start", container_id)
        return container_id

    def call(self, method: str, container_id: str, **args: Any) -> Any:
        return self.client.call(method, {"container_id": container_id, **args})

    def status(self, container_id: str, exec_id: str = "") -> str:
        return str(self.call("tasks.get", container_id, exec_id=exec_id)["task"]["status"])

    def wait(self, container_id: str, exec_id: str = "") -> int:
        return int(self.call("tasks.wait", container_id, exec_id=exec_id)["exit_status"])

    def attach_and(self, container_id: str, exec_id: str, start: Callable[[Client], object]) -> dict[str, bytes]:
        """Attach, run ``start`` on a second connection, return what each stream carried."""
        output: dict[str, bytes] = {"stdout": b"", "stderr": b""}
        items = self.client.stream("tasks.attach", {"container_id": container_id, "exec_id": exec_id})
        expect(next(items, None) == {"attached": True}, "tasks.attach did not start with {'attached': True}")
        with Client(self.target.address, namespace=self.target.namespace, timeout=self.target.timeout) as side:
            start(side)
            for item in items:
                for name, data in item.items():
                    output[name] = output.get(name, b"") + data
        return output

    def close(self) -> None:
        for container_id in self.made:
            with contextlib.suppress(BerthError):
                self.call("tasks.kill", container_id, signal=9, all=True)
            with contextlib.suppress(BerthError):  # a paused task dies once thawed
                self.call("tasks.resume", container_id)
            with contextlib.suppress(BerthError):
                self.wait(container_id)
            with contextlib.suppress(BerthError):
                self.call("tasks.delete", container_id)
            with contextlib.suppress(BerthError):
                self.client.call("containers.delete", {"id": container_id, "snapshot_cleanup": True})
        self.client.close()


# ---------------------------------------------------------------------------------------------- cases


def case_create_start_wait(s: Session) -> None:
    cid = s.task("main", ["sh", "-c", "sleep 0.3"], start=False)
    expect(s.status(cid) == "created", f"after create the task is {s.status(cid)}, not created")
    pid = s.call("tasks.start", cid)["pid"]
    expect(pid > 0, "start returned no pid")
    expect(s.status(cid) == "running", f"after start the task is {s.status(cid)}, not running")
    expect(s.wait(cid) == 0, "a command that succeeds did not exit 0")
    expect(s.status(cid) == "stopped", "after its exit the task is not stopped")
    deleted = s.call("tasks.delete", cid)
    expect((deleted["exit_status"], deleted["pid"]) == (0, pid), f"delete returned {deleted}")
    expect_error(NotFound, "tasks.get after delete", lambda: s.call("tasks.get", cid))


def case_exit_codes(s: Session) -> None:
    for code in (0, 1, 7, 255):
        cid = s.task(f"exit{code}", ["sh", "-c", f"exit {code}"])
        expect(s.wait(cid) == code, f"sh -c 'exit {code}' did not exit {code}")


def case_signals(s: Session) -> None:
    killed = s.task("killed", ["sleep", "300"])
    s.call("tasks.kill", killed, signal=9)
    expect(s.wait(killed) == 137, "SIGKILL does not give 137")
    trapped = s.task("trapped", ["sh", "-c", "trap 'exit 42' TERM; while true; do sleep 0.05; done"])
    time.sleep(0.2)  # let the trap be set
    s.call("tasks.kill", trapped, signal=15)
    expect(s.wait(trapped) == 42, "SIGTERM did not reach the process's handler")
    expect_error(NotFound, "kill of a finished task", lambda: s.call("tasks.kill", trapped, signal=9))


def case_kill_all(s: Session) -> None:
    cid = s.task("all", ["sh", "-c", "sleep 300 & sleep 300 & sleep 300"])
    deadline = time.monotonic() + 10
    while len(s.call("tasks.pids", cid)["processes"]) < 3:
        expect(time.monotonic() < deadline, "the task's children did not appear in tasks.pids")
        time.sleep(0.05)
    s.call("tasks.kill", cid, signal=9, all=True)
    expect(s.wait(cid) == 137, "kill --all did not end the task with SIGKILL")


def case_exec(s: Session) -> None:
    cid = s.task("host", ["sleep", "300"])
    s.call("tasks.exec", cid, exec_id="e1", process={"args": ["sh", "-c", "echo out; echo err >&2; exit 3"],
                                                    **_ROOT_PROCESS})
    expect_error(AlreadyExists, "a second exec with the same id",
                 lambda: s.call("tasks.exec", cid, exec_id="e1", process={"args": ["true"], **_ROOT_PROCESS}))
    expect(s.status(cid, "e1") == "created", "an exec process is not created before its start")
    output = s.attach_and(cid, "e1", lambda side: side.call("tasks.start", {"container_id": cid, "exec_id": "e1"}))
    expect(output == {"stdout": b"out\n", "stderr": b"err\n"}, f"exec output {output}")
    expect(s.wait(cid, "e1") == 3, "the exec process's status is not its exit code")
    expect(s.call("tasks.delete", cid, exec_id="e1")["exit_status"] == 3, "exec delete lost the status")
    expect(s.status(cid) == "running", "the init stopped when an exec process ended")


def case_pause_resume(s: Session) -> None:
    cid = s.task("frozen", ["sleep", "300"])
    s.call("tasks.pause", cid)
    expect(s.status(cid) == "paused", "pause did not leave the task paused")
    expect_error(FailedPrecondition, "pause of a paused task", lambda: s.call("tasks.pause", cid))
    s.call("tasks.resume", cid)
    expect(s.status(cid) == "running", "resume did not leave the task running")


def case_state_transitions_refused(s: Session) -> None:
    cid = s.task("states", ["sleep", "300"], start=False)
    expect_error(FailedPrecondition, "pause of a created task", lambda: s.call("tasks.pause", cid))
    expect_error(FailedPrecondition, "exec in a created task",
                 lambda: s.call("tasks.exec", cid, exec_id="x", process={"args": ["true"], **_ROOT_PROCESS}))
    expect_error(AlreadyExists, "a second create", lambda: s.call("tasks.create", cid))
    s.call("tasks.start", cid)
    expect_error(FailedPrecondition, "start of a running task", lambda: s.call("tasks.start", cid))
    expect_error(FailedPrecondition, "resume of a running task", lambda: s.call("tasks.resume", cid))
    expect_error(FailedPrecondition, "delete of a running task", lambda: s.call("tasks.delete", cid))
    s.call("tasks.exec", cid, exec_id="z", process={"args": ["true"], **_ROOT_PROCESS})
    s.call("tasks.pause", cid)
    expect_error(FailedPrecondition, "exec in a paused task",
                 lambda: s.call("tasks.exec", cid, exec_id="p", process={"args": ["true"], **_ROOT_PROCESS}))
    expect_error(FailedPrecondition, "start of an exec process in a paused task",
                 lambda: s.call("tasks.start", cid, exec_id="z"))
    expect_error(FailedPrecondition, "delete of a paused task", lambda: s.call("tasks.delete", cid))
    expect_error(FailedPrecondition, "start of a paused task", lambda: s.call("tasks.start", cid))
    s.call("tasks.resume", cid)
    s.call("tasks.kill", cid, signal=9)
    s.wait(cid)
    expect_error(FailedPrecondition, "start of a stopped task", lambda: s.call("tasks.start", cid))
    expect_error(FailedPrecondition, "exec in a stopped task",
                 lambda: s.call("tasks.exec", cid, exec_id="y", process={"args": ["true"], **_ROOT_PROCESS}))


def case_delete_returns_status(s: Session) -> None:
    cid = s.task("status", ["sh", "-c", "exit 5"])
    s.wait(cid)
    expect(s.call("tasks.delete", cid)["exit_status"] == 5, "delete did not return the exit status")
    never = s.task("never", ["sleep", "300"], start=False)
    expect(s.call("tasks.delete", never)["exit_status"] == 137, "a created task is not killed by delete")


def case_stdio(s: Session) -> None:
    cid = s.task("stdio", ["sh", "-c", "read a; read b; echo got $a $b; cat >&2"], stdio={"stdin": True},
                 start=False)

    def start_and_type(side: Client) -> None:
        side.call("tasks.start", {"container_id": cid})
        side.call("tasks.write", {"container_id": cid, "data": b"one\ntwo\nrest\n"})
        side.call("tasks.close_io", {"container_id": cid})

    output = s.attach_and(cid, "", start_and_type)
    expect(output == {"stdout": b"got one two\n", "stderr": b"rest\n"}, f"stdio carried {output}")
    expect(s.wait(cid) == 0, "the stdio task failed")
    logged = b"".join(item["data"] for item in s.client.stream("tasks.logs", {"container_id": cid}))
    # stdout and stderr are read side by side: the log has both lines, in either order
    expect(sorted(logged.splitlines()) == [b"got one two", b"rest"], f"the log holds {logged!r}")


def case_tty(s: Session) -> None:
    cid = s.task("tty", ["sh", "-c", "tty; exit 4"], stdio={"terminal": True}, tty=True, start=False)
    output = s.attach_and(cid, "", lambda side: side.call("tasks.start", {"container_id": cid}))
    expect(output["stdout"].startswith(b"/dev/pts/") and output["stdout"].endswith(b"\r\n"),
           f"a terminal task printed {output['stdout']!r}")
    expect(s.wait(cid) == 4, "the terminal task's status was lost")


def case_resources(s: Session) -> None:
    cid = s.task("limits", ["sleep", "300"], pids_limit=50, memory_limit=64 << 20)
    metrics = s.call("tasks.metrics", cid)["metrics"]
    expect("memory" in metrics and "pids" in metrics, f"metrics lack memory or pids: {sorted(metrics)}")
    expect(int(metrics["pids"].get("limit", 0)) == 50, f"the pids limit is {metrics['pids']}")
    s.call("tasks.update", cid, resources={"pids": {"limit": 30}})
    expect(int(s.call("tasks.metrics", cid)["metrics"]["pids"].get("limit", 0)) == 30, "update did not apply")
    expect(len(s.call("tasks.pids", cid)["processes"]) == 1, "a sleeping task has more than its init")


def case_exec_signals(s: Session) -> None:
    cid = s.task("execsig", ["sleep", "300"])
    s.call("tasks.exec", cid, exec_id="pending", process={"args": ["sleep", "300"], **_ROOT_PROCESS})
    expect_error(FailedPrecondition, "kill of an exec process not started",
                 lambda: s.call("tasks.kill", cid, exec_id="pending", signal=9))
    s.call("tasks.exec", cid, exec_id="sleeper", process={"args": ["sleep", "300"], **_ROOT_PROCESS})
    exec_pid = s.call("tasks.start", cid, exec_id="sleeper")["pid"]
    expect(exec_pid > 0 and exec_pid != s.call("tasks.get", cid)["task"]["pid"], "the exec has no pid of its own")
    expect(s.status(cid, "sleeper") == "running", "a started exec process is not running")
    expect_error(FailedPrecondition, "delete of a running exec process",
                 lambda: s.call("tasks.delete", cid, exec_id="sleeper"))
    s.call("tasks.kill", cid, exec_id="sleeper", signal=15)
    expect(s.wait(cid, "sleeper") == 143, "SIGTERM to an exec process (not pid 1) does not give 143")
    expect_error(NotFound, "kill of a finished exec process",
                 lambda: s.call("tasks.kill", cid, exec_id="sleeper", signal=9))
    expect(s.status(cid) == "running", "the init stopped when an exec process was killed")
    expect(s.call("tasks.delete", cid, exec_id="pending")["exit_status"] == 0, "an exec never started is deletable")


def case_process_spec(s: Session) -> None:
    cid = s.task("spec", ["sh", "-c", "echo $GREETING; pwd; id -u; id -g"], env=["GREETING=hi there"], cwd="/tmp",
                 user="65534:65534", start=False)
    output = s.attach_and(cid, "", lambda side: side.call("tasks.start", {"container_id": cid}))
    expect(output["stdout"] == b"hi there\n/tmp\n65534\n65534\n", f"the init's env/cwd/user gave {output}")
    expect(s.wait(cid) == 0, "the process-spec task failed")
    host = s.task("specexec", ["sleep", "300"])
    s.call("tasks.exec", host, exec_id="who", process={
        "args": ["sh", "-c", "echo $ONLY_HERE; pwd; id -u"], "cwd": "/etc", "user": {"uid": 1000, "gid": 1000},
        "env": ["PATH=/usr/sbin:/usr/bin:/sbin:/bin", "ONLY_HERE=exec"]})
    output = s.attach_and(host, "who", lambda side: side.call("tasks.start", {"container_id": host,
                                                                              "exec_id": "who"}))
    expect(output["stdout"] == b"exec\n/etc\n1000\n", f"the exec's env/cwd/user gave {output}")


def case_read_only_rootfs(s: Session) -> None:
    script = ("touch /written 2>/dev/null && echo rootfs-writable; touch /scratch/x && echo scratch-ok; "
              "echo end")
    cid = s.task("readonly", ["sh", "-c", script], read_only=True, start=False, mounts=[
        {"type": "tmpfs", "source": "tmpfs", "destination": "/scratch", "options": ["nosuid", "nodev", "size=1m"]}])
    output = s.attach_and(cid, "", lambda side: side.call("tasks.start", {"container_id": cid}))
    expect(output["stdout"] == b"scratch-ok\nend\n", f"a read-only rootfs with a tmpfs gave {output}")


def case_wait_many(s: Session) -> None:
    cid = s.task("waiters", ["sh", "-c", "sleep 0.3; exit 9"])
    results: list[int] = []

    def waiter() -> None:
        with Client(s.target.address, namespace=s.target.namespace, timeout=s.target.timeout) as own:
            results.append(int(own.call("tasks.wait", {"container_id": cid})["exit_status"]))

    threads = [threading.Thread(target=waiter) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=s.target.timeout)
    expect(results == [9, 9, 9], f"three waiters got {results}")
    expect(s.wait(cid) == 9, "a wait after the exit lost the status")


RUNTIME_CASES: dict[str, Callable[[Session], None]] = {
    "CreateStartWait": case_create_start_wait,
    "ExitCodes": case_exit_codes,
    "Signals": case_signals,
    "KillAll": case_kill_all,
    "Exec": case_exec,
    "PauseResume": case_pause_resume,
    "StateTransitionsRefused": case_state_transitions_refused,
    "DeleteReturnsStatus": case_delete_returns_status,
    "Stdio": case_stdio,
    "TTY": case_tty,
    "Resources": case_resources,
    "ExecSignals": case_exec_signals,
    "ProcessSpec": case_process_spec,
    "ReadOnlyRootfs": case_read_only_rootfs,
    "WaitMany": case_wait_many,
}

#: The cases' names, in order (the keys of :data:`RUNTIME_CASES`).
CASES: list[str] = list(RUNTIME_CASES)


def run_runtime_case(name: str, target: RuntimeTarget) -> None:
    """Run one case on ``target``; its containers are removed whatever happens.

    Raises: KeyError (no such case); CaseFailure naming what the runtime did wrong; BerthError from an
    unexpected failure of a call.
    """
    case = RUNTIME_CASES[name]
    session = Session(target, name)
    try:
        case(session)
    finally:
        session.close()


def run_runtime_suite(target: RuntimeTarget, cases: list[str] | None = None) -> None:
    """Run ``cases`` (default: all, in order) one after another on one ``target``; the first failure
    stops the suite."""
    for name in cases or CASES:
        run_runtime_case(name, target)


def check_runtime(open_runtime: OpenRuntime, cases: list[str] | None = None) -> None:
    """Run ``cases`` (default: all, in order) each on a fresh target from ``open_runtime``."""
    for name in cases or list(RUNTIME_CASES):
        with open_runtime() as target:
            run_runtime_case(name, target)
