"""Per-registry settings in containerd's hosts.toml shape and credentials from Docker's config.json:
parsing and errors, then mirrors and server overrides against real registries (127.0.0.1 only)."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
from imagebuild import busybox_image, generated_image, push_image
from registry_fixture import FaultyProxyFactory, RegistryFactory, RegistryServer

from berth.core.errdefs import InvalidArgument, NotFound, Unavailable
from berth.plugins.images.hosts import CAPABILITIES, Credentials, RegistryHost, RegistryHosts, load_docker_config
from berth.plugins.images.registry import Resolver, RetryPolicy

FAST = RetryPolicy(attempts=2, base_delay=0.01, max_delay=0.05)


def write_hosts(config_path: Path, host: str, text: str) -> Path:
    path = config_path / host / "hosts.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_defaults_without_a_config() -> None:
    hosts = RegistryHosts()
    assert hosts.hosts("docker.io") == [RegistryHost(scheme="https", host="registry-1.docker.io")]
    assert hosts.hosts("example.com:5000")[0].url == "https://example.com:5000/v2"
    assert hosts.hosts("127.0.0.1:5000", plain_http=True)[0].url == "http://127.0.0.1:5000/v2"
    assert hosts.hosts("localhost:5000", plain_http=True)[0].scheme == "http"
    assert RegistryHosts(Path("/nonexistent")).hosts("quay.io")[0].url == "https://quay.io/v2"


@pytest.mark.parametrize("host", ["example.com", "10.1.2.3:5000", "localhost.example.com"])
def test_plain_http_flag_refused_for_remote_hosts(host: str) -> None:
    with pytest.raises(InvalidArgument, match=f"only allowed for a loopback registry, not {host}"):
        RegistryHosts().hosts(host, plain_http=True)


def test_hosts_toml_full(tmp_path: Path) -> None:
    path = write_hosts(tmp_path, "docker.io", """
server = "https://registry-1.docker.io"
capabilities = ["pull", "resolve"]
ca = "server-ca.pem"

[host."http://mirror.internal:5000"]
capabilities = ["pull"]
[host."http://mirror.internal:5000".header]
x-mirror = "berth"
x-list = ["a", "b"]

[host."https://cache.internal/prefix/v2"]
skip_verify = true
ca = ["one.pem", "/abs/two.pem"]
client = [["client.pem", "client.key"], "both.pem"]

[host."https://other.internal/custom"]
override_path = true
""")
    hosts = RegistryHosts(tmp_path).hosts("docker.io")
    assert [h.url for h in hosts] == ["http://mirror.internal:5000/v2", "https://cache.internal/prefix/v2",
                                      "https://other.internal/custom", "https://registry-1.docker.io/v2"]
    mirror, cache, other, server = hosts
    assert mirror.capabilities == {"pull"}
    assert mirror.headers == {"x-mirror": ("berth",), "x-list": ("a", "b")}
    assert cache.skip_verify
    assert cache.ssl_context() is False
    assert cache.ca == (path.parent / "one.pem", Path("/abs/two.pem"))
    assert cache.client_certs == ((path.parent / "client.pem", path.parent / "client.key"),
                                  (path.parent / "both.pem", None))
    assert other.capabilities == CAPABILITIES
    assert server.capabilities == {"pull", "resolve"}
    assert server.ca == (path.parent / "server-ca.pem",)


def test_hosts_toml_server_override_and_default_dir(tmp_path: Path) -> None:
    write_hosts(tmp_path, "registry.example.com", 'server = "http://127.0.0.1:5999"\n')
    write_hosts(tmp_path, "_default", '[host."https://catchall.example"]\ncapabilities = ["pull", "resolve"]\n')
    hosts = RegistryHosts(tmp_path)
    # Configured plain HTTP is allowed for any host.
    assert [h.url for h in hosts.hosts("registry.example.com")] == ["http://127.0.0.1:5999/v2"]
    assert [h.url for h in hosts.hosts("quay.io")] == ["https://catchall.example/v2", "https://quay.io/v2"]


@pytest.mark.parametrize(("text", "message"), [
    ("server = 5", "'server' must be a URL string"),
    ('server = "ftp://x"', "is not an http"),
    ("insecure = true", "unknown key 'insecure'"),
    ('capabilities = ["pull", "delete"]', "capabilities: unknown \\['delete'\\]"),
    ('skip_verify = "yes"', "skip_verify must be a boolean"),
    ("ca = 3", "ca must be a path"),
    ('[host."https://m"]\ncapability = ["pull"]', "unknown key host.'https://m'.'capability'"),
    ('[host."https://m"]\noverride_path = 1', "override_path must be a boolean"),
    ('[host."https://m"]\nclient = [[1, 2]]', "client entry"),
    ('[host."https://m".header]\nx = 1', "header.x must be a string"),
    ("host = 1", "'host' must be a table"),
    ("not toml [", "cannot read hosts file"),
])
def test_hosts_toml_errors_name_the_file_and_key(tmp_path: Path, text: str, message: str) -> None:
    path = write_hosts(tmp_path, "example.com", text)
    with pytest.raises(InvalidArgument, match=message) as info:
        RegistryHosts(tmp_path).hosts("example.com")
    assert str(path) in str(info.value)


def test_docker_config_credentials(tmp_path: Path) -> None:
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"auths": {
        "https://index.docker.io/v1/": {"auth": base64.b64encode(b"hubuser:hub:pass").decode()},
        "registry.example.com:5000": {"username": "u", "password": "p"},
        "http://Quay.IO/v2/": {"identitytoken": "refresh-me"},
        "ghcr.io": {"registrytoken": "bearer-me"},
    }, "credsStore": "desktop"}))
    hosts = RegistryHosts.load(None, config)
    assert hosts.credentials("docker.io") == Credentials(username="hubuser", password="hub:pass")
    assert hosts.credentials("registry-1.docker.io") == hosts.credentials("docker.io")
    assert hosts.credentials("registry.example.com:5000") == Credentials(username="u", password="p")
    assert hosts.credentials("quay.io") == Credentials(identity_token="refresh-me")
    assert hosts.credentials("ghcr.io") == Credentials(registry_token="bearer-me")
    assert hosts.credentials("registry.example.com") is None
    assert load_docker_config(tmp_path / "missing.json") == {}


@pytest.mark.parametrize(("content", "message"), [
    ("{", "not valid JSON"),
    ("[]", "must be a JSON object"),
    ('{"auths": []}', "'auths' must be an object"),
    ('{"auths": {"h": {"auth": "!!!"}}}', "auths.h.auth is not base64"),
    ('{"auths": {"h": {"auth": "' + base64.b64encode(b"nocolon").decode() + '"}}}', "must decode to user:password"),
    ('{"auths": {"h": {"username": 5}}}', "auths.h must be an object of strings"),
])
def test_docker_config_errors_name_the_file(tmp_path: Path, content: str, message: str) -> None:
    config = tmp_path / "config.json"
    config.write_text(content)
    with pytest.raises(InvalidArgument, match=message) as info:
        RegistryHosts.load(None, config)
    assert str(config) in str(info.value)


async def test_short_names_through_a_configured_server(registry: RegistryServer, tmp_path: Path) -> None:
    """``busybox`` is docker.io/library/busybox:latest; hosts.toml for docker.io points it at the local
    registry, so Docker's normalisation is exercised end to end without leaving 127.0.0.1."""
    image = busybox_image()
    write_hosts(tmp_path, "docker.io", f'server = "http://{registry.host}"\n')
    async with Resolver(RegistryHosts(), plain_http=True, retry=FAST) as r:
        await push_image(r.pusher(registry.ref("library/busybox", "latest")), image, tag="latest")
    async with Resolver(RegistryHosts(tmp_path), retry=FAST) as r:
        name, desc = await r.resolve("busybox")
        assert (name, desc) == ("docker.io/library/busybox:latest", image.descriptor)
        layer = image.layers[0].blob
        assert await r.fetcher("busybox").fetch_bytes(layer.descriptor()) == layer.data


async def test_mirror_first_then_server(registry_factory: RegistryFactory, faulty_proxy_factory: FaultyProxyFactory,
                                        tmp_path: Path) -> None:
    """Mirrors are tried in order and a failing or empty one passes the request on; resolve only uses
    hosts with the resolve capability, and pushes go to push hosts."""
    mirror, server = registry_factory.start(), registry_factory.start()
    mirrored, upstream_only = generated_image(seed=51, layers=1), generated_image(seed=52, layers=1)
    async with Resolver(RegistryHosts(), plain_http=True, retry=FAST) as r:
        await push_image(r.pusher(mirror.ref("team/app", "v1")), mirrored, tag="v1")
        await push_image(r.pusher(server.ref("team/app", "v1")), upstream_only, tag="v1")
        await push_image(r.pusher(server.ref("team/app", "v2")), upstream_only, tag="v2")
    broken = faulty_proxy_factory.start(mirror.host)
    broken.fail_next = 1000
    write_hosts(tmp_path, "registry.example.com", f"""
server = "http://{server.host}"
[host."http://{broken.host}"]
capabilities = ["pull", "resolve"]
[host."http://{mirror.host}"]
capabilities = ["pull", "resolve"]
""")
    async with Resolver(RegistryHosts(tmp_path), retry=FAST) as r:
        _, desc = await r.resolve("registry.example.com/team/app:v1")
        assert desc == mirrored.descriptor
        _, desc = await r.resolve("registry.example.com/team/app:v2")
        assert desc == upstream_only.descriptor
        layer = upstream_only.layers[0].blob
        assert await r.fetcher("registry.example.com/team/app").fetch_bytes(layer.descriptor()) == layer.data
        with pytest.raises(NotFound, match=r"registry\.example\.com/team/app:v3"):
            await r.resolve("registry.example.com/team/app:v3")
        pushed = generated_image(seed=53, layers=1)
        await push_image(r.pusher("registry.example.com/team/pushed:v1"), pushed, tag="v1")
    assert broken.requests
    async with Resolver(RegistryHosts(), plain_http=True, retry=FAST) as r:
        _, desc = await r.resolve(server.ref("team/pushed", "v1"))
        assert desc == pushed.descriptor
        with pytest.raises(NotFound):
            await r.resolve(mirror.ref("team/pushed", "v1"))


async def test_mirror_without_resolve_capability_is_not_asked_for_tags(
        registry_factory: RegistryFactory, faulty_proxy_factory: FaultyProxyFactory, tmp_path: Path) -> None:
    server = registry_factory.start()
    image = generated_image(seed=54, layers=1)
    async with Resolver(RegistryHosts(), plain_http=True, retry=FAST) as r:
        await push_image(r.pusher(server.ref("app", "v1")), image, tag="v1")
    pull_only = faulty_proxy_factory.start(server.host)
    write_hosts(tmp_path, "registry.example.com", f"""
server = "http://{server.host}"
[host."http://{pull_only.host}"]
capabilities = ["pull"]
""")
    async with Resolver(RegistryHosts(tmp_path), retry=FAST) as r:
        _, desc = await r.resolve("registry.example.com/app:v1")
        layer = image.layers[0].blob
        await r.fetcher("registry.example.com/app").fetch_bytes(layer.descriptor())
    assert desc == image.descriptor
    assert [(method, "/manifests/" in path) for method, path, _ in pull_only.requests] == [("GET", False)]


async def test_tls_registry_with_the_ca_from_hosts_toml(tls_registry: RegistryServer, tmp_path: Path) -> None:
    """HTTPS to a registry whose certificate comes from a test CA: refused by default, accepted with the
    CA named in hosts.toml (relative to the file) or with skip_verify; plain_http is not needed."""
    assert tls_registry.ca_path is not None
    image = generated_image(seed=55, layers=1)
    ref = tls_registry.ref("tls/app", "v1")
    async with Resolver(RegistryHosts(), retry=FAST) as r:
        with pytest.raises(Unavailable, match="CERTIFICATE_VERIFY_FAILED"):
            await r.resolve(ref)
    hosts_file = write_hosts(tmp_path / "with-ca", tls_registry.host, 'ca = "ca.pem"\n')
    (hosts_file.parent / "ca.pem").write_bytes(tls_registry.ca_path.read_bytes())
    async with Resolver(RegistryHosts(tmp_path / "with-ca"), retry=FAST) as r:
        await push_image(r.pusher(ref), image, tag="v1")
        _, desc = await r.resolve(ref)
        assert desc == image.descriptor
    write_hosts(tmp_path / "skip", tls_registry.host, "skip_verify = true\n")
    async with Resolver(RegistryHosts(tmp_path / "skip"), retry=FAST) as r:
        _, desc = await r.resolve(ref)
        assert desc == image.descriptor
    write_hosts(tmp_path / "bad-ca", tls_registry.host, 'ca = "missing.pem"\n')
    async with Resolver(RegistryHosts(tmp_path / "bad-ca"), retry=FAST) as r:
        with pytest.raises(InvalidArgument, match="cannot load TLS files"):
            await r.resolve(ref)
