"""``berth-runtime``: the runc-compatible command over :mod:`berth.runtimes.builtin.container`.

    berth-runtime [--root DIR] [--log FILE] [--log-format text|json] [--debug] COMMAND [OPTIONS] ...

Commands: create, start, run, state, kill, delete, exec, pause, resume, ps, list, spec, events, update
(``berth-runtime --help`` lists their options). As with runc, the container inherits the standard
streams of ``create`` (or ``run``), options end at the first argument that is not one, an error exits
with status 1 and a message on stderr, and with ``--log`` each error is also a line in that file (JSON
``{"level": "error", "msg": ..., "time": ...}`` with ``--log-format json``, which containerd's shim reads).

The parser is hand-rolled and every import is the standard library's, so a ``create``/``start`` costs
little more than the interpreter's own start-up.
"""

from __future__ import annotations

import sys
import time

from berth.core.errdefs import BerthError, InvalidArgument
from berth.runtimes.builtin import quickjson, signals
from berth.runtimes.builtin.state import DEFAULT_ROOT, OCI_VERSION, Container

TYPE_CHECKING = False  # not typing's: importing typing costs every runtime call ~5 ms
if TYPE_CHECKING:
    from typing import Any

__all__ = ["main"]

VERSION = "0.1.0"

# command -> option -> (destination, takes a value, repeatable)
_Option = tuple[str, bool, bool]
_CREATE: dict[str, _Option] = {
    "--bundle": ("bundle", True, False), "-b": ("bundle", True, False), "--pid-file": ("pid_file", True, False),
    "--console-socket": ("console_socket", True, False), "--no-pivot": ("no_pivot", False, False),
    "--no-new-keyring": ("no_new_keyring", False, False), "--preserve-fds": ("preserve_fds", True, False),
}
_COMMANDS: dict[str, dict[str, _Option]] = {
    "create": _CREATE,
    "run": {**_CREATE, "--detach": ("detach", False, False), "-d": ("detach", False, False)},
    "start": {},
    "state": {},
    "kill": {"--all": ("all", False, False), "-a": ("all", False, False)},
    "delete": {"--force": ("force", False, False), "-f": ("force", False, False)},
    "exec": {
        "--process": ("process", True, False), "-p": ("process", True, False), "--detach": ("detach", False, False),
        "-d": ("detach", False, False), "--pid-file": ("pid_file", True, False),
        "--console-socket": ("console_socket", True, False), "--tty": ("tty", False, False),
        "-t": ("tty", False, False), "--cwd": ("cwd", True, False), "--env": ("env", True, True),
        "-e": ("env", True, True), "--user": ("user", True, False), "-u": ("user", True, False),
        "--additional-gids": ("gids", True, True), "-g": ("gids", True, True), "--cap": ("caps", True, True),
        "-c": ("caps", True, True), "--no-new-privs": ("no_new_privs", False, False),
        "--preserve-fds": ("preserve_fds", True, False),
    },
    "pause": {},
    "resume": {},
    "ps": {"--format": ("format", True, False), "-f": ("format", True, False)},
    "list": {"--quiet": ("quiet", False, False), "-q": ("quiet", False, False), "--format": ("format", True, False),
             "-f": ("format", True, False)},
    "spec": {"--bundle": ("bundle", True, False), "-b": ("bundle", True, False),
             "--rootless": ("rootless", False, False)},
    "events": {"--stats": ("stats", False, False), "--interval": ("interval", True, False)},
    "update": {
        "--resources": ("resources", True, False), "-r": ("resources", True, False),
        "--memory": ("memory", True, False), "--memory-swap": ("memory_swap", True, False),
        "--memory-reservation": ("memory_reservation", True, False), "--cpu-shares": ("cpu_shares", True, False),
        "--cpu-quota": ("cpu_quota", True, False), "--cpu-period": ("cpu_period", True, False),
        "--cpuset-cpus": ("cpuset_cpus", True, False), "--cpuset-mems": ("cpuset_mems", True, False),
        "--pids-limit": ("pids_limit", True, False), "--blkio-weight": ("blkio_weight", True, False),
    },
}
_GLOBAL: dict[str, _Option] = {
    "--root": ("root", True, False), "--log": ("log", True, False), "--log-format": ("log_format", True, False),
    "--debug": ("debug", False, False), "--systemd-cgroup": ("systemd_cgroup", False, False),
    "--rootless": ("rootless", True, False), "--criu": ("criu", True, False),
}
# Positional arguments: (required names, whether more may follow).
_POSITIONAL: dict[str, tuple[tuple[str, ...], bool]] = {
    "create": (("id",), False), "run": (("id",), False), "start": (("id",), False), "state": (("id",), False),
    "kill": (("id",), True), "delete": (("id",), False), "exec": (("id",), True), "pause": (("id",), False),
    "resume": (("id",), False), "ps": (("id",), True), "list": ((), False), "spec": ((), False),
    "events": (("id",), False), "update": (("id",), False),
}

_USAGE = """usage: berth-runtime [--root DIR] [--log FILE] [--log-format text|json] [--debug] COMMAND ...

  create [--bundle DIR] [--pid-file F] [--console-socket S] [--no-pivot] [--no-new-keyring] [--preserve-fds N] ID
  run [-d] (the options of create) ID      start ID      state ID      pause ID      resume ID
  kill [--all] ID [SIGNAL]                  delete [--force] ID
  exec [--process F | ARGS...] [-d] [--pid-file F] [--console-socket S] [--tty] [--cwd DIR] [--env K=V]...
       [--user UID[:GID]] [--additional-gids GID]... [--cap CAP]... [--no-new-privs] ID [ARGS...]
  ps [--format table|json] ID [PS-ARGS...]  list [-q] [--format table|json]   spec [--bundle DIR]
  events [--stats] [--interval 5s] ID       update [--resources FILE|-] [--memory N] [--pids-limit N] ... ID
  --version
"""


class _Args:
    """Parsed options: attribute access to the destinations, None when not given."""

    def __init__(self, values: dict[str, Any]) -> None:
        self.values = values

    def get(self, name: str, default: Any = None) -> Any:
        value = self.values.get(name)
        return default if value is None else value


def _parse(argv: list[str], table: dict[str, _Option]) -> tuple[dict[str, Any], list[str]]:
    """Options from ``table`` up to the first non-option; the rest is returned as positionals."""
    values: dict[str, Any] = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            return values, argv[i + 1:]
        if not arg.startswith("-") or arg == "-":
            break
        name, has_inline, inline = arg.partition("=")
        if name not in table and not name.startswith("--") and len(name) > 2:
            name, inline, has_inline = name[:2], name[2:], "="  # -ifoo: short option with a value
        if name not in table:
            raise InvalidArgument(f"unknown option {arg}")
        dest, takes_value, repeatable = table[name]
        if takes_value:
            if not has_inline:
                i += 1
                if i >= len(argv):
                    raise InvalidArgument(f"option {name} needs a value")
                inline = argv[i]
            value: Any = inline
        else:
            value = inline.lower() not in ("false", "0") if has_inline else True
        if repeatable:
            values.setdefault(dest, []).append(value)
        else:
            values[dest] = value
        i += 1
    return values, argv[i:]


class _Log:
    """Where errors and debug lines go besides stderr."""

    def __init__(self, path: str | None, fmt: str, debug: bool) -> None:
        if fmt not in ("text", "json"):
            raise InvalidArgument(f"--log-format must be text or json, not {fmt!r}")
        self.path, self.fmt, self.debug_enabled = path, fmt, debug

    def write(self, level: str, message: str) -> None:
        if not self.path:
            return
        now = time.time()
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1e9):09d}Z"
        if self.fmt == "json":
            line = quickjson.dumps({"level": level, "msg": message, "time": stamp})
        else:
            line = f'time="{stamp}" level={level} msg={quickjson.dumps(message)}'
        try:
            with open(self.path, "a") as f:
                f.write(line + "\n")
        except OSError:
            pass

    def debug(self, message: str) -> None:
        if self.debug_enabled:
            self.write("debug", message)
            sys.stderr.write(f"berth-runtime: debug: {message}\n")

    def warn(self, message: str) -> None:
        self.write("warning", message)
        sys.stderr.write(f"berth-runtime: warning: {message}\n")


def _signal_number(text: str) -> int:
    try:
        return signals.number(text)
    except ValueError as exc:
        raise InvalidArgument(str(exc)) from None


def _size(text: str) -> int:
    """A byte count: a number with an optional k, m, g or t suffix (-1 for unlimited)."""
    text = text.strip().lower().removesuffix("b")
    scale = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}.get(text[-1:], 1)
    try:
        return int(text[:-1] if scale != 1 else text) * scale
    except ValueError:
        raise InvalidArgument(f"bad size {text!r}") from None


def _integer(text: str, what: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise InvalidArgument(f"{what} must be an integer, not {text!r}") from None


def _exec_process(args: _Args, rest: list[str], root: str, container_id: str) -> dict[str, Any]:
    """The process of ``exec``: from --process, or the container's process with the command line's."""
    if args.get("process"):
        from berth.runtimes.builtin.bundle import load_process

        return load_process(args.get("process"))
    if not rest:
        raise InvalidArgument("exec needs --process FILE or a command to run")
    base = dict(Container.load(root, container_id).spec.get("process") or {})
    process: dict[str, Any] = {key: base[key] for key in ("env", "cwd", "user", "capabilities", "noNewPrivileges",
                                                          "rlimits", "apparmorProfile", "oomScoreAdj") if key in base}
    process["args"] = rest
    process["terminal"] = bool(args.get("tty"))
    if args.get("cwd"):
        process["cwd"] = args.get("cwd")
    env = list(process.get("env") or [])
    for entry in args.get("env", []):
        key = entry.partition("=")[0]
        env = [e for e in env if e.partition("=")[0] != key] + [entry]
    process["env"] = env
    user = dict(process.get("user") or {})
    if args.get("user"):
        uid, _, gid = args.get("user").partition(":")
        user["uid"] = _integer(uid, "--user uid")
        user["gid"] = _integer(gid, "--user gid") if gid else 0
    if args.get("gids"):
        user["additionalGids"] = [_integer(g, "--additional-gids") for g in args.get("gids")]
    process["user"] = user
    if args.get("caps"):
        caps = {kind: list(values) for kind, values in (process.get("capabilities") or {}).items()}
        for cap in args.get("caps"):
            for kind in ("bounding", "effective", "permitted", "inheritable", "ambient"):
                caps.setdefault(kind, []).append(cap)
        process["capabilities"] = caps
    if args.get("no_new_privs"):
        process["noNewPrivileges"] = True
    return process


def _update_resources(args: _Args) -> dict[str, Any]:
    if args.get("resources"):
        source = args.get("resources")
        try:
            raw = sys.stdin.read() if source == "-" else open(source).read()  # noqa: SIM115
            given = quickjson.loads(raw)
        except (OSError, ValueError) as exc:
            raise InvalidArgument(f"--resources {source}: {exc}") from None
        if not isinstance(given, dict):
            raise InvalidArgument("--resources must hold a JSON object (linux.resources)")
        return given
    resources: dict[str, Any] = {}
    memory = {key: _size(args.get(flag)) for key, flag in (("limit", "memory"), ("swap", "memory_swap"),
                                                          ("reservation", "memory_reservation")) if args.get(flag)}
    if memory:
        resources["memory"] = memory
    cpu: dict[str, Any] = {key: _integer(args.get(flag), flag) for key, flag in
                           (("shares", "cpu_shares"), ("quota", "cpu_quota"), ("period", "cpu_period"))
                           if args.get(flag)}
    cpu.update({key: args.get(flag) for key, flag in (("cpus", "cpuset_cpus"), ("mems", "cpuset_mems"))
                if args.get(flag)})
    if cpu:
        resources["cpu"] = cpu
    if args.get("pids_limit"):
        resources["pids"] = {"limit": _integer(args.get("pids_limit"), "--pids-limit")}
    if args.get("blkio_weight"):
        resources["blockIO"] = {"weight": _integer(args.get("blkio_weight"), "--blkio-weight")}
    return resources


def _print_json(value: Any) -> None:
    sys.stdout.write(quickjson.dumps(value, indent=2) + "\n")


def _ps_table(pids: list[int], ps_args: list[str]) -> int:
    import subprocess

    result = subprocess.run(["ps", *(ps_args or ["-ef"])], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise InvalidArgument(f"ps failed: {result.stderr.strip()}")
    lines = result.stdout.splitlines()
    if not lines:
        return 0
    header = lines[0].split()
    if "PID" not in header:
        raise InvalidArgument("ps output has no PID column")
    column = header.index("PID")
    wanted = {str(pid) for pid in pids}
    sys.stdout.write("\n".join([lines[0], *(ln for ln in lines[1:] if ln.split()[column:column + 1] and
                                              ln.split()[column] in wanted)]) + "\n")
    return 0


def _list(root: str, args: _Args) -> int:
    from berth.runtimes.builtin import container as ops

    containers = ops.list_containers(root)
    if args.get("quiet"):
        sys.stdout.write("".join(c["id"] + "\n" for c in containers))
    elif args.get("format", "table") == "json":
        sys.stdout.write(quickjson.dumps(containers) + "\n")
    else:
        rows = [("ID", "PID", "STATUS", "BUNDLE", "CREATED", "OWNER")]
        rows += [(c["id"], str(c["pid"]), c["status"], c["bundle"], c["created"], c["owner"] or "root")
                 for c in containers]
        widths = [max(len(row[i]) for row in rows) for i in range(6)]
        for row in rows:
            sys.stdout.write("   ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
                             + "\n")
    return 0


def _events(root: str, container_id: str, args: _Args) -> int:
    from berth.runtimes.builtin import container as ops

    if args.get("stats"):
        _print_json({"type": "stats", "id": container_id, "data": ops.stats(container_id, root)})
        return 0
    interval_text = str(args.get("interval", "5s"))
    try:
        interval = float(interval_text.removesuffix("ms")) / 1000 if interval_text.endswith("ms") else \
            float(interval_text.removesuffix("s"))
    except ValueError:
        raise InvalidArgument(f"bad --interval {interval_text!r}") from None
    while ops.state(container_id, root)["status"] != "stopped":
        sample = {"type": "stats", "id": container_id, "data": ops.stats(container_id, root)}
        sys.stdout.write(quickjson.dumps(sample) + "\n")
        sys.stdout.flush()
        time.sleep(interval)
    return 0


def _run(argv: list[str], log: _Log, root: str) -> int:
    if not argv:
        sys.stderr.write(_USAGE)
        return 1
    command, argv = argv[0], argv[1:]
    table = _COMMANDS.get(command)
    if table is None:
        raise InvalidArgument(f"unknown command {command!r} (see berth-runtime --help)")
    values, rest = _parse(argv, table)
    args = _Args(values)
    names, more = _POSITIONAL[command]
    if len(rest) < len(names):
        raise InvalidArgument(f"{command} needs {' '.join(n.upper() for n in names)}")
    if len(rest) > len(names) and not more:
        raise InvalidArgument(f"{command}: unexpected arguments {' '.join(rest[len(names):])}")
    container_id = rest[0] if names else ""
    extra = rest[len(names):]
    log.debug(f"{command} {' '.join(argv)}")
    from berth.runtimes.builtin import container as ops

    preserve = _integer(args.get("preserve_fds", "0"), "--preserve-fds")
    if command == "create":
        ops.create(args.get("bundle", "."), container_id, root, pid_file=args.get("pid_file"),
                   console_socket=args.get("console_socket"), no_pivot=bool(args.get("no_pivot")),
                   no_new_keyring=bool(args.get("no_new_keyring")), preserve_fds=preserve)
    elif command == "run":
        status = ops.run(args.get("bundle", "."), container_id, root, detach=bool(args.get("detach")),
                         pid_file=args.get("pid_file"), console_socket=args.get("console_socket"),
                         no_pivot=bool(args.get("no_pivot")), no_new_keyring=bool(args.get("no_new_keyring")),
                         preserve_fds=preserve, warn=log.warn)
        return 0 if args.get("detach") else status
    elif command == "start":
        ops.start(container_id, root, warn=log.warn)
    elif command == "state":
        _print_json(ops.state(container_id, root))
    elif command == "kill":
        if len(extra) > 1:
            raise InvalidArgument("kill takes ID [SIGNAL]")
        ops.kill(container_id, _signal_number(extra[0] if extra else "SIGTERM"), root,
                 all_processes=bool(args.get("all")))
    elif command == "delete":
        ops.delete(container_id, root, force=bool(args.get("force")), warn=log.warn)
    elif command == "exec":
        process = _exec_process(args, extra, root, container_id)
        status = ops.exec_process(container_id, process, root, detach=bool(args.get("detach")),
                                  pid_file=args.get("pid_file"), console_socket=args.get("console_socket"),
                                  preserve_fds=preserve)
        return 0 if args.get("detach") else status
    elif command == "pause":
        ops.pause(container_id, root)
    elif command == "resume":
        ops.resume(container_id, root)
    elif command == "ps":
        pids = ops.pids(container_id, root)
        if args.get("format", "table") == "json":
            sys.stdout.write(quickjson.dumps(pids) + "\n")
            return 0
        return _ps_table(pids, extra)
    elif command == "list":
        return _list(root, args)
    elif command == "spec":
        from berth.runtimes.builtin.defaults import write_default_spec

        write_default_spec(args.get("bundle", "."), rootless=bool(args.get("rootless")))
    elif command == "events":
        return _events(root, container_id, args)
    elif command == "update":
        ops.update(container_id, _update_resources(args), root)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run one command; return the exit status (the container's for a foreground run or exec)."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] in (["--version"], ["-v"], ["version"]):
        sys.stdout.write(f"berth-runtime version {VERSION}\nspec: {OCI_VERSION}\n")
        return 0
    if argv[:1] in (["--help"], ["-h"], ["help"]):
        sys.stdout.write(_USAGE)
        return 0
    log = _Log(None, "text", False)
    try:
        values, rest = _parse(argv, _GLOBAL)
        log = _Log(values.get("log"), values.get("log_format", "text"), bool(values.get("debug")))
        if values.get("systemd_cgroup"):
            raise InvalidArgument("--systemd-cgroup is not supported: berth-runtime manages cgroups itself (cgroupfs)")
        return _run(rest, log, values.get("root") or DEFAULT_ROOT)
    except BerthError as exc:
        log.write("error", exc.message)
        sys.stderr.write(f"berth-runtime: {exc.message}\n")
        return 1
    except OSError as exc:
        message = f"{exc.strerror or exc}" + (f": {exc.filename}" if exc.filename else "")
        log.write("error", message)
        sys.stderr.write(f"berth-runtime: {message}\n")
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
