"""berth.core.config: loading, checking, imports, overrides, and `berthd config`."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import textwrap
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import tomli_w

import berth.core.config as config_module
from berth.core.config import (
    Config,
    ConfigError,
    LoadedConfig,
    LogConfig,
    RPCConfig,
    TimeoutsConfig,
    default_config_document,
    load_config,
)
from berth.core.decode import Duration
from berth.core.errdefs import InvalidArgument
from berth.core.plugin import InitContext, Registration, plugin_ref

SNAP = "io.x.snapshotter.v1"
OVERLAY = f"{SNAP}.overlay"
NATIVE = f"{SNAP}.native"
USER = "io.x.service.v1.user"
NOCONF = "io.x.internal.v1.noconf"


@dataclass(kw_only=True)
class SnapConfig:
    root_path: str = ""
    mount_options: list[str] = field(default_factory=list)
    sync_remove: bool = False
    delay: Duration = Duration(0.1)


@dataclass(kw_only=True)
class UserConfig:
    snapshotter: str = plugin_ref(SNAP, "overlay")
    workers: int = 2


async def _init(ic: InitContext) -> object:
    return object()


REGS = [
    Registration(type=SNAP, id="overlay", init=_init, config=SnapConfig),
    Registration(type=SNAP, id="native", init=_init, config=SnapConfig),
    Registration(type="io.x.service.v1", id="user", init=_init, requires=(SNAP,), config=UserConfig),
    Registration(type="io.x.internal.v1", id="noconf", init=_init),
]


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


def load(path: Path, overrides: Mapping[tuple[str, ...], Any] | None = None) -> LoadedConfig:
    return load_config(path, REGS, overrides=overrides)


def config_error(path: Path) -> str:
    with pytest.raises(ConfigError) as info:
        load(path)
    assert isinstance(info.value, InvalidArgument)  # travels as invalid_argument
    return str(info.value)


# ---------------------------------------------------------------------------------------------- defaults


def test_an_empty_file_gives_the_defaults(tmp_path: Path) -> None:
    main = write(tmp_path / "config.toml", "")
    loaded = load(main)
    assert loaded.config == Config()
    assert loaded.config.version == 1
    assert loaded.config.root == "/var/lib/berth"
    assert loaded.config.state == "/run/berth"
    assert loaded.config.rpc == RPCConfig()
    assert loaded.config.rpc.address == "/run/berth/berth.sock"
    assert loaded.config.rpc.max_message_size == 16 * 1024 * 1024
    assert loaded.config.log == LogConfig(level="info", format="console")
    assert loaded.config.timeouts == TimeoutsConfig()
    assert loaded.config.strict_plugins is False
    assert loaded.plugin_configs == {OVERLAY: SnapConfig(), NATIVE: SnapConfig(), USER: UserConfig()}
    assert loaded.files == [main]
    assert loaded.source_of("root") == str(main)


def test_no_file_at_all_gives_the_defaults(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(config_module, "DEFAULT_CONFIG_PATH", tmp_path / "absent.toml")
    loaded = load_config(None, REGS)
    assert loaded.config == Config()
    assert loaded.files == []
    assert loaded.source_of("rpc", "address") == "defaults"


def test_the_default_path_is_read_when_present(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    default = write(tmp_path / "etc.toml", 'root = "/srv/berth"\n')
    monkeypatch.setattr(config_module, "DEFAULT_CONFIG_PATH", default)
    loaded = load_config(None, REGS)
    assert loaded.config.root == "/srv/berth"
    assert loaded.files == [default]


def test_values_are_decoded(tmp_path: Path) -> None:
    main = write(tmp_path / "config.toml", f"""
        root = "/srv/berth"
        strict_plugins = true
        disabled_plugins = ["{NATIVE}"]
        required_plugins = ["{OVERLAY}"]
        [rpc]
        address = "/tmp/b.sock"
        gid = 42
        [log]
        level = "debug"
        format = "json"
        [timeouts]
        plugin_close = "1m30s"
        shutdown_grace = 2
        [plugins."{OVERLAY}"]
        mount_options = ["ro"]
        delay = "250ms"
        [plugins."{USER}"]
        snapshotter = "overlay"
        workers = 8
    """)
    loaded = load(main)
    c = loaded.config
    assert (c.root, c.strict_plugins, c.disabled_plugins, c.required_plugins) == (
        "/srv/berth", True, [NATIVE], [OVERLAY])
    assert (c.rpc.address, c.rpc.gid, c.log.level, c.log.format) == ("/tmp/b.sock", 42, "debug", "json")
    assert c.timeouts.plugin_close == 90.0
    assert c.timeouts.shutdown_grace == 2.0
    assert loaded.plugin_configs[OVERLAY] == SnapConfig(mount_options=["ro"], delay=Duration(0.25))
    assert loaded.plugin_configs[USER] == UserConfig(snapshotter="overlay", workers=8)
    assert loaded.plugin_configs[NATIVE] == SnapConfig()


# ---------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("text", "fragments"),
    [
        ("colour = 1\n", ["colour: unknown key"]),
        ("[rpc]\nbogus = 1\n", ["[rpc] bogus: unknown key"]),
        ('[rpc]\ngid = "wheel"\n', ["[rpc] gid: expected integer, got string 'wheel'"]),
        ("[rpc]\ngid = -1\n", ["rpc", "gid must not be negative"]),
        ("[rpc]\nmax_message_size = 10\n", ["rpc", "max_message_size must be between"]),
        ('[log]\nlevel = "loud"\n', ["[log] level: must be one of 'debug', 'info', 'warn', 'error'", "'loud'"]),
        ('[log]\nformat = "xml"\n', ["[log] format: must be one of"]),
        ('[timeouts]\nplugin_close = "soon"\n', ["[timeouts] plugin_close: invalid duration 'soon'"]),
        ("version = 2\n", ["version", "newer than this berthd supports"]),
        ("version = 0\n", ["version 0 is not a berth config version"]),
        ('root = "relative/dir"\n', ["root must be an absolute path"]),
        ("strict_plugins = 1\n", ["strict_plugins: expected boolean"]),
        ('disabled_plugins = "x"\n', ["disabled_plugins: expected array"]),
        ('disabled_plugins = ["cri"]\n', ["disabled_plugins: 'cri' is not a plugin URI"]),
        ('required_plugins = ["overlayfs"]\n', ["required_plugins: 'overlayfs' is not a plugin URI"]),
        ('[plugins."io.x.v1.y"]\na = 1\n', ['[plugins."io.x.v1.y"]: no such plugin is registered', OVERLAY]),
        (f'[plugins."{OVERLAY}"]\nbogus = 1\n', [f'[plugins."{OVERLAY}"] bogus: unknown key', "mount_options"]),
        (f'[plugins."{OVERLAY}"]\nsync_remove = "yes"\n', [f'[plugins."{OVERLAY}"] sync_remove: expected boolean']),
        (f'[plugins."{OVERLAY}"]\nmount_options = [1]\n', [f'[plugins."{OVERLAY}"] mount_options.[0]: expected']),
        (f'[plugins."{NOCONF}"]\nx = 1\n', [f'[plugins."{NOCONF}"]: this plugin takes no config']),
        (f'[plugins."{USER}"]\nsnapshotter = "zfs"\n',
         [f'[plugins."{USER}"] snapshotter: names {SNAP} plugin \'zfs\', which is not registered',
          "registered: overlay, native"]),
        (f'disabled_plugins = ["{NATIVE}"]\n[plugins."{USER}"]\nsnapshotter = "native"\n',
         [f'[plugins."{USER}"] snapshotter: names {SNAP} plugin \'native\', which is in disabled_plugins']),
        ("[rpc\n", ["invalid TOML"]),
        ("root = \n", ["invalid TOML"]),
    ],
)
def test_config_errors_name_file_table_and_key(tmp_path: Path, text: str, fragments: list[str]) -> None:
    main = write(tmp_path / "config.toml", text)
    message = config_error(main)
    assert message.startswith(f"config {main}: ")
    for fragment in fragments:
        assert fragment in message


def test_a_disabled_plugin_with_a_broken_ref_is_not_checked(tmp_path: Path) -> None:
    main = write(tmp_path / "config.toml", f"""
        disabled_plugins = ["{USER}"]
        [plugins."{USER}"]
        snapshotter = "zfs"
    """)
    assert load(main).config.disabled_plugins == [USER]


def test_an_empty_ref_is_not_checked(tmp_path: Path) -> None:
    main = write(tmp_path / "config.toml", f'[plugins."{USER}"]\nsnapshotter = ""\n')
    assert load(main).plugin_configs[USER].snapshotter == ""


def test_a_table_for_a_plugin_without_config_may_be_empty(tmp_path: Path) -> None:
    main = write(tmp_path / "config.toml", f'[plugins."{NOCONF}"]\n')
    assert NOCONF not in load(main).plugin_configs


def test_a_missing_explicit_file_is_an_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    message = config_error(missing)
    assert message == f"config {missing}: file not found"


def test_an_unreadable_file_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "dir.toml").mkdir()
    assert "cannot read" in config_error(tmp_path / "dir.toml")
    binary = tmp_path / "binary.toml"
    binary.write_bytes(b"root = \"\xff\xfe\"\n")
    message = config_error(binary)
    assert str(binary) in message


def test_config_error_carries_source_and_path(tmp_path: Path) -> None:
    main = write(tmp_path / "config.toml", "[rpc]\ngid = true\n")
    with pytest.raises(ConfigError) as info:
        load(main)
    assert info.value.source == str(main)
    assert info.value.path == ("rpc", "gid")
    assert info.value.code == "invalid_argument"


# ---------------------------------------------------------------------------------------------- imports


def test_imports_are_relative_globs_and_followed(tmp_path: Path) -> None:
    main = write(tmp_path / "config.toml", 'imports = ["conf.d/*.toml"]\n')
    a = write(tmp_path / "conf.d" / "a.toml", 'imports = ["../extra/c.toml"]\n')
    b = write(tmp_path / "conf.d" / "b.toml", '[log]\nlevel = "warn"\n')
    c = write(tmp_path / "extra" / "c.toml", '[log]\nformat = "json"\n')
    write(tmp_path / "conf.d" / "ignored.txt", "garbage = = =")
    loaded = load(main)
    assert [f.resolve() for f in loaded.files] == [main, a, b, c]
    assert loaded.config.log == LogConfig(level="warn", format="json")
    assert loaded.source_of("log", "level") == str(b)
    assert Path(loaded.source_of("log", "format")).resolve() == c
    # imports are merged (arrays appended), relative paths kept as written
    assert loaded.config.imports == ["conf.d/*.toml", "../extra/c.toml"]


def test_a_glob_matching_nothing_is_fine(tmp_path: Path) -> None:
    main = write(tmp_path / "config.toml", 'imports = ["conf.d/*.toml"]\n')
    assert load(main).files == [main]


def test_an_absolute_import(tmp_path: Path) -> None:
    other = write(tmp_path / "elsewhere" / "x.toml", 'state = "/run/elsewhere"\n')
    main = write(tmp_path / "dir" / "config.toml", f'imports = ["{other}"]\n')
    assert load(main).config.state == "/run/elsewhere"


def test_each_file_is_read_once(tmp_path: Path) -> None:
    main = write(tmp_path / "config.toml", 'imports = ["a.toml", "a.toml", "b.toml", "./a.toml"]\n')
    a = write(tmp_path / "a.toml", 'imports = ["config.toml"]\ndisabled_plugins = ["io.x.a.v1.one"]\n')
    b = write(tmp_path / "b.toml", 'imports = ["a.toml"]\ndisabled_plugins = ["io.x.b.v1.two"]\n')
    loaded = load(main)
    assert loaded.files == [main, a, b]
    assert loaded.config.disabled_plugins == ["io.x.a.v1.one", "io.x.b.v1.two"]


def test_merge_rules(tmp_path: Path) -> None:
    main = write(tmp_path / "config.toml", f"""
        imports = ["imported.toml"]
        root = "/main/root"
        state = "/main/state"
        strict_plugins = true
        disabled_plugins = ["{NATIVE}", "io.x.a.v1.a"]
        [rpc]
        address = "/main.sock"
        gid = 5
        [plugins."{OVERLAY}"]
        root_path = "/main/overlay"
        sync_remove = true
    """)
    imported = write(tmp_path / "imported.toml", f"""
        root = "/imported/root"
        strict_plugins = false
        disabled_plugins = ["io.x.a.v1.a", "io.x.b.v1.b"]
        [rpc]
        gid = 0
        max_message_size = 8192
        [plugins."{OVERLAY}"]
        mount_options = ["ro"]
    """)
    loaded = load(main)
    c = loaded.config
    assert c.root == "/imported/root"  # a scalar is replaced ...
    assert c.state == "/main/state"
    assert c.strict_plugins is True  # ... unless the import's value is empty (false, 0, "")
    assert c.disabled_plugins == [NATIVE, "io.x.a.v1.a", "io.x.b.v1.b"]  # arrays appended without duplicates
    # tables merged by key; gid = 0 is empty, so the main file's 5 stays
    assert (c.rpc.address, c.rpc.gid, c.rpc.max_message_size) == ("/main.sock", 5, 8192)
    # a plugin's table from an import replaces the earlier one whole
    assert loaded.plugin_configs[OVERLAY] == SnapConfig(mount_options=["ro"])
    assert loaded.source_of("root") == str(imported)
    assert loaded.source_of("state") == str(main)
    assert loaded.source_of("rpc", "gid") == str(main)
    assert loaded.source_of("rpc", "max_message_size") == str(imported)
    assert loaded.source_of("plugins", OVERLAY, "mount_options") == str(imported)


@pytest.mark.parametrize(
    ("text", "fragments"),
    [
        ("[rpc]\nbogus = 1\n", ["[rpc] bogus: unknown key"]),
        (f'[plugins."{OVERLAY}"]\nsync_remove = 1\n', [f'[plugins."{OVERLAY}"] sync_remove: expected boolean']),
        ("version = 2\n", ["version", "newer"]),
        ("[[[", ["invalid TOML"]),
        ('disabled_plugins = ["cri"]\n', ["disabled_plugins: 'cri' is not a plugin URI"]),
    ],
)
def test_an_error_in_an_import_names_that_file(tmp_path: Path, text: str, fragments: list[str]) -> None:
    main = write(tmp_path / "config.toml", 'imports = ["conf.d/*.toml"]\n')
    bad = write(tmp_path / "conf.d" / "bad.toml", text)
    message = config_error(main)
    assert message.startswith(f"config {bad}: ")
    for fragment in fragments:
        assert fragment in message


def test_a_missing_import_is_an_error(tmp_path: Path) -> None:
    main = write(tmp_path / "config.toml", 'imports = ["missing.toml"]\n')
    message = config_error(main)
    assert f"{tmp_path / 'missing.toml'}" in message
    assert "file not found" in message


def test_an_import_may_not_be_newer_than_the_main_file(tmp_path: Path) -> None:
    main = write(tmp_path / "config.toml", 'version = 1\nimports = ["new.toml"]\n')
    new = write(tmp_path / "new.toml", "version = 2\n")
    message = config_error(main)
    assert message.startswith(f"config {new}: version")
    assert "newer" in message


def test_a_ref_to_a_plugin_disabled_in_an_import_names_the_file_that_set_it(tmp_path: Path) -> None:
    main = write(tmp_path / "config.toml", f"""
        imports = ["more.toml"]
        [plugins."{USER}"]
        snapshotter = "native"
    """)
    write(tmp_path / "more.toml", f'disabled_plugins = ["{NATIVE}"]\n')
    message = config_error(main)
    assert message.startswith(f"config {main}: [plugins.\"{USER}\"] snapshotter:")
    assert "disabled_plugins" in message


# ---------------------------------------------------------------------------------------------- overrides


def test_command_line_overrides_win(tmp_path: Path) -> None:
    main = write(tmp_path / "config.toml", """
        root = "/file/root"
        [rpc]
        address = "/file.sock"
        gid = 7
        [log]
        level = "debug"
    """)
    loaded = load(main, overrides={("root",): "/cli/root", ("rpc", "address"): "/cli.sock", ("log", "format"): "json"})
    c = loaded.config
    assert (c.root, c.rpc.address, c.rpc.gid, c.log.level, c.log.format) == (
        "/cli/root", "/cli.sock", 7, "debug", "json")
    assert loaded.source_of("root") == "command line"
    assert loaded.source_of("rpc", "address") == "command line"
    assert loaded.source_of("log", "format") == "command line"
    assert loaded.source_of("rpc", "gid") == str(main)


def test_a_bad_override_is_blamed_on_the_command_line(tmp_path: Path) -> None:
    main = write(tmp_path / "config.toml", "")
    with pytest.raises(ConfigError) as info:
        load(main, overrides={("log", "level"): "loud"})
    assert str(info.value).startswith("config command line: [log] level: must be one of")


# ---------------------------------------------------------------------------------------------- documents


def test_default_document_round_trips(tmp_path: Path) -> None:
    document = default_config_document(REGS)
    assert set(document["plugins"]) == {OVERLAY, NATIVE, USER}
    assert document["plugins"][OVERLAY]["delay"] == "100ms"
    assert document["timeouts"]["plugin_close"] == "5s"
    text = tomli_w.dumps(document)
    assert tomllib.loads(text) == document
    loaded = load(write(tmp_path / "default.toml", text))
    assert dataclasses.replace(loaded.config, plugins={}) == Config()
    assert loaded.plugin_configs == {OVERLAY: SnapConfig(), NATIVE: SnapConfig(), USER: UserConfig()}


def test_effective_document_round_trips(tmp_path: Path) -> None:
    main = write(tmp_path / "config.toml", f"""
        imports = ["more.toml"]
        root = "/srv/berth"
        [timeouts]
        plugin_close = "1m0.000001s"
        [plugins."{OVERLAY}"]
        delay = "1h2m3.5s"
        mount_options = ["ro", "noatime"]
    """)
    write(tmp_path / "more.toml", f"""
        disabled_plugins = ["{NATIVE}"]
        [log]
        level = "warn"
        [plugins."{USER}"]
        workers = 9
    """)
    first = load(main, overrides={("rpc", "address"): "/cli.sock"})
    document = first.effective_document()
    assert document["rpc"]["address"] == "/cli.sock"
    assert document["plugins"][OVERLAY]["delay"] == "1h2m3.5s"
    # a dump is self-contained: its imports are already merged in, so they must not be followed again
    document["imports"] = []
    second = load(write(tmp_path / "dump" / "effective.toml", tomli_w.dumps(document)))
    # Config.plugins holds the raw tables as written; compare everything else, and the decoded plugin tables
    assert dataclasses.replace(second.config, plugins={}) == dataclasses.replace(first.config, imports=[], plugins={})
    assert second.plugin_configs == first.plugin_configs
    assert second.plugin_configs[OVERLAY].delay == 3723.5
    assert second.config.timeouts.plugin_close == pytest.approx(60.000001)
    assert second.config.disabled_plugins == [NATIVE]


# ---------------------------------------------------------------------------------------------- berthd config


def _berthd(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "NOTIFY_SOCKET": ""}
    return subprocess.run([sys.executable, "-m", "berth.plugins.berthd", *args], capture_output=True, text=True,
                          timeout=60, cwd=cwd, env=env, check=False)


def test_berthd_config_default(tmp_path: Path) -> None:
    result = _berthd("config", "default", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    document = tomllib.loads(result.stdout)
    assert document["version"] == 1
    assert document["root"] == "/var/lib/berth"
    assert document["rpc"]["address"] == "/run/berth/berth.sock"
    assert isinstance(document["plugins"], dict)


def test_berthd_config_dump(tmp_path: Path) -> None:
    main = write(tmp_path / "config.toml", """
        root = "/srv/dumped"
        [log]
        level = "error"
    """)
    result = _berthd("--address", str(tmp_path / "x.sock"), "config", "dump", "--config", str(main), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    document = tomllib.loads(result.stdout)
    assert document["root"] == "/srv/dumped"
    assert document["log"]["level"] == "error"
    assert document["rpc"]["address"] == str(tmp_path / "x.sock")


def test_berthd_refuses_a_bad_config(tmp_path: Path) -> None:
    bad = write(tmp_path / "bad.toml", "[rpc]\nmax_message_sise = 4096\n")
    result = _berthd("--config", str(bad), cwd=tmp_path)
    assert result.returncode == 2
    assert str(bad) in result.stderr
    assert "[rpc] max_message_sise: unknown key" in result.stderr
    assert "Traceback" not in result.stderr


def test_berthd_config_dump_refuses_a_bad_config(tmp_path: Path) -> None:
    bad = write(tmp_path / "bad.toml", 'disabled_plugins = ["cri"]\n')
    result = _berthd("config", "dump", "--config", str(bad), cwd=tmp_path)
    assert result.returncode == 2
    assert f"{bad}: disabled_plugins: 'cri' is not a plugin URI" in result.stderr
    assert result.stdout == ""
