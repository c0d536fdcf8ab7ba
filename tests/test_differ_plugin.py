"""The walking differ as a plugin of a real berthd: it loads (status ok) with a config table of its own."""

from __future__ import annotations

from conftest import BerthdFactory


def test_differ_plugin_loads(berthd_factory: BerthdFactory) -> None:
    daemon = berthd_factory.start(config={"plugins": {"io.berth.differ.v1.walking": {"allow_devices": True}}})
    result = daemon.cli("plugins", "ls", "type==io.berth.differ.v1")
    assert result.returncode == 0, result.stderr
    rows = [line.split() for line in result.stdout.splitlines()[1:] if line.strip()]
    assert [(row[0], row[1], row[-1]) for row in rows] == [("io.berth.differ.v1", "walking", "ok")]
