"""The ``berth`` command, shaped like containerd's ``ctr``.

::

    berth [--address SOCK] [--namespace NS] [--timeout SECONDS] <command>
        version
        plugins ls [-d] [--format table|json] [FILTER...]
        namespaces ls [-q] [--format table|json] | create NAME [KEY=VALUE...] | rm NAME... |
                   label NAME [KEY=VALUE...]
        events [--format json] [FILTER...]

``BERTH_ADDRESS`` and ``BERTH_NAMESPACE`` set the defaults of ``--address`` and ``--namespace``.
Errors are one line on stderr and exit status 1 (2 for a bad command line).

Start-up cost matters here: this module imports only argparse, the sync client and core's errors
(JSON is imported when ``--format json`` asks for it).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from berth.client.sync import Client, default_address, default_namespace
from berth.core import __version__
from berth.core.errdefs import BerthError, InvalidArgument


def _print_json(value: Any) -> None:
    import json

    json.dump(value, sys.stdout, indent=2, sort_keys=True, default=str)
    sys.stdout.write("\n")


def _print_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    widths = [len(h) for h in header]
    for row in rows:
        widths = [max(w, len(cell)) for w, cell in zip(widths, row, strict=True)]
    for row in (header, *rows):
        line = "    ".join(cell.ljust(w) for w, cell in zip(widths, row, strict=True))
        sys.stdout.write(line.rstrip() + "\n")


def _parse_labels(items: Sequence[str]) -> dict[str, str]:
    labels = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not key or not sep:
            raise InvalidArgument(f"label {item!r} must be KEY=VALUE")
        labels[key] = value
    return labels


def _format_labels(labels: dict[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(labels.items())) or "-"


# ---------------------------------------------------------------------------------------- commands


def cmd_version(client: Client, args: argparse.Namespace) -> None:
    sys.stdout.write(f"Client:\n  Version:  {__version__}\n  Python:   {sys.version.split()[0]}\n\n")
    info = client.server()
    sys.stdout.write(f"Server:\n  Version:  {info['version']}\n  Revision: {info['revision'] or '-'}\n"
                     f"  UUID:     {info['uuid']}\n  PID:      {info['pid']}\n")


def cmd_plugins_ls(client: Client, args: argparse.Namespace) -> None:
    plugins = client.plugins(args.filters)
    if args.format == "json":
        _print_json(plugins)
        return
    if not args.detailed:
        _print_table(["TYPE", "ID", "PLATFORMS", "STATUS"],
                     [[p["type"], p["id"], ",".join(p["platforms"]) or "-", p["status"]] for p in plugins])
        return
    for plugin in plugins:
        sys.stdout.write(f"Type:          {plugin['type']}\nID:            {plugin['id']}\n")
        sys.stdout.write(f"Requires:      {', '.join(plugin['requires']) or '-'}\n")
        sys.stdout.write(f"Status:        {plugin['status']}\n")
        if plugin["capabilities"]:
            sys.stdout.write(f"Capabilities:  {', '.join(plugin['capabilities'])}\n")
        if plugin["exports"]:
            sys.stdout.write("Exports:\n")
            for key, value in sorted(plugin["exports"].items()):
                sys.stdout.write(f"               {key}  {value}\n")
        if plugin["error"]:
            sys.stdout.write(f"Error:\n               Code: {plugin['error']['code']}\n"
                             f"               Message: {plugin['error']['message']}\n")
        sys.stdout.write("\n")


def cmd_namespaces_ls(client: Client, args: argparse.Namespace) -> None:
    namespaces = client.namespace_list(args.filters)
    if args.quiet:
        for namespace in namespaces:
            sys.stdout.write(namespace["name"] + "\n")
    elif args.format == "json":
        _print_json(namespaces)
    else:
        _print_table(["NAME", "LABELS"], [[n["name"], _format_labels(n["labels"])] for n in namespaces])


def cmd_namespaces_create(client: Client, args: argparse.Namespace) -> None:
    client.namespace_create(args.name, _parse_labels(args.labels))


def cmd_namespaces_rm(client: Client, args: argparse.Namespace) -> None:
    failed = None
    for name in args.names:
        try:
            client.namespace_delete(name)
            sys.stdout.write(name + "\n")
        except BerthError as err:
            sys.stderr.write(f"berth: {err}\n")
            failed = err
    if failed is not None:
        raise SystemExit(1)


def cmd_namespaces_label(client: Client, args: argparse.Namespace) -> None:
    labels = _parse_labels(args.labels)
    namespace = client.namespace_update(args.name, labels, [f"labels.{key}" for key in labels])
    sys.stdout.write(_format_labels(namespace["labels"]) + "\n")


def cmd_events(client: Client, args: argparse.Namespace) -> None:
    for envelope in client.subscribe(args.filters):
        if args.format == "json":
            import json

            sys.stdout.write(json.dumps(envelope, sort_keys=True, default=str) + "\n")
        else:
            stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(envelope["timestamp"]))
            fraction = f"{envelope['timestamp'] % 1:.9f}"[1:]
            event = " ".join(f"{k}={v}" for k, v in sorted(envelope["event"].items()))
            dropped = f" (dropped {envelope['dropped']} before this)" if envelope.get("dropped") else ""
            sys.stdout.write(f"{stamp}{fraction} +0000 UTC {envelope['namespace']} {envelope['topic']} "
                             f"{event}{dropped}\n")
        sys.stdout.flush()


# ---------------------------------------------------------------------------------------- parser


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="berth", description="talk to berthd, berth's container daemon")
    parser.add_argument("--address", "-a", default=default_address(),
                        help="berthd's socket (env BERTH_ADDRESS; default %(default)s)")
    parser.add_argument("--namespace", "-n", default=default_namespace(),
                        help="namespace to work in (env BERTH_NAMESPACE; default %(default)s)")
    parser.add_argument("--timeout", type=float, default=None, help="seconds each call may take")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def add(sub: Any, name: str, handler: Callable[[Client, argparse.Namespace], None], help_text: str,
            aliases: Sequence[str] = ()) -> argparse.ArgumentParser:
        command: argparse.ArgumentParser = sub.add_parser(name, help=help_text, aliases=list(aliases))
        command.set_defaults(handler=handler)
        return command

    add(commands, "version", cmd_version, "print the client and server versions")

    plugins = commands.add_parser("plugins", aliases=["plugin"], help="plugins the daemon loaded")
    plugins_sub = plugins.add_subparsers(dest="action", metavar="ACTION", required=True)
    ls = add(plugins_sub, "ls", cmd_plugins_ls, "list plugins with their status", ["list"])
    ls.add_argument("--detailed", "-d", action="store_true", help="show exports, capabilities and errors")
    ls.add_argument("--format", choices=["table", "json"], default="table")
    ls.add_argument("filters", nargs="*", metavar="FILTER", help='e.g. type==io.berth.rpc.v1 or status==error')

    namespaces = commands.add_parser("namespaces", aliases=["namespace", "ns"], help="manage namespaces")
    ns_sub = namespaces.add_subparsers(dest="action", metavar="ACTION", required=True)
    ns_ls = add(ns_sub, "ls", cmd_namespaces_ls, "list namespaces", ["list"])
    ns_ls.add_argument("--quiet", "-q", action="store_true", help="print only the names")
    ns_ls.add_argument("--format", choices=["table", "json"], default="table")
    ns_ls.add_argument("filters", nargs="*", metavar="FILTER")
    create = add(ns_sub, "create", cmd_namespaces_create, "create a namespace")
    create.add_argument("name")
    create.add_argument("labels", nargs="*", metavar="KEY=VALUE")
    rm = add(ns_sub, "rm", cmd_namespaces_rm, "remove namespaces", ["remove", "delete"])
    rm.add_argument("names", nargs="+", metavar="NAME")
    label = add(ns_sub, "label", cmd_namespaces_label, "set labels (an empty VALUE removes the label)")
    label.add_argument("name")
    label.add_argument("labels", nargs="*", metavar="KEY=VALUE")

    events = add(commands, "events", cmd_events, "print events as they happen", ["event"])
    events.add_argument("--format", choices=["text", "json"], default="text")
    events.add_argument("filters", nargs="*", metavar="FILTER", help='e.g. topic=="/namespaces/create"')
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    client = Client(args.address, namespace=args.namespace, timeout=args.timeout)
    try:
        args.handler(client, args)
    except BerthError as err:
        sys.stderr.write(f"berth: {err}\n")
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0
    finally:
        client.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
