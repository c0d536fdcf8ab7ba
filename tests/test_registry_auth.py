"""Registry authentication against real registries: htpasswd Basic auth and a bearer-token flow (a token
server in the test signs JWTs the registry verifies), credentials from a Docker config.json."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
from imagebuild import busybox_image, generated_image, push_image, skopeo_copy, write_oci_layout
from registry_fixture import RegistryFactory, RegistryServer

from berth.core.errdefs import Unauthenticated
from berth.plugins.images.auth import parse_challenges
from berth.plugins.images.hosts import Credentials, RegistryHosts
from berth.plugins.images.registry import Resolver, RetryPolicy

FAST = RetryPolicy(attempts=2, base_delay=0.01, max_delay=0.05)


def resolver(hosts: RegistryHosts) -> Resolver:
    return Resolver(hosts, plain_http=True, retry=FAST)


def test_parse_challenges() -> None:
    [bearer] = parse_challenges('Bearer realm="https://auth.example/token",service="reg",'
                                'scope="repository:a/b:pull,push repository:c:pull"')
    assert bearer.scheme == "bearer"
    assert bearer.params == {"realm": "https://auth.example/token", "service": "reg",
                             "scope": "repository:a/b:pull,push repository:c:pull"}
    basic, second = parse_challenges('Basic realm="x \\"quoted\\"", Bearer realm=https://t/token,error=invalid_token')
    assert (basic.scheme, basic.params) == ("basic", {"realm": 'x "quoted"'})
    assert (second.scheme, second.params) == ("bearer", {"realm": "https://t/token", "error": "invalid_token"})
    assert parse_challenges("") == []


async def test_basic_auth_with_the_right_credentials(auth_registry: RegistryServer) -> None:
    image = generated_image(seed=21, layers=2)
    ref = auth_registry.ref("basic/app", "v1")
    async with resolver(auth_registry.registry_hosts()) as r:
        counts = await push_image(r.pusher(ref), image, tag="v1")
        assert counts == {"pushed": 3, "skipped": 0}
        name, desc = await r.resolve(ref)
        assert desc == image.descriptor
        layer = image.layers[1].blob
        assert await r.fetcher(name).fetch_bytes(layer.descriptor()) == layer.data


@pytest.mark.parametrize(("username", "password"), [("alice", "wrong"), ("mallory", "wonderland"), ("", "")])
async def test_basic_auth_refuses_wrong_or_missing_credentials(auth_registry: RegistryServer, username: str,
                                                               password: str) -> None:
    hosts = auth_registry.registry_hosts(username=username, password=password)
    async with resolver(hosts) as r:
        with pytest.raises(Unauthenticated, match="basic/app"):
            await r.resolve(auth_registry.ref("basic/app", "v1"))


async def test_basic_auth_from_docker_config(auth_registry: RegistryServer, tmp_path: Path) -> None:
    image = busybox_image()
    skopeo_copy(write_oci_layout(tmp_path / "layout", {"v1": image}), "v1", auth_registry.ref("conf/busybox", "v1"),
                creds=auth_registry.skopeo_creds())
    token = base64.b64encode(f"{auth_registry.username}:{auth_registry.password}".encode()).decode()
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"auths": {f"http://{auth_registry.host}/v2/": {"auth": token}}}))
    async with resolver(RegistryHosts.load(None, config)) as r:
        _, desc = await r.resolve(auth_registry.ref("conf/busybox", "v1"))
    assert desc == image.descriptor


async def test_bearer_token_flow_and_cache(token_registry: RegistryServer) -> None:
    """Push and pull with a token per scope: the first request is challenged, later ones reuse the
    cached token (one token request per scope set, not per request)."""
    server = token_registry.token_server
    assert server is not None
    image = generated_image(seed=22, layers=3)
    ref = token_registry.ref("token/app", "v1")
    before = len(server.requests)
    async with resolver(token_registry.registry_hosts()) as r:
        await push_image(r.pusher(ref), image, tag="v1")
        name, desc = await r.resolve(ref)
        fetcher = r.fetcher(name)
        for blob in image.blobs().values():
            assert await fetcher.fetch_bytes(blob.descriptor()) == blob.data
    requests = server.requests[before:]
    assert {request.account for request in requests} == {"alice"}
    assert [sorted(request.scopes) for request in requests] == [
        ["repository:token/app:pull,push"], ["repository:token/app:pull"]]
    assert requests[0].granted == [{"type": "repository", "name": "token/app", "actions": ["pull", "push"]}]
    assert desc == image.descriptor


async def test_anonymous_token_pulls_but_cannot_push(token_registry: RegistryServer) -> None:
    server = token_registry.token_server
    assert server is not None
    image = generated_image(seed=23, layers=1)
    ref = token_registry.ref("token/public", "v1")
    async with resolver(token_registry.registry_hosts()) as r:
        await push_image(r.pusher(ref), image, tag="v1")
    before = len(server.requests)
    async with resolver(RegistryHosts()) as r:
        _, desc = await r.resolve(ref)
        assert desc == image.descriptor
        with pytest.raises(Unauthenticated, match="token/public"):
            await push_image(r.pusher(token_registry.ref("token/public", "v2")), image, tag="v2")
    assert server.requests[before].account == ""
    assert server.requests[before].granted == [{"type": "repository", "name": "token/public", "actions": ["pull"]}]


async def test_token_server_refuses_wrong_credentials(token_registry: RegistryServer) -> None:
    async with resolver(token_registry.registry_hosts(password="wrong")) as r:
        with pytest.raises(Unauthenticated, match="refused the credentials"):
            await r.resolve(token_registry.ref("token/app", "v1"))


async def test_identity_token_is_an_oauth2_refresh_token(token_registry: RegistryServer) -> None:
    server = token_registry.token_server
    assert server is not None
    image = generated_image(seed=24, layers=1)
    ref = token_registry.ref("token/oauth", "v1")
    before = len(server.requests)
    async with resolver(token_registry.registry_hosts(username="", password="",
                                                      identity_token="refresh-alice")) as r:
        await push_image(r.pusher(ref), image, tag="v1")
        _, desc = await r.resolve(ref)
    assert desc == image.descriptor
    assert {(request.method, request.account) for request in server.requests[before:]} == {("POST", "alice")}


async def test_policy_denying_a_repository(registry_factory: RegistryFactory) -> None:
    def policy(account: str, type_: str, name: str, actions: list[str]) -> list[str]:
        return [] if name.startswith("secret/") else list(actions)

    registry = registry_factory.start(auth="token", policy=policy)
    async with resolver(registry.registry_hosts()) as r:
        with pytest.raises(Unauthenticated, match="secret/app"):
            await r.resolve(registry.ref("secret/app", "v1"))


def test_credentials_repr_hides_secrets() -> None:
    assert "pw" not in repr(Credentials(username="u", password="pw", identity_token="pw"))


async def test_a_refused_cached_token_is_dropped_and_fetched_again(registry_factory: RegistryFactory) -> None:
    """The first pull token grants nothing (the registry refuses it); the next resolve sends that cached
    token, is refused, drops it and succeeds with a fresh one instead of failing for the token's lifetime."""
    pull_only: list[bool] = []

    def policy(account: str, type_: str, name: str, actions: list[str]) -> list[str]:
        if actions == ["pull"]:
            pull_only.append(True)
            if len(pull_only) == 1:
                return []
        return list(actions)

    registry = registry_factory.start(auth="token", policy=policy)
    image = generated_image(seed=25, layers=1)
    ref = registry.ref("token/flaky", "v1")
    async with resolver(registry.registry_hosts()) as r:
        await push_image(r.pusher(ref), image, tag="v1")
    assert registry.token_server is not None
    before = len(registry.token_server.requests)
    async with resolver(registry.registry_hosts()) as r:
        with pytest.raises(Unauthenticated, match="token/flaky"):
            await r.resolve(ref)
        _, desc = await r.resolve(ref)
        _, desc = await r.resolve(ref)
    assert desc == image.descriptor
    granted = [request.granted != [] for request in registry.token_server.requests[before:]]
    assert granted == [False, True]
