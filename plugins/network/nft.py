"""berth's nftables table (``ip berth``) through libnftables' JSON interface (``nft -j``).

Chains: ``prerouting``/``output`` (nat: published ports are DNATed to the container), ``postrouting``
(nat: connections from 127.0.0.0/8 to a published port are masqueraded, so the container can answer;
outbound NAT for networks that ask for it), ``forward`` (filter: one berth bridge never forwards to
another). Every rule carries a comment naming its owner (``berth <instance> <namespace>/<container>``,
``berth-bridge <bridge>`` or ``berth-nat <bridge>``), by which it is found again and deleted.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterable
from typing import Any

import trio

from berth.core.errdefs import Internal
from berth.core.network import PortMapping

TABLE = {"family": "ip", "table": "berth"}
#: nft processes at a time (50 containers started at once need not fork 50 of them).
_LIMIT = trio.CapacityLimiter(4)
_CHAINS = (("prerouting", "nat", "prerouting", -100), ("output", "nat", "output", -100),
           ("postrouting", "nat", "postrouting", 100), ("forward", "filter", "forward", 0))


async def run(commands: list[dict[str, Any]]) -> dict[str, Any]:
    """Apply ``commands`` (one transaction) and return nft's JSON answer.

    Raises: Internal with nft's message.
    """
    async with _LIMIT:
        result = await trio.run_process(["nft", "-j", "-f", "-"], stdin=json.dumps({"nftables": commands}).encode(),
                                        capture_stdout=True, capture_stderr=True, check=False)
    if result.returncode != 0:
        raise Internal(f"nft refused the rules: {result.stderr.decode(errors='replace').strip()}")
    return json.loads(result.stdout) if result.stdout.strip() else {}


async def ensure_table() -> None:
    commands: list[dict[str, Any]] = [{"add": {"table": {"family": "ip", "name": "berth"}}}]
    for name, kind, hook, priority in _CHAINS:
        commands.append({"add": {"chain": {**TABLE, "name": name, "type": kind, "hook": hook, "prio": priority,
                                           "policy": "accept"}}})
    commands.append({"add": {"set": {**TABLE, "name": "bridges", "type": "ifname"}}})
    await run(commands)


def _match(left: dict[str, Any], right: Any, op: str = "==") -> dict[str, Any]:
    return {"match": {"op": op, "left": left, "right": right}}


def _port(protocol: str, field: str) -> dict[str, Any]:
    return {"payload": {"protocol": protocol, "field": field}}


def _rule(chain: str, comment: str, expr: list[dict[str, Any]]) -> dict[str, Any]:
    return {"add": {"rule": {**TABLE, "chain": chain, "comment": comment, "expr": expr}}}


async def publish(owner: str, container_ip: str, ports: list[PortMapping]) -> None:
    """DNAT each published port to ``container_ip`` (from this host, and from outside when the host IP
    is not loopback)."""
    commands = []
    for port in ports:
        if port.host_ip in ("0.0.0.0", ""):
            destination = _match({"fib": {"result": "type", "flags": ["daddr"]}}, "local")
        else:
            destination = _match({"payload": {"protocol": "ip", "field": "daddr"}}, port.host_ip)
        dnat = [destination, _match(_port(port.protocol, "dport"), port.host_port),
                {"dnat": {"addr": container_ip, "port": port.container_port}}]
        commands.append(_rule("output", owner, dnat))
        if not port.host_ip.startswith("127."):
            commands.append(_rule("prerouting", owner, dnat))
        commands.append(_rule("postrouting", owner, [
            _match({"payload": {"protocol": "ip", "field": "saddr"}}, {"prefix": {"addr": "127.0.0.0", "len": 8}}),
            _match({"payload": {"protocol": "ip", "field": "daddr"}}, container_ip),
            _match(_port(port.protocol, "dport"), port.container_port), {"masquerade": None}]))
    if commands:
        await run(commands)


async def isolate(bridge: str, subnet: str, nat: bool) -> None:
    """Keep ``bridge`` from forwarding to any other berth bridge; masquerade its outbound traffic if ``nat``.
    Rules that are there already are not added again."""
    present = {str(rule.get("comment", "")) for rule in await rules()}
    commands: list[dict[str, Any]] = [{"add": {"element": {**TABLE, "name": "bridges", "elem": [bridge]}}}]
    if f"berth-bridge {bridge}" not in present:
        commands.append(_rule("forward", f"berth-bridge {bridge}", [
            _match({"meta": {"key": "iifname"}}, bridge), _match({"meta": {"key": "oifname"}}, "@bridges"),
            _match({"meta": {"key": "oifname"}}, bridge, "!="), {"drop": None}]))
    if nat and f"berth-nat {bridge}" not in present:
        address, length = subnet.split("/")
        commands.append(_rule("postrouting", f"berth-nat {bridge}", [
            _match({"payload": {"protocol": "ip", "field": "saddr"}},
                   {"prefix": {"addr": address, "len": int(length)}}),
            _match({"meta": {"key": "oifname"}}, bridge, "!="), {"masquerade": None}]))
    await run(commands)


async def forget_bridge(bridge: str) -> None:
    """Remove ``bridge``'s isolation and NAT rules and its element of the bridge set."""
    await remove({f"berth-bridge {bridge}", f"berth-nat {bridge}"}, [bridge])


async def rules() -> list[dict[str, Any]]:
    """Every rule of the table (with ``chain``, ``handle`` and ``comment``)."""
    async with _LIMIT:
        result = await trio.run_process(["nft", "-j", "-a", "list", "table", "ip", "berth"], capture_stdout=True,
                                        capture_stderr=True, check=False)
    if result.returncode != 0:
        return []
    return [item["rule"] for item in json.loads(result.stdout).get("nftables", []) if "rule" in item]


async def remove(owners: set[str], bridges: Iterable[str] = ()) -> None:
    """Delete every rule whose comment is in ``owners``, and ``bridges`` from the bridge set."""
    commands: list[dict[str, Any]] = [
        {"delete": {"rule": {**TABLE, "chain": rule["chain"], "handle": rule["handle"]}}}
        for rule in await rules() if rule.get("comment") in owners]
    if commands:
        await run(commands)
    for bridge in bridges:
        with contextlib.suppress(Internal):  # not in the set
            await run([{"delete": {"element": {**TABLE, "name": "bridges", "elem": [bridge]}}}])


async def remove_table_if_unused() -> bool:
    """Delete berth's table when it holds no rule and no bridge (nobody on this host uses it); whether it did."""
    async with _LIMIT:
        result = await trio.run_process(["nft", "-j", "list", "table", "ip", "berth"], capture_stdout=True,
                                        capture_stderr=True, check=False)
    if result.returncode != 0:
        return False
    items = json.loads(result.stdout).get("nftables", [])
    if any("rule" in item or ("set" in item and item["set"].get("elem")) for item in items):
        return False
    with contextlib.suppress(Internal):  # someone added to it meanwhile, or removed it
        await run([{"delete": {"table": {"family": "ip", "name": "berth"}}}])
        return True
    return False
