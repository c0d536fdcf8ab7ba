"""The ``berth`` command, shaped like containerd's ``ctr``.

::

    berth [--address SOCK] [--namespace NS] [--timeout SECONDS] [--lease ID] <command>
        version
        plugins ls [-d] [--format table|json] [FILTER...]
        namespaces ls [-q] [--format table|json] | create NAME [KEY=VALUE...] | rm NAME... |
                   label NAME [KEY=VALUE...]
        content ls [-q] [--format table|json] [FILTER...] | info DIGEST | get DIGEST |
                ingest [--expected-digest D] [--expected-size N] [--label K=V]... REF < FILE |
                rm DIGEST... | label DIGEST [KEY=VALUE...] | active [-q] [--format table|json] [FILTER...]
        leases ls [-q] [--format table|json] [FILTER...] |
               create [--id ID] [--expires DURATION] [--label K=V]... [KEY=VALUE...] | rm [--sync] ID...
        snapshots [--snapshotter S] ls | prepare | view | mounts | commit | rm | info | usage | tree | label
        images ls [-q] [--format table|json] [FILTER...] | rm [--sync] REF... | tag [--force] SRC DST... |
               label REF [KEY=VALUE...] | check [--snapshotter S] [REF...] |
               pull [--plain-http] [--platform P | --all-platforms] [--snapshotter S] [--no-unpack] REF |
               push [--plain-http] REF [DEST] | import [--base-name N] [--no-unpack] FILE | export FILE REF...
        containers ls [-q] [--format table|json] [FILTER...] | info ID | rm [--snapshot-cleanup] ID... |
                   label ID [KEY=VALUE...] | create [RUN OPTIONS] IMAGE ID [CMD...]
        run [--rm] [-d] [-t] [--runtime R] [--snapshotter S] [--env K=V]... [--mount SPEC]... [--cwd D]
            [--user U] [--memory-limit SIZE] [--cpus N] [--pids-limit N] [--read-only] [--privileged]
            [--cap-add C]... [--cap-drop C]... [--seccomp] [--hostname H] [--label K=V]...
            [--net none|host|container:ID|NETWORK] [-p [IP:]HOST:CTR[/PROTO]]... IMAGE ID [CMD...]
        tasks ls | start [-d] [-t] ID | kill [-s SIG] [-a] [--exec-id E] ID | rm [-f] ID... |
              exec --exec-id E [-t] [-d] [--cwd D] [--env K=V] [--user UID[:GID]] ID CMD... | attach ID |
              ps ID | pause ID | resume ID | metrics [--format table|json] ID
        logs [-f] ID
        network ls [-q] [--format table|json] | create --subnet CIDR [--gateway IP] [--mtu N] [--nat] NAME |
                rm NAME... | inspect NAME
        events [--format json] [FILTER...]

``BERTH_ADDRESS`` and ``BERTH_NAMESPACE`` set the defaults of ``--address`` and ``--namespace``;
``--lease`` makes content, snapshot and image commands work under that lease (docs/cli.md has every command).
Errors are one line on stderr, ``berth: <message> (<code>)``, and exit status 1 (2 for a bad command
line).

Start-up cost matters here: this module imports only argparse, the sync client and core's errors
(JSON is imported when ``--format json`` asks for it).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from berth.client import networkcmds, taskcmds
from berth.client.sync import DEFAULT_ADDRESS, DEFAULT_NAMESPACE, Client, default_address, default_namespace
from berth.core import __version__
from berth.core.errdefs import AlreadyExists, BerthError, InvalidArgument, NotFound


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


_SIZE_UNITS = ("B", "kB", "MB", "GB", "TB", "PB", "EB", "ZB", "YB")


def human_size(size: float) -> str:
    """Decimal units with 4 significant digits, as ctr prints sizes (go-units ``HumanSize``)."""
    unit = 0
    while size >= 1000 and unit < len(_SIZE_UNITS) - 1:
        size /= 1000
        unit += 1
    return f"{size:.4g}{_SIZE_UNITS[unit]}"


def human_duration(seconds: float) -> str:
    """How long ago, in ctr's words (go-units ``HumanDuration``): ``5 seconds``, ``About an hour``."""
    if seconds < 1:
        return "Less than a second"
    if int(seconds) == 1:
        return "1 second"
    if seconds < 60:
        return f"{int(seconds)} seconds"
    minutes = int(seconds / 60)
    if minutes == 1:
        return "About a minute"
    if minutes < 60:
        return f"{minutes} minutes"
    hours = int(seconds / 3600 + 0.5)
    if hours == 1:
        return "About an hour"
    if hours < 48:
        return f"{hours} hours"
    if hours < 24 * 7 * 2:
        return f"{hours // 24} days"
    if hours < 24 * 30 * 2:
        return f"{hours // 24 // 7} weeks"
    if hours < 24 * 365 * 2:
        return f"{hours // 24 // 30} months"
    return f"{int(seconds / 3600) // 24 // 365} years"


_DURATION_PART = r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)"  # compiled on first use
_DURATION_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(text: str) -> float:
    """A Go duration (``24h``, ``1h30m``, ``90s``, ``500ms``; ``0`` is zero) in seconds."""
    if text == "0":
        return 0.0
    seconds, position = 0.0, 0
    for match in re.finditer(_DURATION_PART, text):
        if match.start() != position:
            break
        seconds += float(match.group(1)) * _DURATION_UNITS[match.group(2)]
        position = match.end()
    if not text or position != len(text):
        raise argparse.ArgumentTypeError(f"invalid duration {text!r} (e.g. 24h, 1h30m, 90s)")
    return seconds


def _local_time(timestamp: float) -> str:
    """RFC 3339 in local time, as ctr prints creation times."""
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(timestamp))
    return f"{stamp[:-2]}:{stamp[-2:]}"


def _remove_each(names: Sequence[str], remove: Callable[[str], None]) -> None:
    """Run ``remove`` on each name: print the ones removed, one error line for each failure, exit 1 if any."""
    failed = False
    for name in names:
        try:
            remove(name)
            sys.stdout.write(name + "\n")
        except BerthError as err:
            sys.stderr.write(f"berth: {_describe(err)}\n")
            failed = True
    if failed:
        raise SystemExit(1)


def _describe(err: BerthError) -> str:
    return f"{err} ({err.code})"


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
    _remove_each(args.names, client.namespace_delete)


def cmd_namespaces_label(client: Client, args: argparse.Namespace) -> None:
    labels = _parse_labels(args.labels)
    namespace = client.namespace_update(args.name, labels, [f"labels.{key}" for key in labels])
    sys.stdout.write(_format_labels(namespace["labels"]) + "\n")


def cmd_content_ls(client: Client, args: argparse.Namespace) -> None:
    infos = client.content_list(args.filters, lease=args.lease)
    if args.quiet:
        sys.stdout.writelines(info["digest"] + "\n" for info in infos)
    elif args.format == "json":
        _print_json(infos)
    else:
        now = time.time()
        _print_table(["DIGEST", "SIZE", "AGE", "LABELS"],
                     [[i["digest"], human_size(i["size"]), human_duration(now - i["created_at"]),
                       _format_labels(i["labels"])] for i in infos])


def cmd_content_info(client: Client, args: argparse.Namespace) -> None:
    _print_json(client.content_info(args.digest, lease=args.lease))


def cmd_content_get(client: Client, args: argparse.Namespace) -> None:
    out = sys.stdout.buffer
    for data in client.content_read(args.digest, lease=args.lease):
        out.write(data)
    out.flush()


def cmd_content_ingest(client: Client, args: argparse.Namespace) -> None:
    if sys.stdin.isatty():
        raise InvalidArgument("content ingest reads the blob from stdin: redirect a file or a pipe to it")
    result = client.content_ingest(args.ref, sys.stdin.buffer, expected=args.expected_digest,
                                   total=args.expected_size, labels=_parse_labels(args.labels), lease=args.lease)
    sys.stdout.write(result["digest"] + "\n")


def cmd_content_rm(client: Client, args: argparse.Namespace) -> None:
    _remove_each(args.digests, lambda digest: client.content_delete(digest, lease=args.lease))


def cmd_content_label(client: Client, args: argparse.Namespace) -> None:
    labels = _parse_labels(args.labels)
    if not labels:  # no mask would replace every label: show them instead
        info = client.content_info(args.digest, lease=args.lease)
    else:
        info = client.content_update(args.digest, {k: v for k, v in labels.items() if v},
                                     [f"labels.{key}" for key in labels], lease=args.lease)
    sys.stdout.write(_format_labels(info["labels"]) + "\n")


def cmd_content_active(client: Client, args: argparse.Namespace) -> None:
    statuses = client.content_statuses(args.filters, lease=args.lease)
    if args.quiet:
        sys.stdout.writelines(status["ref"] + "\n" for status in statuses)
    elif args.format == "json":
        _print_json(statuses)
    else:
        now = time.time()
        _print_table(["REF", "SIZE/TOTAL", "STARTED", "UPDATED"],
                     [[s["ref"], f"{human_size(s['offset'])}/{human_size(s['total']) if s['total'] else '-'}",
                       human_duration(now - s["started_at"]) + " ago", human_duration(now - s["updated_at"]) + " ago"]
                      for s in statuses])


def cmd_leases_ls(client: Client, args: argparse.Namespace) -> None:
    leases = client.lease_list(args.filters)
    if args.quiet:
        sys.stdout.writelines(lease["id"] + "\n" for lease in leases)
    elif args.format == "json":
        _print_json(leases)
    else:
        _print_table(["ID", "CREATED AT", "LABELS"],
                     [[lease["id"], _local_time(lease["created_at"]), _format_labels(lease["labels"])]
                      for lease in leases])


def cmd_leases_create(client: Client, args: argparse.Namespace) -> None:
    lease_id = args.id or f"{time.time_ns()}-{os.urandom(3).hex()}"  # as ctr's random lease ids
    labels = _parse_labels([*args.labels, *args.label_args])
    lease = client.lease_create(lease_id, labels, args.expires or None)
    sys.stdout.write(lease["id"] + "\n")


def cmd_leases_rm(client: Client, args: argparse.Namespace) -> None:
    _remove_each(args.ids, lambda lease_id: client.lease_delete(lease_id, sync=args.sync))


def _snapshot_call(client: Client, args: argparse.Namespace, method: str, **fields: Any) -> Any:
    return client.call(f"snapshots.{method}", {"snapshotter": args.snapshotter, **fields}, lease=args.lease)


def _print_mounts(mounts: list[dict[str, Any]], target: str) -> None:
    """As ctr: one ``mount`` command per mount, ready to paste."""
    for m in mounts:
        options = f" -o {','.join(m['options'])}" if m["options"] else ""
        where = f"{target.rstrip('/')}/{m['target'].lstrip('/')}" if m.get("target") else target
        sys.stdout.write(f"mount -t {m['type']} {m['source']} {where}{options}\n")


def cmd_snapshots_ls(client: Client, args: argparse.Namespace) -> None:
    infos = _snapshot_call(client, args, "list", filters=args.filters)["infos"]
    if args.format == "json":
        _print_json(infos)
    else:
        _print_table(["KEY", "PARENT", "KIND"], [[i["name"], i["parent"], i["kind"]] for i in infos])


def cmd_snapshots_prepare(client: Client, args: argparse.Namespace) -> None:
    mounts = _snapshot_call(client, args, "prepare", key=args.key, parent=args.parent,
                            labels=_parse_labels(args.labels))["mounts"]
    if args.mounts:
        _print_mounts(mounts, args.target or args.key)


def cmd_snapshots_view(client: Client, args: argparse.Namespace) -> None:
    mounts = _snapshot_call(client, args, "view", key=args.key, parent=args.parent,
                            labels=_parse_labels(args.labels))["mounts"]
    if args.mounts:
        _print_mounts(mounts, args.target or args.key)


def cmd_snapshots_mounts(client: Client, args: argparse.Namespace) -> None:
    _print_mounts(_snapshot_call(client, args, "mounts", key=args.key)["mounts"], args.target)


def cmd_snapshots_commit(client: Client, args: argparse.Namespace) -> None:
    _snapshot_call(client, args, "commit", name=args.name, key=args.key, labels=_parse_labels(args.labels))


def cmd_snapshots_rm(client: Client, args: argparse.Namespace) -> None:
    _remove_each(args.keys, lambda key: _snapshot_call(client, args, "remove", key=key))


def cmd_snapshots_info(client: Client, args: argparse.Namespace) -> None:
    _print_json(_snapshot_call(client, args, "stat", key=args.key)["info"])


def cmd_snapshots_usage(client: Client, args: argparse.Namespace) -> None:
    keys = args.keys or [i["name"] for i in _snapshot_call(client, args, "list", filters=[])["infos"]]
    rows = []
    for key in keys:
        usage = _snapshot_call(client, args, "usage", key=key)
        rows.append([key, human_size(usage["size"]), str(usage["inodes"])])
    _print_table(["KEY", "SIZE", "INODES"], rows)


def cmd_snapshots_tree(client: Client, args: argparse.Namespace) -> None:
    infos = _snapshot_call(client, args, "list", filters=[])["infos"]
    children: dict[str, list[str]] = {}
    for info in infos:
        children.setdefault(info["parent"], []).append(info["name"])

    def show(name: str, depth: int) -> None:
        sys.stdout.write("  " * depth + ("\\_ " if depth else "") + name + "\n")
        for child in sorted(children.get(name, [])):
            show(child, depth + 1)

    for root in sorted(children.get("", [])):
        show(root, 0)


def cmd_snapshots_label(client: Client, args: argparse.Namespace) -> None:
    labels = _parse_labels(args.labels)
    info = _snapshot_call(client, args, "update", key=args.key, labels={k: v for k, v in labels.items() if v},
                          update_mask=[f"labels.{key}" for key in labels])["info"]
    sys.stdout.write(_format_labels(info["labels"]) + "\n")


#: Largest index, manifest or config the images commands read (the daemon's limit for configs).
_MAX_DOCUMENT = 16 << 20


def _read_json(client: Client, digest: str, size: int) -> dict[str, Any] | None:
    """The JSON object in blob ``digest``, or ``None`` when the namespace does not have it (or it is no JSON
    object, or bigger than an image document can be)."""
    import json

    if size > _MAX_DOCUMENT:
        return None
    try:
        value = json.loads(b"".join(client.content_read(digest)))
    except NotFound:
        return None
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _image_tree(client: Client, target: dict[str, Any]) -> dict[str, Any]:
    """What the content store holds of an image for the host platform: ``required``/``present`` blob counts
    and bytes (index, manifest, config, layers), ``size`` (config + layers, ``None`` when the manifest is
    missing), ``platforms`` and the ``config`` document (``None`` when missing)."""
    from berth.core.oci import INDEX_MEDIA_TYPES, MANIFEST_MEDIA_TYPES, Platform, host_platform

    tree: dict[str, Any] = {"required": 1, "present": 0, "required_bytes": target["size"], "present_bytes": 0,
                            "size": None, "platforms": [], "config": None}
    desc, document = target, _read_json(client, target["digest"], target["size"])
    try:
        if document is None:
            return tree
        tree["present"] += 1
        tree["present_bytes"] += desc["size"]
        if desc["mediaType"] in INDEX_MEDIA_TYPES:
            manifests = [m for m in document.get("manifests") or [] if m.get("mediaType") in MANIFEST_MEDIA_TYPES]
            platforms = [Platform.from_wire(m["platform"]) if m.get("platform") else None for m in manifests]
            tree["platforms"] = sorted({str(p) for p in platforms if p is not None})
            host = host_platform()
            chosen = [m for m, p in zip(manifests, platforms, strict=True) if p is None or host.matches(p)]
            if not chosen:
                return tree
            desc = chosen[0]
            tree["required"] += 1
            tree["required_bytes"] += desc["size"]
            document = _read_json(client, desc["digest"], desc["size"])
            if document is None:
                return tree
            tree["present"] += 1
            tree["present_bytes"] += desc["size"]
        if desc["mediaType"] not in MANIFEST_MEDIA_TYPES:
            return tree
        blobs = [document["config"], *(document.get("layers") or [])]
        tree["size"] = sum(int(blob["size"]) for blob in blobs)
        for blob in blobs:
            tree["required"] += 1
            tree["required_bytes"] += int(blob["size"])
            try:
                client.content_info(blob["digest"])
            except NotFound:
                continue
            tree["present"] += 1
            tree["present_bytes"] += int(blob["size"])
        config = _read_json(client, document["config"]["digest"], int(document["config"]["size"]))
        tree["config"] = config
        if config is not None and not tree["platforms"] and config.get("os") and config.get("architecture"):
            tree["platforms"] = [str(Platform.from_wire(config))]
    except (KeyError, TypeError, ValueError, InvalidArgument):  # a malformed document: report what was seen
        pass
    return tree


def _unpacked(client: Client, config: dict[str, Any] | None, snapshotter: str) -> bool:
    """Whether the committed snapshot named by the config's top chain ID exists in ``snapshotter``."""
    from berth.core.oci import chain_ids

    rootfs = config.get("rootfs") if config else None
    diff_ids = rootfs.get("diff_ids") if isinstance(rootfs, dict) else None
    if not isinstance(diff_ids, list) or not diff_ids:
        return False
    try:
        top = chain_ids(diff_ids)[-1]
        info = client.call("snapshots.stat", {"snapshotter": snapshotter, "key": top})["info"]
    except (NotFound, InvalidArgument):
        return False
    return bool(info["kind"] == "committed")


def cmd_images_ls(client: Client, args: argparse.Namespace) -> None:
    images = client.images_list(args.filters)
    if args.quiet:
        sys.stdout.writelines(image["name"] + "\n" for image in images)
        return
    if args.format == "json":
        _print_json(images)
        return
    rows = []
    for image in images:
        tree = _image_tree(client, image["target"])
        rows.append([image["name"], image["target"]["mediaType"], image["target"]["digest"],
                     "-" if tree["size"] is None else human_size(tree["size"]), ",".join(tree["platforms"]) or "-",
                     _format_labels(image["labels"])])
    _print_table(["REF", "TYPE", "DIGEST", "SIZE", "PLATFORMS", "LABELS"], rows)


def cmd_images_rm(client: Client, args: argparse.Namespace) -> None:
    _remove_each(args.refs, lambda ref: client.images_delete(ref, sync=args.sync))


def cmd_images_tag(client: Client, args: argparse.Namespace) -> None:
    source = client.images_get(args.source)
    for name in args.targets:
        try:
            client.images_create(name, source["target"], source["labels"], lease=args.lease)
        except AlreadyExists:
            if not args.force:
                raise AlreadyExists(f"image {name} already exists (--force replaces it)") from None
            client.images_update(name, labels=source["labels"], target=source["target"],
                                 update_mask=["labels", "target"])
        sys.stdout.write(name + "\n")


def cmd_images_label(client: Client, args: argparse.Namespace) -> None:
    labels = _parse_labels(args.labels)
    if not labels:  # no mask would replace every label: show them instead
        image = client.images_get(args.ref)
    else:
        image = client.images_update(args.ref, labels={k: v for k, v in labels.items() if v},
                                     update_mask=[f"labels.{key}" for key in labels])
    sys.stdout.write(_format_labels(image["labels"]) + "\n")


def cmd_images_check(client: Client, args: argparse.Namespace) -> None:
    loaded = sorted(p["id"] for p in client.plugins(["type==io.berth.snapshotter.v1,status==ok"]))
    if args.snapshotter not in loaded:
        raise NotFound(f"snapshotter {args.snapshotter!r} is not loaded (loaded: {', '.join(loaded) or 'none'})")
    images: list[dict[str, Any]] = []
    failed = False
    for ref in args.refs:
        try:
            images.append(client.images_get(ref))
        except NotFound as err:
            sys.stderr.write(f"berth: {_describe(err)}\n")
            failed = True
    if not args.refs:
        images = client.images_list()
    rows = []
    for image in images:
        tree = _image_tree(client, image["target"])
        counts = f"({tree['present']}/{tree['required']})"
        status = f"complete {counts}" if tree["present"] == tree["required"] else f"incomplete {counts}"
        rows.append([image["name"], image["target"]["mediaType"], image["target"]["digest"], status,
                     f"{human_size(tree['present_bytes'])}/{human_size(tree['required_bytes'])}",
                     str(_unpacked(client, tree["config"], args.snapshotter)).lower()])
    _print_table(["REF", "TYPE", "DIGEST", "STATUS", "SIZE", "UNPACKED"], rows)
    if failed:
        raise SystemExit(1)


def cmd_images_pull(client: Client, args: argparse.Namespace) -> None:
    from berth.client.progress import ProgressDisplay

    with ProgressDisplay() as display:
        result = client.images_pull(args.ref, platform=args.platform, all_platforms=args.all_platforms,
                                    snapshotter=args.snapshotter, unpack=not args.no_unpack,
                                    plain_http=args.plain_http, progress=display.update)
    unpacked = f", unpacked {result['chain_id']}" if result["chain_id"] else ""
    sys.stdout.write(f"{result['name']}: {result['target']['digest']} ({result['fetched']} blobs fetched, "
                     f"{human_size(result['fetched_bytes'])}, {result['skipped']} present{unpacked}) "
                     f"in {result['seconds']:.2f}s\n")


def cmd_images_push(client: Client, args: argparse.Namespace) -> None:
    from berth.client.progress import ProgressDisplay

    with ProgressDisplay() as display:
        result = client.images_push(args.ref, args.destination or "", plain_http=args.plain_http,
                                    progress=display.update)
    sys.stdout.write(f"{result['name']}: {result['target']['digest']} ({result['pushed']} pushed, "
                     f"{result['mounted']} mounted, {result['skipped']} present) in {result['seconds']:.2f}s\n")


def cmd_images_import(client: Client, args: argparse.Namespace) -> None:
    source = sys.stdin.buffer if args.file == "-" else open(args.file, "rb")  # noqa: SIM115
    try:
        result = client.images_import(source, base_name=args.base_name, snapshotter=args.snapshotter,
                                      unpack=not args.no_unpack)
    finally:
        if source is not sys.stdin.buffer:
            source.close()
    for image in result["images"]:
        unpacked = f" unpacked {image['chain_id']}" if image["chain_id"] else ""
        sys.stdout.write(f"{image['name']}: {image['target']['digest']}{unpacked}\n")
    for desc in result["unnamed"]:
        sys.stderr.write(f"berth: {desc['digest']} has no name in the archive (use --base-name); imported as "
                         "content only\n")


def cmd_images_export(client: Client, args: argparse.Namespace) -> None:
    if args.file == "-":
        client.images_export(args.refs, sys.stdout.buffer)
        return
    temporary = f"{args.file}.partial"
    try:
        with open(temporary, "wb") as sink:
            client.images_export(args.refs, sink)
        os.replace(temporary, args.file)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)


def cmd_containers_ls(client: Client, args: argparse.Namespace) -> None:
    containers = client.containers_list(args.filters)
    if args.quiet:
        sys.stdout.writelines(c["id"] + "\n" for c in containers)
    elif args.format == "json":
        _print_json(containers)
    else:
        _print_table(["CONTAINER", "IMAGE", "RUNTIME"],
                     [[c["id"], c["image"] or "-", c["runtime"]["name"]] for c in containers])


def cmd_containers_info(client: Client, args: argparse.Namespace) -> None:
    _print_json(client.containers_get(args.id))


def cmd_containers_rm(client: Client, args: argparse.Namespace) -> None:
    _remove_each(args.ids, lambda cid: client.containers_delete(cid, snapshot_cleanup=args.snapshot_cleanup))


def cmd_containers_label(client: Client, args: argparse.Namespace) -> None:
    labels = _parse_labels(args.labels)
    if not labels:  # no mask would replace every label: show them instead
        container = client.containers_get(args.id)
    else:
        container = client.containers_update({"id": args.id, "labels": {k: v for k, v in labels.items() if v}},
                                              [f"labels.{key}" for key in labels])
    sys.stdout.write(_format_labels(container["labels"]) + "\n")


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


def _parser(only: str | None = None) -> argparse.ArgumentParser:
    """The command-line parser. With ``only`` (a command word), the other commands get no sub-commands
    or options: building them all would cost every run a few milliseconds of start-up."""
    parser = argparse.ArgumentParser(prog="berth", description="talk to berthd, berth's container daemon")
    # Defaults come from the environment at run time (main), so a parser built once serves any caller.
    parser.add_argument("--address", "-a", default=None,
                        help=f"berthd's socket (default: $BERTH_ADDRESS, else {DEFAULT_ADDRESS})")
    parser.add_argument("--namespace", "-n", default=None,
                        help=f"namespace to work in (default: $BERTH_NAMESPACE, else {DEFAULT_NAMESPACE})")
    parser.add_argument("--timeout", type=float, default=None, help="seconds each call may take")
    parser.add_argument("--lease", default=None, metavar="ID",
                        help="run content, snapshot and image commands under this lease (what they create joins it)")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def want(*names: str) -> bool:
        return only is None or only in names

    def add(sub: Any, name: str, handler: Callable[[Client, argparse.Namespace], None], help_text: str,
            aliases: Sequence[str] = ()) -> argparse.ArgumentParser:
        command: argparse.ArgumentParser = sub.add_parser(name, help=help_text, aliases=list(aliases))
        command.set_defaults(handler=handler)
        return command

    add(commands, "version", cmd_version, "print the client and server versions")

    plugins = commands.add_parser("plugins", aliases=["plugin"], help="plugins the daemon loaded")
    if want("plugins", "plugin"):
        plugins_sub = plugins.add_subparsers(dest="action", metavar="ACTION", required=True)
        ls = add(plugins_sub, "ls", cmd_plugins_ls, "list plugins with their status", ["list"])
        ls.add_argument("--detailed", "-d", action="store_true", help="show exports, capabilities and errors")
        ls.add_argument("--format", choices=["table", "json"], default="table")
        ls.add_argument("filters", nargs="*", metavar="FILTER", help='e.g. type==io.berth.rpc.v1 or status==error')

    namespaces = commands.add_parser("namespaces", aliases=["namespace", "ns"], help="manage namespaces")
    if want("namespaces", "namespace", "ns"):
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

    content = commands.add_parser("content", help="manage content (blobs and ingests)")
    if want("content"):
        content_sub = content.add_subparsers(dest="action", metavar="ACTION", required=True)
        c_ls = add(content_sub, "ls", cmd_content_ls, "list blobs", ["list"])
        c_ls.add_argument("--quiet", "-q", action="store_true", help="print only the digests")
        c_ls.add_argument("--format", choices=["table", "json"], default="table")
        c_ls.add_argument("filters", nargs="*", metavar="FILTER",
                          help='e.g. labels."berth.io/gc.root" or digest==sha256:...')
        c_info = add(content_sub, "info", cmd_content_info, "print a blob's info as JSON")
        c_info.add_argument("digest")
        c_get = add(content_sub, "get", cmd_content_get, "write a blob to stdout")
        c_get.add_argument("digest")
        c_ingest = add(content_sub, "ingest", cmd_content_ingest,
                       "write stdin as a blob under REF (resumes an interrupted ingest) and print its digest")
        c_ingest.add_argument("--expected-digest", default="", metavar="DIGEST", help="verify the blob's digest")
        c_ingest.add_argument("--expected-size", type=int, default=0, metavar="BYTES", help="verify the blob's size")
        c_ingest.add_argument("--label", dest="labels", action="append", default=[], metavar="KEY=VALUE",
                              help="label the blob (repeatable)")
        c_ingest.add_argument("ref", metavar="REF", help="the ingest's name, e.g. the digest or a file name")
        c_rm = add(content_sub, "rm", cmd_content_rm, "remove blobs (their bytes go at the next GC)",
                   ["remove", "delete", "del"])
        c_rm.add_argument("digests", nargs="+", metavar="DIGEST")
        c_label = add(content_sub, "label", cmd_content_label, "set labels (an empty VALUE removes the label)")
        c_label.add_argument("digest")
        c_label.add_argument("labels", nargs="*", metavar="KEY=VALUE")
        c_active = add(content_sub, "active", cmd_content_active, "list ingests in progress", ["ingests"])
        c_active.add_argument("--quiet", "-q", action="store_true", help="print only the refs")
        c_active.add_argument("--format", choices=["table", "json"], default="table")
        c_active.add_argument("filters", nargs="*", metavar="FILTER", help='e.g. ref~="^layer-"')

    leases = commands.add_parser("leases", aliases=["lease"], help="manage leases")
    if want("leases", "lease"):
        leases_sub = leases.add_subparsers(dest="action", metavar="ACTION", required=True)
        l_ls = add(leases_sub, "ls", cmd_leases_ls, "list leases", ["list"])
        l_ls.add_argument("--quiet", "-q", action="store_true", help="print only the ids")
        l_ls.add_argument("--format", choices=["table", "json"], default="table")
        l_ls.add_argument("filters", nargs="*", metavar="FILTER", help="e.g. id==build-1")
        l_create = add(leases_sub, "create", cmd_leases_create, "create a lease and print its id")
        l_create.add_argument("--id", default="", help="the lease id (default: a random one)")
        l_create.add_argument("--expires", "-x", type=parse_duration, default=24 * 3600.0, metavar="DURATION",
                              help="expire after this long, e.g. 24h, 30m, 90s; 0 never expires (default 24h)")
        l_create.add_argument("--label", dest="labels", action="append", default=[], metavar="KEY=VALUE",
                              help="label the lease (repeatable)")
        l_create.add_argument("label_args", nargs="*", metavar="KEY=VALUE", help="more labels")
        l_rm = add(leases_sub, "rm", cmd_leases_rm, "remove leases", ["remove", "delete", "del"])
        l_rm.add_argument("--sync", action="store_true",
                          help="collect garbage before returning (what only these leases held is gone)")
        l_rm.add_argument("ids", nargs="+", metavar="ID")

    snapshots = commands.add_parser("snapshots", aliases=["snapshot", "snap"], help="manage snapshots")
    if want("snapshots", "snapshot", "snap"):
        snapshots.add_argument("--snapshotter", default="", help="snapshotter to use (default: the daemon's default)")
        snap_sub = snapshots.add_subparsers(dest="action", metavar="ACTION", required=True)
        s_ls = add(snap_sub, "ls", cmd_snapshots_ls, "list snapshots", ["list"])
        s_ls.add_argument("--format", choices=["table", "json"], default="table")
        s_ls.add_argument("filters", nargs="*", metavar="FILTER", help="e.g. kind==committed")
        for name, handler, text in (("prepare", cmd_snapshots_prepare, "create an active snapshot"),
                                    ("view", cmd_snapshots_view, "create a read-only view")):
            create = add(snap_sub, name, handler, text)
            create.add_argument("--mounts", action="store_true", help="print the mount commands")
            create.add_argument("--target", default="", help="mount point shown with --mounts (default: the key)")
            create.add_argument("--label", dest="labels", action="append", default=[], metavar="KEY=VALUE")
            create.add_argument("key")
            create.add_argument("parent", nargs="?", default="")
        s_mounts = add(snap_sub, "mounts", cmd_snapshots_mounts, "print the mount commands of a snapshot", ["m"])
        s_mounts.add_argument("target")
        s_mounts.add_argument("key")
        s_commit = add(snap_sub, "commit", cmd_snapshots_commit, "commit an active snapshot")
        s_commit.add_argument("--label", dest="labels", action="append", default=[], metavar="KEY=VALUE")
        s_commit.add_argument("name")
        s_commit.add_argument("key")
        s_rm = add(snap_sub, "rm", cmd_snapshots_rm, "remove snapshots (their disk space goes at the next GC)",
                   ["remove", "delete", "del"])
        s_rm.add_argument("keys", nargs="+", metavar="KEY")
        s_info = add(snap_sub, "info", cmd_snapshots_info, "print a snapshot's info as JSON")
        s_info.add_argument("key")
        s_usage = add(snap_sub, "usage", cmd_snapshots_usage, "disk used by snapshots (each without its parents)")
        s_usage.add_argument("keys", nargs="*", metavar="KEY")
        add(snap_sub, "tree", cmd_snapshots_tree, "show snapshots as a tree of parents")
        s_label = add(snap_sub, "label", cmd_snapshots_label, "set labels (an empty VALUE removes the label)")
        s_label.add_argument("key")
        s_label.add_argument("labels", nargs="*", metavar="KEY=VALUE")

    images = commands.add_parser("images", aliases=["image", "i"], help="manage images")
    if want("images", "image", "i"):
        # One sub-command per action; registry and archive actions (pull, push, import, export) go here too.
        img_sub = images.add_subparsers(dest="action", metavar="ACTION", required=True)
        i_ls = add(img_sub, "ls", cmd_images_ls, "list images (size and platforms from the content store)", ["list"])
        i_ls.add_argument("--quiet", "-q", action="store_true", help="print only the names")
        i_ls.add_argument("--format", choices=["table", "json"], default="table")
        i_ls.add_argument("filters", nargs="*", metavar="FILTER",
                          help='e.g. name~="^docker.io/" or labels.env==prod or target.digest==sha256:...')
        i_rm = add(img_sub, "rm", cmd_images_rm, "remove images (their blobs go at the next GC)",
                   ["remove", "delete", "del"])
        i_rm.add_argument("--sync", action="store_true", help="collect garbage before returning")
        i_rm.add_argument("refs", nargs="+", metavar="REF")
        i_tag = add(img_sub, "tag", cmd_images_tag, "name SRC's target (and labels) as each DST")
        i_tag.add_argument("--force", "-f", action="store_true", help="replace a DST that exists")
        i_tag.add_argument("source", metavar="SRC")
        i_tag.add_argument("targets", nargs="+", metavar="DST")
        i_label = add(img_sub, "label", cmd_images_label, "set labels (an empty VALUE removes the label)")
        i_label.add_argument("ref", metavar="REF")
        i_label.add_argument("labels", nargs="*", metavar="KEY=VALUE")
        i_check = add(img_sub, "check", cmd_images_check,
                      "is each image complete in the content store, and unpacked (default: every image)")
        i_check.add_argument("--snapshotter", default="overlayfs", help="where to look for the unpacked image")
        i_check.add_argument("refs", nargs="*", metavar="REF")
        i_pull = add(img_sub, "pull", cmd_images_pull, "fetch an image from its registry and unpack it")
        i_pull.add_argument("--plain-http", action="store_true", help="plain HTTP (loopback registries only)")
        platforms = i_pull.add_mutually_exclusive_group()
        platforms.add_argument("--platform", default="", help="os/arch[/variant] (default: this machine's)")
        platforms.add_argument("--all-platforms", action="store_true", help="fetch every platform's content")
        i_pull.add_argument("--snapshotter", default="", help="unpack into this snapshotter (default: configured)")
        i_pull.add_argument("--no-unpack", action="store_true", help="fetch the content only")
        i_pull.add_argument("ref", metavar="REF")
        i_push = add(img_sub, "push", cmd_images_push, "push an image (to DEST, default its own name)")
        i_push.add_argument("--plain-http", action="store_true", help="plain HTTP (loopback registries only)")
        i_push.add_argument("ref", metavar="REF")
        i_push.add_argument("destination", nargs="?", metavar="DEST")
        i_import = add(img_sub, "import", cmd_images_import,
                       "import an OCI image layout or docker-save tarball (- for stdin)")
        i_import.add_argument("--base-name", default="", help="name images whose archive gives only a tag")
        i_import.add_argument("--snapshotter", default="", help="unpack into this snapshotter")
        i_import.add_argument("--no-unpack", action="store_true", help="import the content only")
        i_import.add_argument("file", metavar="FILE")
        i_export = add(img_sub, "export", cmd_images_export, "write images as an OCI image layout tarball")
        i_export.add_argument("file", metavar="FILE", help="the tarball to write (- for stdout)")
        i_export.add_argument("refs", nargs="+", metavar="REF")

    containers = commands.add_parser("containers", aliases=["container", "c"], help="manage containers")
    if want("containers", "container", "c"):
        c_sub = containers.add_subparsers(dest="action", metavar="ACTION", required=True)
        co_ls = add(c_sub, "ls", cmd_containers_ls, "list containers", ["list"])
        co_ls.add_argument("--quiet", "-q", action="store_true", help="print only the ids")
        co_ls.add_argument("--format", choices=["table", "json"], default="table")
        co_ls.add_argument("filters", nargs="*", metavar="FILTER", help="e.g. image==docker.io/library/busybox:latest")
        co_info = add(c_sub, "info", cmd_containers_info, "print a container (with its spec) as JSON")
        co_info.add_argument("id")
        co_rm = add(c_sub, "rm", cmd_containers_rm, "remove containers", ["remove", "delete", "del"])
        co_rm.add_argument("--snapshot-cleanup", action=argparse.BooleanOptionalAction, default=True,
                           help="remove the container's snapshot too (default: yes)")
        co_rm.add_argument("ids", nargs="+", metavar="ID")
        co_label = add(c_sub, "label", cmd_containers_label, "set labels (an empty VALUE removes the label)")
        co_label.add_argument("id")
        co_label.add_argument("labels", nargs="*", metavar="KEY=VALUE")
        taskcmds.add_container_create(c_sub, add)

    taskcmds.add_commands(commands, add, want)
    networkcmds.add_commands(commands, add, want)

    events = add(commands, "events", cmd_events, "print events as they happen", ["event"])
    events.add_argument("--format", choices=["text", "json"], default="text")
    events.add_argument("filters", nargs="*", metavar="FILTER", help='e.g. topic=="/namespaces/create"')
    return parser


class _Probe(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise ValueError(message)


def _command_in(argv: Sequence[str]) -> str | None:
    """The command word of ``argv`` (global options resolved as the real parser does), or ``None``."""
    probe = _Probe(add_help=False)
    for flags in (("--address", "-a"), ("--namespace", "-n"), ("--timeout",), ("--lease",)):
        probe.add_argument(*flags)
    probe.add_argument("rest", nargs=argparse.REMAINDER)
    try:
        known, _ = probe.parse_known_args(argv)
    except ValueError:
        return None
    return known.rest[0] if known.rest else None


_prebuilt: argparse.ArgumentParser | None = None


def prebuild_parser() -> None:
    """Build the whole parser once in this process, and compile the patterns it matches command lines
    with (the launcher's command server does, so that every command it forks skips both)."""
    global _prebuilt
    _prebuilt = _parser()
    _compile_argument_patterns(_prebuilt)


def _compile_argument_patterns(parser: argparse.ArgumentParser) -> None:
    """Put in ``re``'s cache every pattern that ``parser`` and its subparsers match arguments with.

    argparse builds them from the actions' ``nargs`` (one per action, one per run of positionals) and
    compiles each on first use: half a millisecond per command in a forked child, whose cache dies with
    it. This reads argparse internals; where they differ, it does nothing and parsing compiles as before.
    """
    pending, seen = [parser], set()
    try:
        while pending:
            current = pending.pop()
            if id(current) in seen:
                continue
            seen.add(id(current))
            positionals = current._get_positional_actions()
            for action in current._actions:
                re.compile(current._get_nargs_pattern(action))
                if isinstance(action, argparse._SubParsersAction):
                    pending.extend(action.choices.values())
            for start in range(len(positionals)):
                for end in range(start + 1, len(positionals) + 1):
                    re.compile("".join(current._get_nargs_pattern(action) for action in positionals[start:end]))
    except AttributeError:
        return


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = (_prebuilt or _parser(_command_in(argv))).parse_args(argv)
    if not hasattr(args, "handler"):  # the probe misread the command line: parse it with every command
        args = _parser().parse_args(argv)
    client = Client(args.address or default_address(), namespace=args.namespace or default_namespace(),
                    timeout=args.timeout)
    try:
        args.handler(client, args)
    except BerthError as err:
        sys.stderr.write(f"berth: {_describe(err)}\n")
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # the reader went away (`berth content get ... | head`)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # so that the exit-time flush does not complain
        return 0
    finally:
        client.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
