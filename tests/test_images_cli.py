"""``berth images`` (ls, tag, label, check, rm) and the clients' image calls, against a real berthd.

Images are made by hand: a config, layers, a manifest (and an index) ingested through the content RPC
under a lease, labelled as a pull labels them, with the unpacked snapshots committed under the layers'
chain IDs; then an image record pointing at the root.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from dataclasses import dataclass
from typing import Any

import pytest
import trio
from conftest import BerthdProcess

from berth.client import cli
from berth.client.aio import open_client
from berth.client.cli import human_size
from berth.client.sync import Client
from berth.core.errdefs import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from berth.core.oci import OCI_CONFIG, OCI_INDEX, OCI_LAYER, OCI_MANIFEST, chain_ids, host_platform

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="unpacked images are overlayfs snapshots: run as root")

REF = "berth.io/gc.ref.content"


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def descriptor(data: bytes, media_type: str, **extra: Any) -> dict[str, Any]:
    return {"mediaType": media_type, "digest": sha(data), "size": len(data), **extra}


@dataclass
class Built:
    target: dict[str, Any]
    #: Config and layers of the host's manifest, in bytes.
    size: int
    #: Every blob of the tree, ingested or not.
    digests: list[str]
    chain_id: str
    manifest_size: int


def ingest(client: Client, data: bytes, lease: str, labels: dict[str, str] | None = None) -> str:
    digest = sha(data)
    client.content_ingest(f"ingest-{digest}", io.BytesIO(data), expected=digest, labels=labels, lease=lease)
    return digest


def build(client: Client, tag: str, *, layers: int = 2, index: bool = False, skip_layer: bool = False,
          unpack: bool = True) -> Built:
    """Ingest an image tree under the lease ``build`` (which the caller deletes): with ``index``, an OCI
    index of the host's manifest and an arm64/s390x one; ``skip_layer`` leaves the last layer out of
    the store; ``unpack`` commits the layers' snapshots."""
    host = host_platform()
    layer_data = [f"{tag} layer {i} ".encode() * (100 + i) for i in range(layers)]
    diff_ids = [sha(data) for data in layer_data]
    chains = chain_ids(diff_ids)
    config = json.dumps({"architecture": host.architecture, "os": host.os,
                         "rootfs": {"type": "layers", "diff_ids": diff_ids}}).encode()
    manifest = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                           "config": descriptor(config, OCI_CONFIG),
                           "layers": [descriptor(d, OCI_LAYER) for d in layer_data]}).encode()
    for position, data in enumerate(layer_data):
        if not (skip_layer and position == layers - 1):
            ingest(client, data, "build")
    ingest(client, config, "build", {"berth.io/gc.ref.snapshot.overlayfs": chains[-1]})
    ingest(client, manifest, "build", {f"{REF}.config": sha(config),
                                       **{f"{REF}.l.{i}": d for i, d in enumerate(diff_ids)}})
    target = descriptor(manifest, OCI_MANIFEST)
    digests = [sha(manifest), sha(config), *diff_ids]
    if index:
        other_arch = "s390x" if host.architecture != "s390x" else "arm64"
        document = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [
            descriptor(manifest, OCI_MANIFEST, platform={"os": "linux", "architecture": other_arch}),
            descriptor(manifest, OCI_MANIFEST, platform=host.to_wire()),
        ]}).encode()
        ingest(client, document, "build", {f"{REF}.m.0": sha(manifest)})
        target = descriptor(document, OCI_INDEX)
        digests.insert(0, sha(document))
    if unpack:
        parent = ""
        for position, chain in enumerate(chains):
            key = f"extract-{tag}-{position}"
            client.call("snapshots.prepare", {"key": key, "parent": parent}, lease="build")
            client.call("snapshots.commit", {"name": chain, "key": key}, lease="build")
            parent = chain
    return Built(target, len(config) + sum(map(len, layer_data)), digests, chains[-1], len(manifest))


def ok(berthd: BerthdProcess, *args: str) -> str:
    result = berthd.cli("images", *args)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    return result.stdout


def fails(berthd: BerthdProcess, *args: str) -> str:
    """Run a command that must fail with exit status 1; return its one error line."""
    result = berthd.cli("images", *args)
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert lines, result.stderr
    assert all(line.startswith("berth: ") for line in lines), result.stderr
    return lines[-1]


def table(text: str) -> dict[str, list[str]]:
    """Rows of a table by their first column (cells split on runs of 2+ spaces)."""
    lines = text.splitlines()
    return {cells[0]: cells for cells in ([c for c in line.split("  ") if c.strip()] for line in lines[1:])} | {
        "": [c.strip() for c in lines[0].split("  ") if c.strip()]}


def stripped(cells: list[str]) -> list[str]:
    return [c.strip() for c in cells]


def test_ls_tag_label_check_and_rm(berthd: BerthdProcess) -> None:
    host = str(host_platform())
    with berthd.client() as client:
        client.lease_create("build")
        app = build(client, "app")
        multi = build(client, "multi", index=True, layers=1)
        partial = build(client, "partial", skip_layer=True, unpack=False)
        client.images_create("example.com/app:1", app.target, {"env": "prod"})
        client.images_create("example.com/multi:1", multi.target)
        client.images_create("example.com/partial:1", partial.target)
        client.images_create("example.com/ghost:1", {"mediaType": OCI_MANIFEST, "digest": sha(b"nowhere"),
                                                     "size": 7})
        client.lease_delete("build", sync=True)  # the images alone hold their trees now

    rows = table(ok(berthd, "ls"))
    assert rows[""] == ["REF", "TYPE", "DIGEST", "SIZE", "PLATFORMS", "LABELS"]
    assert stripped(rows["example.com/app:1"]) == ["example.com/app:1", OCI_MANIFEST, app.target["digest"],
                                                   human_size(app.size), host, "env=prod"]
    other = "linux/s390x" if "s390x" not in host else "linux/arm64"
    assert stripped(rows["example.com/multi:1"]) == ["example.com/multi:1", OCI_INDEX, multi.target["digest"],
                                                     human_size(multi.size), ",".join(sorted([host, other])), "-"]
    assert stripped(rows["example.com/ghost:1"])[3:] == ["-", "-", "-"]  # nothing in the content store
    assert ok(berthd, "ls", "-q").split() == ["example.com/app:1", "example.com/ghost:1", "example.com/multi:1",
                                              "example.com/partial:1"]
    assert ok(berthd, "ls", "-q", "labels.env==prod", f"target.mediatype=={OCI_INDEX}").split() == [
        "example.com/app:1", "example.com/multi:1"]
    listed = json.loads(ok(berthd, "ls", "--format", "json", 'name~="app"'))
    assert [(i["name"], i["target"], i["labels"]) for i in listed] == [("example.com/app:1", app.target,
                                                                         {"env": "prod"})]

    # tag: new records with the same target and labels.
    assert ok(berthd, "tag", "example.com/app:1", "example.com/app:2", "local/app") == "example.com/app:2\nlocal/app\n"
    assert ok(berthd, "ls", "-q", f"target.digest=={app.target['digest']}").split() == [
        "example.com/app:1", "example.com/app:2", "local/app"]
    assert "image local/app already exists (--force replaces it) (already_exists)" in fails(
        berthd, "tag", "example.com/multi:1", "local/app")
    assert ok(berthd, "tag", "--force", "example.com/multi:1", "local/app") == "local/app\n"
    assert json.loads(ok(berthd, "ls", "--format", "json", "name==local/app"))[0]["target"] == multi.target

    # label: set, show, remove.
    assert ok(berthd, "label", "example.com/app:2", "tier=web", "env=dev") == "env=dev,tier=web\n"
    assert ok(berthd, "label", "example.com/app:2") == "env=dev,tier=web\n"
    assert ok(berthd, "label", "example.com/app:2", "env=") == "tier=web\n"

    # check: complete and unpacked, incomplete, missing altogether.
    rows = table(ok(berthd, "check"))
    assert rows[""] == ["REF", "TYPE", "DIGEST", "STATUS", "SIZE", "UNPACKED"]
    app_total = app.size + app.target["size"]
    assert stripped(rows["example.com/app:1"])[3:] == ["complete (4/4)",
                                                       f"{human_size(app_total)}/{human_size(app_total)}", "true"]
    multi_total = human_size(multi.target["size"] + multi.manifest_size + multi.size)
    assert stripped(rows["example.com/multi:1"])[3:] == ["complete (4/4)", f"{multi_total}/{multi_total}", "true"]
    partial_status = stripped(rows["example.com/partial:1"])
    assert partial_status[3] == "incomplete (3/4)"  # manifest, config, one of two layers
    assert partial_status[5] == "false"
    assert stripped(rows["example.com/ghost:1"])[3:] == ["incomplete (0/1)", "0B/7B", "false"]
    # Only the images named; another snapshotter has nothing unpacked.
    only = table(ok(berthd, "check", "--snapshotter", "native", "example.com/app:1"))
    assert list(only) == ["example.com/app:1", ""]
    assert stripped(only["example.com/app:1"])[5] == "false"

    # rm --sync: once no name is left, the tree and its snapshots are collected.
    assert ok(berthd, "rm", "--sync", "example.com/app:1", "example.com/app:2") == (
        "example.com/app:1\nexample.com/app:2\n")
    with berthd.client() as client:
        for digest in app.digests:
            with pytest.raises(NotFound):
                client.content_info(digest)
        with pytest.raises(NotFound):
            client.call("snapshots.stat", {"key": app.chain_id})
        client.content_info(multi.target["digest"])  # still named by example.com/multi:1 and local/app
        client.call("snapshots.stat", {"key": multi.chain_id})
    assert ok(berthd, "ls", "-q").split() == ["example.com/ghost:1", "example.com/multi:1",
                                              "example.com/partial:1", "local/app"]


def test_bad_input_is_one_error_line(berthd: BerthdProcess) -> None:
    with berthd.client() as client:
        client.images_create("known", {"mediaType": OCI_MANIFEST, "digest": sha(b"m"), "size": 1})
    assert fails(berthd, "rm", "nope") == "berth: image nope not found (not_found)"
    # rm goes on past a failure, and exits 1.
    result = berthd.cli("images", "rm", "nope", "known")
    assert (result.returncode, result.stdout) == (1, "known\n")
    assert result.stderr == "berth: image nope not found (not_found)\n"
    assert fails(berthd, "ls", "labels.a==") == (
        "berth: filter 'labels.a==': expected a value at position 10 (invalid_argument)")
    assert fails(berthd, "label", "nope", "a=b") == "berth: image nope not found (not_found)"
    assert fails(berthd, "label", "nope", "novalue") == "berth: label 'novalue' must be KEY=VALUE (invalid_argument)"
    assert fails(berthd, "tag", "nope", "other") == "berth: image nope not found (not_found)"
    with berthd.client() as client:
        client.images_create("src", {"mediaType": OCI_MANIFEST, "digest": sha(b"m"), "size": 1})
    assert "image name 'bad name' is invalid" in fails(berthd, "tag", "src", "bad name")
    assert "(invalid_argument)" in fails(berthd, "label", "src", f"k={'v' * 5000}")
    result = berthd.cli("images", "check", "nope", "src")
    assert result.returncode == 1
    assert result.stderr == "berth: image nope not found (not_found)\n"
    assert table(result.stdout)["src"][0] == "src"
    unknown = fails(berthd, "check", "--snapshotter", "nope")
    assert unknown.startswith("berth: snapshotter 'nope' is not loaded (loaded: ")
    assert "overlayfs" in unknown
    usage = berthd.cli("images", "rm")
    assert usage.returncode == 2
    assert "REF" in usage.stderr


def test_sync_client_image_calls(berthd: BerthdProcess) -> None:
    target = {"mediaType": OCI_MANIFEST, "digest": sha(b"manifest"), "size": 8}
    other = {"mediaType": OCI_INDEX, "digest": sha(b"index"), "size": 5}
    with berthd.client() as client:
        plugins = {(p["type"], p["id"]): p["status"] for p in client.plugins()}
        assert plugins[("io.berth.service.v1", "images-service")] == "ok"
        assert plugins[("io.berth.rpc.v1", "images")] == "ok"
        created = client.images_create("img", target, {"a": "1"})
        assert created["name"] == "img"
        assert created["target"] == target
        assert client.images_get("img") == created
        with pytest.raises(AlreadyExists):
            client.images_create("img", target)
        with pytest.raises(InvalidArgument, match="invalid digest"):
            client.images_create("bad", {"mediaType": OCI_MANIFEST, "digest": "sha256:xyz", "size": 1})
        with pytest.raises(InvalidArgument, match="descriptor size"):
            client.images_create("bad", {"mediaType": OCI_MANIFEST, "digest": sha(b"x")})
        with pytest.raises(InvalidArgument, match=r"images\.create"):
            client.call("images.create", {"name": "bad"})
        updated = client.images_update("img", labels={"b": "2"}, update_mask=["labels.b"])
        assert updated["labels"] == {"a": "1", "b": "2"}
        updated = client.images_update("img", target=other, update_mask=["target"])
        assert (updated["target"], updated["labels"]) == (other, {"a": "1", "b": "2"})
        with pytest.raises(InvalidArgument, match="cannot update field 'name'"):
            client.images_update("img", update_mask=["name"])
        assert [i["name"] for i in client.images_list(["labels.b==2"])] == ["img"]
        assert client.images_list(["labels.b==3"]) == []
        with pytest.raises(FailedPrecondition):
            client.images_delete("img", target=target["digest"])
        client.images_delete("img", sync=True, target=other["digest"])
        with pytest.raises(NotFound):
            client.images_get("img")
        # Other namespaces do not see it; a lease the call names holds what it creates.
        client.images_create("img", target, lease=None)
        assert client.call("images.list", {}, namespace="elsewhere") == {"images": []}
        client.lease_create("hold")
        client.images_create("held", target, lease="hold")
        assert {"type": "images", "id": "held"} in client.lease_resources("hold")


def test_async_client_image_calls_and_events(berthd: BerthdProcess) -> None:
    target = {"mediaType": OCI_MANIFEST, "digest": sha(b"manifest"), "size": 8}

    async def main() -> list[dict[str, Any]]:
        seen: list[dict[str, Any]] = []
        async with open_client(str(berthd.address)) as client, \
                client.stream("events.subscribe", {"filters": ['topic~="^/images/"']}) as events:
            with trio.fail_after(10):
                # The subscription is live once an event published after it arrives: probe until one does
                # (a probe published before the daemon registered the subscription is never delivered).
                async with trio.open_nursery() as nursery:
                    async def probe() -> None:
                        while True:
                            await client.publish("/images/probe", {})
                            await trio.sleep(0.2)

                    nursery.start_soon(probe)
                    async for envelope in events:
                        if envelope["topic"] == "/images/probe":
                            break
                    nursery.cancel_scope.cancel()
                await client.images_create("aio", target, {"k": "v"})
                assert (await client.images_get("aio"))["labels"] == {"k": "v"}
                await client.images_update("aio", labels={}, update_mask=["labels"])
                assert [i["name"] for i in await client.images_list()] == ["aio"]
                await client.images_delete("aio")
                with pytest.raises(NotFound):
                    await client.images_get("aio")
                async for envelope in events:
                    if envelope["topic"] == "/images/probe":  # a late answer to an earlier probe
                        continue
                    seen.append({"topic": envelope["topic"], **envelope["event"]})
                    if envelope["topic"] == "/images/delete":
                        break
        return seen

    assert trio.run(main) == [
        {"topic": "/images/create", "name": "aio", "labels": {"k": "v"}},
        {"topic": "/images/update", "name": "aio", "labels": {}},
        {"topic": "/images/delete", "name": "aio"},
    ]


def test_tag_under_a_lease_joins_it(berthd: BerthdProcess) -> None:
    with berthd.client() as client:
        client.images_create("src", {"mediaType": OCI_MANIFEST, "digest": sha(b"m"), "size": 1})
        client.lease_create("tagging")
    assert berthd.cli("--lease", "tagging", "images", "tag", "src", "dst").returncode == 0
    with berthd.client() as client:
        assert client.lease_resources("tagging") == [{"type": "images", "id": "dst"}]


@pytest.mark.parametrize("argv", [
    ["images", "ls", "-q", "labels.a", "name~=x"],
    ["i", "rm", "--sync", "a", "b"],
    ["-n", "x", "image", "tag", "-f", "a", "b", "c"],
    ["--lease", "l", "images", "check", "--snapshotter", "native", "r"],
    ["images", "label", "r", "a=", "b=c"],
])
def test_the_lazy_parser_parses_images_as_the_full_one(argv: list[str]) -> None:
    command = cli._command_in(argv)
    assert command in ("images", "image", "i")
    assert vars(cli._parser(command).parse_args(argv)) == vars(cli._parser().parse_args(argv))
