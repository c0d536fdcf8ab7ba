"""The ``berthd`` command: load the plugins and the config, then run the daemon in the foreground.

::

    berthd [--config PATH] [--root DIR] [--state DIR] [--address SOCK] [--log-level L] [--log-format F]
    berthd config default|dump [--config PATH]
    berthd --version

Exit status: 0 after a clean shutdown, 1 when the daemon cannot start, 2 for a bad config or command
line.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import tomli_w
import trio

from berth.core import __version__
from berth.core.config import ConfigError, LoadedConfig, default_config_document, load_config
from berth.core.daemon import Daemon, run_daemon
from berth.core.errdefs import BerthError
from berth.core.log import configure_logging
from berth.core.plugin import load_plugins
from berth.core.plugin.manager import LoadedModules
from berth.plugins.builtins import BUILTIN_PLUGINS


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="berthd", description="berth's container runtime daemon")
    parser.add_argument("--version", action="version", version=f"berthd {__version__}")
    parser.add_argument("--config", "-c", type=Path, help="config file (default /etc/berth/config.toml if present)")
    parser.add_argument("--root", help="persistent state directory (overrides root)")
    parser.add_argument("--state", help="volatile state directory (overrides state)")
    parser.add_argument("--address", "-a", help="RPC socket path (overrides rpc.address)")
    parser.add_argument("--log-level", "-l", choices=["debug", "info", "warn", "error"], help="overrides log.level")
    parser.add_argument("--log-format", choices=["console", "json"], help="overrides log.format")
    sub = parser.add_subparsers(dest="command")
    config = sub.add_parser("config", help="print the default or the effective config")
    config.add_argument("action", choices=["default", "dump"])
    config.add_argument("--config", "-c", type=Path, default=argparse.SUPPRESS, help="config file to dump")
    return parser


def _overrides(args: argparse.Namespace) -> dict[tuple[str, ...], Any]:
    overrides: dict[tuple[str, ...], Any] = {}
    for option, path in (("root", ("root",)), ("state", ("state",)), ("address", ("rpc", "address")),
                         ("log_level", ("log", "level")), ("log_format", ("log", "format"))):
        value = getattr(args, option)
        if value is not None:
            overrides[path] = str(Path(value).absolute()) if option in ("root", "state", "address") else value
    return overrides


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    modules: LoadedModules = load_plugins(BUILTIN_PLUGINS)
    registrations = list(modules.registry)
    if args.command == "config" and args.action == "default":
        sys.stdout.write(tomli_w.dumps(default_config_document(registrations)))
        return 0
    try:
        loaded: LoadedConfig = load_config(args.config, registrations, overrides=_overrides(args))
    except ConfigError as err:
        print(f"berthd: {err}", file=sys.stderr)
        return 2
    if args.command == "config":
        sys.stdout.write(tomli_w.dumps(loaded.effective_document()))
        return 0
    configure_logging(loaded.config.log.level, loaded.config.log.format)
    daemon = Daemon(loaded, registrations, modules.errors, hooks=modules.manager)
    try:
        trio.run(run_daemon, daemon)
    except (BerthError, BaseExceptionGroup) as caught:
        # trio's nurseries wrap the StartupError in exception groups: unwrap a lone BerthError.
        cause: BaseException = caught
        while isinstance(cause, BaseExceptionGroup) and len(cause.exceptions) == 1:
            cause = cause.exceptions[0]
        if not isinstance(cause, BerthError):
            raise
        print(f"berthd: cannot start: {cause}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
