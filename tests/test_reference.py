"""Image references normalise as Docker's ``distribution/reference`` does, and bad ones are refused by name."""

from __future__ import annotations

import pytest

from berth.core.errdefs import InvalidArgument
from berth.plugins.images.reference import Reference, host_is_loopback, parse_reference

DIGEST = "sha256:" + "ab" * 32


@pytest.mark.parametrize(("text", "expected"), [
    ("busybox", "docker.io/library/busybox:latest"),
    ("library/busybox", "docker.io/library/busybox:latest"),
    ("docker.io/busybox", "docker.io/library/busybox:latest"),
    ("docker.io/library/busybox:1.36", "docker.io/library/busybox:1.36"),
    ("index.docker.io/library/busybox", "docker.io/library/busybox:latest"),
    ("index.docker.io/busybox", "docker.io/library/busybox:latest"),
    ("user/repo", "docker.io/user/repo:latest"),
    ("user/repo/deeper", "docker.io/user/repo/deeper:latest"),
    ("localhost/foo", "localhost/foo:latest"),
    ("localhost:5000/foo/bar:tag", "localhost:5000/foo/bar:tag"),
    ("example.com/a/b/c:v1.2_3-x", "example.com/a/b/c:v1.2_3-x"),
    ("quay.io/a.b/c__d/e--f:latest", "quay.io/a.b/c__d/e--f:latest"),
    (f"127.0.0.1:5000/repo@{DIGEST}", f"127.0.0.1:5000/repo@{DIGEST}"),
    (f"busybox@{DIGEST}", f"docker.io/library/busybox@{DIGEST}"),
    (f"busybox:1.36@{DIGEST}", f"docker.io/library/busybox:1.36@{DIGEST}"),
    ("[::1]:5000/x", "[::1]:5000/x:latest"),
    ("Upper.Example.com/repo", "Upper.Example.com/repo:latest"),
])
def test_normalisation(text: str, expected: str) -> None:
    ref = parse_reference(text)
    assert ref.name() == expected
    assert str(ref) == expected
    assert parse_reference(expected) == ref


def test_parts_and_registry_host() -> None:
    ref = parse_reference("busybox")
    assert (ref.domain, ref.repository, ref.tag, ref.digest) == ("docker.io", "library/busybox", "latest", "")
    assert ref.locator == "docker.io/library/busybox"
    assert ref.registry_host() == "registry-1.docker.io"
    assert ref.object == "latest"
    local = parse_reference(f"127.0.0.1:5000/team/app:v1@{DIGEST}")
    assert (local.domain, local.repository, local.tag, local.digest) == ("127.0.0.1:5000", "team/app", "v1", DIGEST)
    assert local.registry_host() == "127.0.0.1:5000"
    assert local.object == DIGEST
    assert local.is_loopback()
    assert not ref.is_loopback()


def test_with_tag_and_digest() -> None:
    ref = parse_reference(f"example.com/app:v1@{DIGEST}")
    assert ref.with_tag("v2") == Reference("example.com", "app", "v2", "")
    assert ref.with_tag("v2").with_digest(DIGEST).name() == f"example.com/app:v2@{DIGEST}"
    with pytest.raises(InvalidArgument, match="invalid tag"):
        ref.with_tag("-bad")
    with pytest.raises(InvalidArgument, match="digest"):
        ref.with_digest("sha256:1234")


@pytest.mark.parametrize(("text", "message"), [
    ("", "empty"),
    ("Busybox", "must be lowercase"),
    ("docker.io/Library/busybox", "must be lowercase"),
    ("a" * 64, "64-byte hexadecimal"),
    ("busybox:", "invalid reference"),
    (":tag", "invalid reference"),
    ("foo//bar", "invalid reference"),
    ("-foo", "invalid reference"),
    ("foo:-tag", "invalid reference"),
    ("foo:" + "t" * 129, "invalid reference"),
    ("foo@sha256:1234", "invalid reference"),
    ("foo@sha256:" + "AB" * 32, "invalid digest"),
    ("foo@md5:" + "ab" * 16, "invalid digest"),
    ("example.com/" + "a" * 250, "longer than 255"),
    ("host:port/repo", "invalid reference"),
])
def test_invalid_references_name_the_reference(text: str, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message) as info:
        parse_reference(text)
    assert repr(text)[:40].rstrip("'") in str(info.value)


@pytest.mark.parametrize(("host", "loopback"), [
    ("localhost", True), ("localhost:5000", True), ("127.0.0.1", True), ("127.0.0.1:5000", True),
    ("[::1]:5000", True), ("::1", True), ("LOCALHOST:1", True),
    ("example.com", False), ("10.0.0.1:5000", False), ("localhost.example.com", False), ("127.0.0.2", False),
])
def test_loopback_hosts(host: str, loopback: bool) -> None:
    assert host_is_loopback(host) is loopback
