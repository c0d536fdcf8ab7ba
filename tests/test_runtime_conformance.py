"""The runtime conformance suite (berth.conformance.runtime) on each runtime plugin berth ships: runc,
and berth's own ``builtin`` (skipped, with the reason, where ``berth-runtime`` is not installed)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager

import pytest
from conftest import IMAGE, BerthdFactory, BerthdProcess

from berth.conformance.pytest_plugin import runtime_tests
from berth.conformance.runtime import RuntimeTarget


def opener(daemon: BerthdProcess, runtime: str) -> Callable[[], AbstractContextManager[RuntimeTarget]]:
    with daemon.client() as client:
        plugins = {p["id"]: p for p in client.call("introspection.plugins", {
            "filters": ["type==io.berth.runtime.v1"]})["plugins"]}
    plugin = plugins.get(runtime)
    if plugin is None or plugin["status"] != "ok":
        reason = (plugin.get("error") or {}).get("message", plugin["status"]) if plugin else "not registered"
        pytest.skip(f"runtime {runtime} is not loaded here: {reason}")

    @contextlib.contextmanager
    def open_runtime() -> Iterator[RuntimeTarget]:
        yield RuntimeTarget(address=str(daemon.address), runtime=runtime, image=IMAGE, prefix=f"conf-{runtime}")

    return open_runtime


@pytest.fixture
def open_runc(daemon: BerthdProcess) -> Callable[[], AbstractContextManager[RuntimeTarget]]:
    return opener(daemon, "runc")


@pytest.fixture
def open_builtin(daemon: BerthdProcess) -> Callable[[], AbstractContextManager[RuntimeTarget]]:
    return opener(daemon, "builtin")


test_runc = runtime_tests("open_runc")
test_builtin = runtime_tests("open_builtin")


def test_a_missing_runtime_binary_skips_its_cases_with_the_reason(berthd_factory: BerthdFactory) -> None:
    """Where berth-runtime is not installed, the builtin cases are skipped saying so, never passed."""
    daemon = berthd_factory.start({"plugins": {"io.berth.runtime.v1.builtin": {
        "binary": "/nonexistent/berth-runtime"}}})
    with pytest.raises(pytest.skip.Exception) as skipped:
        opener(daemon, "builtin")
    assert "berth-runtime is not installed" in str(skipped.value)
    assert opener(daemon, "runc") is not None  # runc itself is still there
