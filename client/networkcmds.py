"""``berth network ls|create|rm|inspect``: the networks of the daemon's network plugin."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

from berth.client.sync import Client


def cmd_network_ls(client: Client, args: argparse.Namespace) -> None:
    from berth.client.cli import _print_json, _print_table

    networks = client.call("network.list", {})["networks"]
    if args.quiet:
        sys.stdout.writelines(n["name"] + "\n" for n in networks)
    elif args.format == "json":
        _print_json(networks)
    else:
        _print_table(["NETWORK", "DRIVER", "SUBNET", "GATEWAY", "BRIDGE", "CONTAINERS"],
                     [[n["name"], n["driver"], n["subnet"], n["gateway"], n["bridge"], str(len(n["containers"]))]
                      for n in networks])


def cmd_network_create(client: Client, args: argparse.Namespace) -> None:
    from berth.client.cli import _parse_labels

    client.call("network.create", {"name": args.name, "subnet": args.subnet, "gateway": args.gateway,
                                   "mtu": args.mtu, "nat": args.nat, "labels": _parse_labels(args.label)})
    sys.stdout.write(args.name + "\n")


def cmd_network_rm(client: Client, args: argparse.Namespace) -> None:
    from berth.client.cli import _remove_each

    _remove_each(args.names, lambda name: client.call("network.remove", {"name": name}))


def cmd_network_inspect(client: Client, args: argparse.Namespace) -> None:
    from berth.client.cli import _print_json

    _print_json(client.call("network.inspect", {"name": args.name})["network"])


def add_commands(commands: Any, add: Callable[..., argparse.ArgumentParser], want: Callable[..., bool]) -> None:
    """Add ``network`` to ``commands`` (see ``client.cli._parser``)."""
    network = commands.add_parser("network", aliases=["networks", "net"], help="manage container networks")
    if want("network", "networks", "net"):
        sub = network.add_subparsers(dest="action", metavar="ACTION", required=True)
        ls = add(sub, "ls", cmd_network_ls, "list networks", ["list"])
        ls.add_argument("--quiet", "-q", action="store_true")
        ls.add_argument("--format", choices=["table", "json"], default="table")
        create = add(sub, "create", cmd_network_create, "make a bridged network")
        create.add_argument("--subnet", required=True, help="its address range, e.g. 10.89.0.0/24")
        create.add_argument("--gateway", default="", help="default: the range's first address")
        create.add_argument("--mtu", type=int, default=0)
        create.add_argument("--nat", action="store_true", help="masquerade its traffic out of this host")
        create.add_argument("--label", action="append", default=[], metavar="KEY=VALUE")
        create.add_argument("name")
        rm = add(sub, "rm", cmd_network_rm, "remove networks no container uses", ["remove", "delete"])
        rm.add_argument("names", nargs="+", metavar="NAME")
        inspect = add(sub, "inspect", cmd_network_inspect, "print a network as JSON", ["info"])
        inspect.add_argument("name")
