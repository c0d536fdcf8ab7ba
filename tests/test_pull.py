"""Pull, push, import and export through a real berthd against a real registry on 127.0.0.1: images
built locally (tests/imagebuild.py), pushed with skopeo, pulled and unpacked by berth, trees compared with
what the layers say, and peers (skopeo) reading what berth pushes and exports."""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import BerthdFactory, BerthdProcess
from imagebuild import Entry, busybox_image, skopeo_inspect, write_oci_archive
from registry_fixture import PushedImages, RegistryServer

from berth.client.sync import Client
from berth.core.errdefs import FailedPrecondition, NotFound, PermissionDenied, Unauthenticated
from berth.core.oci import chain_ids

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="unpacking mounts snapshots: needs root")


@pytest.fixture
def daemon(berthd_factory: BerthdFactory, tmp_path: Path) -> BerthdProcess:
    docker_config = tmp_path / "docker-config.json"
    docker_config.write_text("{}")
    return berthd_factory.start({"plugins": {"io.berth.transfer.v1.local": {
        "docker_config": str(docker_config), "config_path": str(tmp_path / "certs.d")}}})


@pytest.fixture
def client(daemon: BerthdProcess) -> Iterator[Client]:
    with daemon.client(timeout=120.0) as client:
        yield client


def tree_of(root: Path) -> dict[str, tuple[str, Any]]:
    """path -> (kind, content-ish) for everything below ``root``."""
    found: dict[str, tuple[str, Any]] = {}
    for directory, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(directory, name)
            rel = str(path.relative_to(root))
            info = path.lstat()
            if stat.S_ISLNK(info.st_mode):
                found[rel] = ("symlink", os.readlink(path))
            elif stat.S_ISDIR(info.st_mode):
                found[rel] = ("dir", stat.S_IMODE(info.st_mode))
            else:
                found[rel] = ("file", path.read_bytes())
    return found


def expected_of(entries: dict[str, Entry]) -> dict[str, tuple[str, Any]]:
    expected: dict[str, tuple[str, Any]] = {}
    for path, entry in entries.items():
        rel = path.strip("/")
        if entry.kind == "symlink":
            expected[rel] = ("symlink", entry.target)
        elif entry.kind == "dir":
            expected[rel] = ("dir", entry.mode)
        elif entry.kind in ("file", "hardlink"):
            expected[rel] = ("file", entry.data)
    return expected


def view_tree(client: Client, chain_id: str, target: Path) -> dict[str, tuple[str, Any]]:
    """Mount a read-only view of ``chain_id`` and read its tree."""
    # A gc.root label keeps the view from a collection the daemon may run meanwhile.
    mounts = client.call("snapshots.view", {"key": f"check-{chain_id}", "parent": chain_id,
                                            "labels": {"berth.io/gc.root": "test"}})["mounts"]
    target.mkdir(parents=True, exist_ok=True)
    from berth.core.snapshots.mount import mount_all, unmount_all
    from berth.core.snapshots.snapshotter import Mount

    mount_all([Mount.from_wire(m) for m in mounts], target)
    try:
        return tree_of(target)
    finally:
        unmount_all(target)
        client.call("snapshots.remove", {"key": f"check-{chain_id}"})


@pytest.mark.parametrize("name", ["busybox", "generated", "zstd", "plain", "docker"])
def test_pull_unpacks_what_the_layers_say(client: Client, registry_images: PushedImages, name: str,
                                          tmp_path: Path) -> None:
    image = registry_images.images[name]
    result = client.images_pull(registry_images.ref(name), plain_http=True)
    assert result["target"]["digest"] == image.descriptor.digest
    assert result["chain_id"] == chain_ids([layer.diff_id for layer in image.layers])[-1]
    listed = client.images_list([f"name=={result['name']}"])
    assert [i["target"]["digest"] for i in listed] == [image.descriptor.digest]
    assert view_tree(client, result["chain_id"], tmp_path / "view") == expected_of(image.expected_tree())


def test_pulling_again_fetches_nothing(client: Client, registry_images: PushedImages) -> None:
    first = client.images_pull(registry_images.ref("generated"), plain_http=True)
    assert first["fetched"] > 0
    again = client.images_pull(registry_images.ref("generated"), plain_http=True)
    assert again["fetched"] == 0
    assert again["unpacked_layers"] == 0
    assert again["chain_id"] == first["chain_id"]


def test_progress_is_streamed(client: Client, registry_images: PushedImages) -> None:
    seen: list[dict[str, Any]] = []
    client.images_pull(registry_images.ref("busybox"), plain_http=True, progress=seen.extend)
    statuses = {event["status"] for event in seen}
    assert "done" in statuses
    assert any(event["ref"].startswith("layer-") for event in seen)


def test_multi_platform_index_picks_the_platform(client: Client, registry_images: PushedImages,
                                                 tmp_path: Path) -> None:
    index = registry_images.images["multi"]
    by_arch = {image.platform.architecture: image for image in index.images}
    host = client.images_pull(registry_images.ref("multi"), plain_http=True)
    assert host["chain_id"] == chain_ids([layer.diff_id for layer in by_arch["amd64"].layers])[-1]
    arm = client.images_pull(registry_images.ref("multi"), plain_http=True, platform="linux/arm64",
                             snapshotter="native")
    assert arm["chain_id"] == chain_ids([layer.diff_id for layer in by_arch["arm64"].layers])[-1]
    with pytest.raises(NotFound, match="no manifest for platform linux/s390x"):
        client.images_pull(registry_images.ref("multi"), plain_http=True, platform="linux/s390x")
    everything = client.images_pull(registry_images.ref("multi-docker"), plain_http=True, all_platforms=True,
                                    unpack=False)
    for image in registry_images.images["multi-docker"].images:
        for blob in image.blobs().values():
            assert client.call("content.info", {"digest": blob.digest})["info"]["size"] == blob.size
    assert everything["chain_id"] == ""


def test_unknown_image_and_registry_errors(client: Client, registry: RegistryServer) -> None:
    with pytest.raises(NotFound, match="nosuch"):
        client.images_pull(registry.ref("nosuch", "v1"), plain_http=True)


def test_corrupted_blob_never_lands(client: Client, registry_images: PushedImages, faulty_proxy_factory: Any,
                                    registry: RegistryServer) -> None:
    proxy = faulty_proxy_factory.start(registry.host)
    proxy.corrupt_blobs = True
    image = registry_images.images["generated"]
    with pytest.raises(FailedPrecondition, match="does not match"):
        client.images_pull(f"{proxy.host}/generated:v1", plain_http=True)
    for layer in image.layers:
        with pytest.raises(NotFound):
            client.call("content.info", {"digest": layer.blob.digest})
    assert client.images_list() == []


@pytest.mark.parametrize("kind", ["basic", "bearer"])
def test_auth_from_docker_config(berthd_factory: BerthdFactory, auth_registry: RegistryServer,
                                 token_registry: RegistryServer, tmp_path: Path, kind: str) -> None:
    """Credentials from the configured config.json: Basic on an htpasswd registry, a bearer token from the
    token server on the other; without them the pull is refused."""
    auth_registry = auth_registry if kind == "basic" else token_registry
    image = busybox_image()
    layout_dir = tmp_path / "push"
    from imagebuild import skopeo_copy, write_oci_layout

    skopeo_copy(write_oci_layout(layout_dir, {"v1": image}), "v1", auth_registry.ref("private", "v1"),
                creds=auth_registry.skopeo_creds())
    config = tmp_path / "config.json"
    token = base64.b64encode(f"{auth_registry.username}:{auth_registry.password}".encode()).decode()
    config.write_text(json.dumps({"auths": {auth_registry.host: {"auth": token}}}))
    anonymous = tmp_path / "anonymous.json"
    anonymous.write_text("{}")
    if kind == "basic":
        with berthd_factory.start({"plugins": {"io.berth.transfer.v1.local": {"docker_config": str(anonymous)}}}
                                  ).client(timeout=120.0) as denied, pytest.raises((Unauthenticated, PermissionDenied)):
            denied.images_pull(auth_registry.ref("private", "v1"), plain_http=True)
    else:
        assert auth_registry.token_server is not None
        auth_registry.token_server.requests.clear()
    with berthd_factory.start({"plugins": {"io.berth.transfer.v1.local": {"docker_config": str(config)}}}
                              ).client(timeout=120.0) as allowed:
        result = allowed.images_pull(auth_registry.ref("private", "v1"), plain_http=True)
        assert result["target"]["digest"] == image.descriptor.digest
    if kind == "bearer":  # the daemon asked the token server for a token as alice, not anonymously
        assert auth_registry.token_server is not None
        assert any(r.account == auth_registry.username and r.status == 200
                   for r in auth_registry.token_server.requests)


def test_push_is_read_by_skopeo_with_the_same_digests(client: Client, registry_images: PushedImages,
                                                      registry: RegistryServer, tmp_path: Path) -> None:
    pulled = client.images_pull(registry_images.ref("zstd"), plain_http=True)
    destination = registry.ref("pushed-by-berth", "v2")
    result = client.images_push(pulled["name"], destination, plain_http=True)
    image = registry_images.images["zstd"]
    # Pulled from another repository of the same registry: every layer and the config are mounted, not sent.
    assert result["mounted"] == len(image.layers) + 1
    assert result["pushed_bytes"] == 0
    raw = json.loads(skopeo_inspect(destination, raw=True))
    image = registry_images.images["zstd"]
    assert [layer["digest"] for layer in raw["layers"]] == [layer.blob.digest for layer in image.layers]
    inspected = skopeo_inspect(destination)
    assert inspected["Digest"] == image.descriptor.digest
    copied = tmp_path / "copied"
    subprocess.run(["skopeo", "copy", "--src-tls-verify=false", "--preserve-digests", f"docker://{destination}",
                    f"oci:{copied}:v2"], check=True, capture_output=True, timeout=120)
    assert json.loads((copied / "index.json").read_text())["manifests"][0]["digest"] == image.descriptor.digest
    again = client.images_push(pulled["name"], destination, plain_http=True)
    assert again["skipped"] == len(image.layers) + 1  # every blob (layers and config) is there already


def test_export_import_round_trip_and_skopeo_reads_the_archive(client: Client, registry_images: PushedImages,
                                                               tmp_path: Path, daemon: BerthdProcess) -> None:
    pulled = client.images_pull(registry_images.ref("busybox"), plain_http=True)
    archive = tmp_path / "busybox.tar"
    with archive.open("wb") as sink:
        size = client.images_export([pulled["name"]], sink)
    assert size == archive.stat().st_size
    copied = tmp_path / "copied"
    subprocess.run(["skopeo", "copy", f"oci-archive:{archive}:v1", f"oci:{copied}:v1"],
                   check=True, capture_output=True, timeout=120)
    # skopeo finds the image by its org.opencontainers.image.ref.name annotation, the tag (as containerd's).
    index = json.loads((copied / "index.json").read_text())
    assert index["manifests"][0]["digest"] == pulled["target"]["digest"]
    with daemon.client(timeout=120.0, namespace="imported") as other, archive.open("rb") as source:
        result = other.images_import(source)
        assert [i["name"] for i in result["images"]] == [pulled["name"]]
        assert result["images"][0]["chain_id"] == pulled["chain_id"]
        assert other.images_get(pulled["name"])["target"]["digest"] == pulled["target"]["digest"]


def test_import_of_a_locally_built_archive(client: Client, tmp_path: Path) -> None:
    image = busybox_image(compression="zstd")
    archive = write_oci_archive(tmp_path / "image.tar", {"example.com/tools/busybox:1.0": image})
    with archive.open("rb") as source:
        result = client.images_import(source)
    assert [i["name"] for i in result["images"]] == ["example.com/tools/busybox:1.0"]
    assert result["images"][0]["chain_id"] == chain_ids([layer.diff_id for layer in image.layers])[-1]


def test_import_refuses_what_is_not_an_archive(client: Client) -> None:
    from berth.core.errdefs import InvalidArgument

    with pytest.raises(InvalidArgument):
        client.images_import(io.BytesIO(b"not a tar file at all" * 100))


def test_cli_pull_push_export_import(daemon: BerthdProcess, registry_images: PushedImages,
                                     registry: RegistryServer, tmp_path: Path) -> None:
    ref = registry_images.ref("busybox")
    pulled = daemon.cli("images", "pull", "--plain-http", ref)
    assert pulled.returncode == 0, pulled.stderr
    assert pulled.stdout.startswith(f"{ref}: {registry_images.images['busybox'].descriptor.digest}")
    assert "layer-" in pulled.stderr
    assert ": done" in pulled.stderr
    checked = daemon.cli("images", "check", ref).stdout.splitlines()
    assert checked[1].split()[0] == ref
    assert checked[1].split()[-1] == "true"  # UNPACKED
    assert "complete (3/3)" in checked[1]
    pushed = daemon.cli("images", "push", "--plain-http", ref, registry.ref("cli-pushed", "v1"))
    assert pushed.returncode == 0, pushed.stderr
    archive = tmp_path / "out.tar"
    exported = daemon.cli("images", "export", str(archive), ref)
    assert exported.returncode == 0, exported.stderr
    assert not Path(f"{archive}.partial").exists()
    imported = daemon.cli("--namespace", "other", "images", "import", str(archive))
    assert imported.returncode == 0, imported.stderr
    image = registry_images.images["busybox"]
    chain = chain_ids([layer.diff_id for layer in image.layers])[-1]
    assert imported.stdout.strip() == f"{ref}: {image.descriptor.digest} unpacked {chain}"
    missing = daemon.cli("images", "export", str(tmp_path / "none.tar"), "no/such:image")
    assert missing.returncode == 1
    assert "not_found" in missing.stderr
    assert not (tmp_path / "none.tar").exists()
    bad = daemon.cli("images", "pull", "--plain-http", "UPPER/case")
    assert bad.returncode == 1
    assert "invalid_argument" in bad.stderr


def test_pull_killed_mid_download_resumes_without_fetching_finished_blobs(
        berthd_factory: BerthdFactory, registry: RegistryServer, faulty_proxy_factory: Any, tmp_path: Path) -> None:
    import threading
    import time

    from imagebuild import file, make_image, make_layer, skopeo_copy, write_oci_layout

    small = [make_layer([file(f"small{i}", os.urandom(64 << 10))]) for i in range(2)]
    big = make_layer([file("big", os.urandom(8 << 20))], "")
    image = make_image([*small, big])
    skopeo_copy(write_oci_layout(tmp_path / "layout", {"v1": image}), "v1", registry.ref("resume", "v1"))
    proxy = faulty_proxy_factory.start(registry.host)
    proxy.stall_blob, proxy.stall_after = big.blob.digest, 3 << 20
    daemon = berthd_factory.start(name="resume")
    failures: list[BaseException] = []

    def pull() -> None:
        try:
            with daemon.client(timeout=120.0) as client:
                client.images_pull(f"{proxy.host}/resume:v1", plain_http=True)
        except BaseException as err:  # the daemon is killed under it
            failures.append(err)

    thread = threading.Thread(target=pull)
    thread.start()
    with daemon.client() as watcher:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            statuses = watcher.call("content.list_statuses", {})["statuses"]
            done = all(_has_blob(watcher, digest) for digest in (image.config.digest,
                                                                   *(layer.blob.digest for layer in small)))
            if done and any(s["ref"] == f"layer-{big.blob.digest}" and s["offset"] >= 2 << 20 for s in statuses):
                break
            time.sleep(0.05)
        else:
            raise AssertionError("the pull never reached the stalled layer")
    daemon.stop(signal.SIGKILL)
    proxy.release.set()
    thread.join(60)
    assert failures  # the pull did not finish
    proxy.stall_blob = ""
    proxy.requests.clear()
    restarted = berthd_factory.start(name="resume")
    with restarted.client(timeout=120.0) as client:
        result = client.images_pull(f"{proxy.host}/resume:v1", plain_http=True)
    assert result["chain_id"] == chain_ids([layer.diff_id for layer in image.layers])[-1]
    blob_gets = [(path, byte_range) for method, path, byte_range in proxy.requests
                 if method == "GET" and "/blobs/" in path]
    assert [path for path, _ in blob_gets] == [f"/v2/resume/blobs/{big.blob.digest}"]  # nothing else again
    assert blob_gets[0][1].startswith("bytes=")
    assert int(blob_gets[0][1].removeprefix("bytes=").split("-")[0]) >= 2 << 20  # resumed, not restarted


def _has_blob(client: Client, digest: str) -> bool:
    try:
        client.call("content.info", {"digest": digest})
    except NotFound:
        return False
    return True


def test_import_of_a_docker_save_archive(client: Client, tmp_path: Path) -> None:
    """``docker save``'s layout: manifest.json naming ``<id>.json`` configs and ``<id>/layer.tar`` layers
    (uncompressed here, gzip for the second layer: both happen in the wild)."""
    import gzip
    import hashlib
    import tarfile

    from imagebuild import file, make_image, make_layer

    image = make_image([make_layer([file("a.txt", b"first layer\n")], ""),
                        make_layer([file("b.txt", b"second layer\n")], "")])
    config = image.config.data
    config_id = hashlib.sha256(config).hexdigest()
    layers = [image.layers[0].tar, gzip.compress(image.layers[1].tar, mtime=0)]
    archive = tmp_path / "saved.tar"
    with tarfile.open(archive, "w") as tar:
        def add(name: str, data: bytes) -> None:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))

        paths = []
        for index, data in enumerate(layers):
            paths.append(f"layer{index}/layer.tar")
            add(paths[-1], data)
        add(f"{config_id}.json", config)
        add("manifest.json", json.dumps([{"Config": f"{config_id}.json", "RepoTags": ["saved/app:1.0"],
                                          "Layers": paths}]).encode())
    with archive.open("rb") as source:
        result = client.images_import(source)
    assert [i["name"] for i in result["images"]] == ["docker.io/saved/app:1.0"]
    assert result["images"][0]["chain_id"] == chain_ids([layer.diff_id for layer in image.layers])[-1]
