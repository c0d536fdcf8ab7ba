"""The plugin graph, the registry's checks, module loading, and the daemon's init/close policy."""

from __future__ import annotations

import shutil
import tempfile
import types
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from berth.core.config import load_config
from berth.core.daemon import Daemon, StartupError
from berth.core.errdefs import FailedPrecondition, InvalidArgument, NotFound
from berth.core.plugin import (
    CircularDependency,
    InitContext,
    LoadError,
    PluginStatus,
    Registration,
    Registry,
    SkipPlugin,
    hookimpl,
    load_plugins,
    plugin_graph,
    plugin_ref,
)

SNAP = "io.t.snapshotter.v1"
CONTENT = "io.t.content.v1"
META = "io.t.metadata.v1"
SERVICE = "io.t.service.v1"
OTHER = "io.t.other.v1"


async def _noop(ic: InitContext) -> object:
    return object()


def reg(plugin_type: str, plugin_id: str, *requires: str, config: type | None = None) -> Registration:
    return Registration(type=plugin_type, id=plugin_id, init=_noop, requires=requires, config=config)


def uris(registrations: Sequence[Registration]) -> list[str]:
    return [r.uri for r in registrations]


# ---------------------------------------------------------------------------------------------- plugin_graph


def test_requirements_come_first() -> None:
    service = reg(SERVICE, "images", META)
    meta = reg(META, "sqlite", CONTENT)
    content = reg(CONTENT, "local")
    assert uris(plugin_graph([service, meta, content])) == [content.uri, meta.uri, service.uri]


def test_registration_order_is_kept_where_nothing_requires_otherwise() -> None:
    regs = [reg(OTHER, "b"), reg(OTHER, "a"), reg(CONTENT, "local"), reg(OTHER, "c")]
    assert uris(plugin_graph(regs)) == uris(regs)


def test_all_plugins_of_a_required_type_come_first_in_registration_order() -> None:
    user = reg(SERVICE, "snapshots", SNAP)
    overlay = reg(SNAP, "overlayfs")
    other = reg(OTHER, "x")
    native = reg(SNAP, "native")
    btrfs = reg(SNAP, "btrfs")
    ordered = uris(plugin_graph([user, overlay, other, native, btrfs]))
    assert ordered == [overlay.uri, native.uri, btrfs.uri, user.uri, other.uri]


def test_a_plugin_is_emitted_once() -> None:
    content = reg(CONTENT, "local")
    regs = [reg(SERVICE, "a", CONTENT), reg(META, "m", CONTENT), content]
    ordered = uris(plugin_graph(regs))
    assert ordered == [content.uri, f"{SERVICE}.a", f"{META}.m"]


def test_requiring_a_type_nobody_provides_is_not_an_error() -> None:
    lonely = reg(SERVICE, "lonely", "io.t.nobody.v1")
    assert uris(plugin_graph([lonely])) == [lonely.uri]


def test_star_comes_after_every_other_plugin() -> None:
    everything = reg("io.t.introspection.v1", "all", "*")
    regs = [everything, reg(SERVICE, "a", META), reg(META, "m"), reg(OTHER, "z")]
    ordered = uris(plugin_graph(regs))
    assert ordered[-1] == everything.uri
    assert ordered == [f"{META}.m", f"{SERVICE}.a", f"{OTHER}.z", everything.uri]


def test_two_star_plugins_are_a_cycle() -> None:
    # each would have to come after the other
    with pytest.raises(CircularDependency):
        plugin_graph([reg("io.t.a.v1", "one", "*"), reg("io.t.b.v1", "two", "*")])


def test_a_cycle_names_every_plugin_in_it() -> None:
    regs = [
        reg(OTHER, "bystander"),
        reg("io.t.a.v1", "a", "io.t.b.v1"),
        reg("io.t.b.v1", "b", "io.t.c.v1"),
        reg("io.t.c.v1", "c", "io.t.a.v1"),
    ]
    with pytest.raises(CircularDependency) as info:
        plugin_graph(regs)
    message = str(info.value)
    for uri in ("io.t.a.v1.a", "io.t.b.v1.b", "io.t.c.v1.c"):
        assert uri in message
    assert f"{OTHER}.bystander" not in message
    assert isinstance(info.value, InvalidArgument)


def test_a_two_plugin_cycle() -> None:
    with pytest.raises(CircularDependency, match=r"io\.t\.a\.v1\.a -> io\.t\.b\.v1\.b -> io\.t\.a\.v1\.a"):
        plugin_graph([reg("io.t.a.v1", "a", "io.t.b.v1"), reg("io.t.b.v1", "b", "io.t.a.v1")])


def test_disabled_plugins_are_left_out_and_satisfy_nothing() -> None:
    user = reg(SERVICE, "user", SNAP)
    overlay = reg(SNAP, "overlayfs")
    native = reg(SNAP, "native", CONTENT)
    content = reg(CONTENT, "local")
    ordered = uris(plugin_graph([user, overlay, native, content], lambda r: r.uri == overlay.uri))
    assert ordered == [content.uri, native.uri, user.uri]
    # disabling every snapshotter leaves the user in, with nothing before it
    ordered = uris(plugin_graph([user, overlay, native, content], lambda r: r.type == SNAP))
    assert ordered == [user.uri, content.uri]


def test_disabling_a_plugin_breaks_its_cycle() -> None:
    a = reg("io.t.a.v1", "a", "io.t.b.v1")
    b = reg("io.t.b.v1", "b", "io.t.a.v1")
    assert uris(plugin_graph([a, b], lambda r: r is b)) == [a.uri]


# ---------------------------------------------------------------------------------------------- Registry


@dataclass
class Plain:
    x: int = 0


@dataclass
class WithRef:
    snapshotter: str = plugin_ref(SNAP, "overlayfs")


@pytest.mark.parametrize(
    ("registration", "fragment"),
    [
        (reg("", "x"), "plugin type ''"),
        (reg("io.t.thing", "x"), "plugin type 'io.t.thing'"),
        (reg("IO.T.thing.v1", "x"), "plugin type"),
        (reg("io t.thing.v1", "x"), "plugin type"),
        (reg(OTHER, ""), "plugin id ''"),
        (reg(OTHER, "has space"), "plugin id 'has space'"),
        (reg(OTHER, "a..b"), "plugin id"),
        (reg(OTHER, "-x"), "plugin id"),
        (reg(OTHER, "x", "*", CONTENT), '"*" must be its only requirement'),
        (reg(OTHER, "x", OTHER), "requires its own type"),
        (reg(OTHER, "x", config=dict), "config must be a dataclass"),
        (reg(OTHER, "x", config=Plain()), "config must be a dataclass"),  # type: ignore[arg-type]
        (reg(OTHER, "x", CONTENT, config=WithRef), f"config key snapshotter names a {SNAP} plugin"),
        (reg(OTHER, "x", config=WithRef), f"{SNAP} is not in requires"),
    ],
)
def test_registry_refuses_malformed_registrations(registration: Registration, fragment: str) -> None:
    registry = Registry()
    with pytest.raises(InvalidArgument) as info:
        registry.register(registration)
    assert fragment in str(info.value)
    assert len(registry) == 0


def test_registry_accepts_good_registrations_in_order() -> None:
    registry = Registry()
    regs = [reg(SNAP, "overlayfs"), reg(OTHER, "x", SNAP, config=WithRef), reg("io.t.all.v1", "all", "*",
                                                                                 config=WithRef),
            reg(CONTENT, "local", config=Plain), reg(SNAP, "overlay.fs_2-x")]
    for r in regs:
        registry.register(r)
    assert list(registry) == regs
    assert registry.get(f"{SNAP}.overlayfs") is regs[0]
    assert registry.get("io.t.none.v1.x") is None


def test_registry_refuses_a_duplicate_uri() -> None:
    registry = Registry()
    registry._current_source = "first_module"
    registry.register(reg(SNAP, "overlayfs"))
    with pytest.raises(InvalidArgument, match=r"io\.t\.snapshotter\.v1\.overlayfs is registered twice "
                                              r"\(first by first_module\)"):
        registry.register(reg(SNAP, "overlayfs", CONTENT))
    registry.register(reg(CONTENT, "overlayfs"))  # same id, other type: fine
    assert len(registry) == 2


def test_plugin_refs_are_listed() -> None:
    assert reg(OTHER, "x", SNAP, config=WithRef).plugin_refs() == [("snapshotter", SNAP)]
    assert reg(OTHER, "x", config=Plain).plugin_refs() == []
    assert reg(OTHER, "x").plugin_refs() == []


# ---------------------------------------------------------------------------------------------- load_plugins


class _Module:
    """A plugin object with a berth_register hook registering ``registrations`` then maybe raising."""

    def __init__(self, *registrations: Registration, error: Exception | None = None) -> None:
        self.registrations = registrations
        self.error = error

    @hookimpl
    def berth_register(self, registry: Registry) -> None:
        for registration in self.registrations:
            registry.register(registration)
        if self.error is not None:
            raise self.error


def test_load_plugins_collects_registrations_in_order() -> None:
    builtin = types.ModuleType("berth_test_builtin")

    @hookimpl
    def berth_register(registry: Registry) -> None:
        registry.register(reg(CONTENT, "builtin"))

    builtin.berth_register = berth_register  # type: ignore[attr-defined]
    first = _Module(reg(SNAP, "one"), reg(SNAP, "two"))
    second = _Module(reg(META, "three"))
    third = _Module(reg(OTHER, "four"))
    loaded = load_plugins([builtin], extra=[first, second, third], entry_points=False)
    assert uris(loaded.registry) == [f"{CONTENT}.builtin", f"{SNAP}.one", f"{SNAP}.two", f"{META}.three",
                                     f"{OTHER}.four"]
    assert loaded.errors == []
    assert loaded.registry.source[f"{CONTENT}.builtin"] == "berth_test_builtin"
    assert loaded.registry.source[f"{SNAP}.two"] == loaded.manager.get_name(first)


def test_a_failing_hook_is_a_load_error_and_the_others_still_load() -> None:
    good = _Module(reg(SNAP, "one"))
    bad = _Module(reg(META, "half"), error=RuntimeError("no such device"))
    refused = _Module(reg(SNAP, "one"))  # a duplicate: the registry refuses it
    late = _Module(reg(OTHER, "late"), reg(META, "half"))  # may reuse the URI the failed module dropped
    loaded = load_plugins(extra=[good, bad, refused, late], entry_points=False)
    assert uris(loaded.registry) == [f"{SNAP}.one", f"{OTHER}.late", f"{META}.half"]
    assert loaded.errors == [
        LoadError(loaded.manager.get_name(bad), "berth_register failed: RuntimeError: no such device"),
        LoadError(loaded.manager.get_name(refused),
                  f"berth_register failed: plugin {SNAP}.one is registered twice (first by "
                  f"{loaded.manager.get_name(good)})"),
    ]


# ---------------------------------------------------------------------------------------------- the daemon


@dataclass
class Recorder:
    events: list[str] = field(default_factory=list)
    seen: dict[str, Any] = field(default_factory=dict)


class Instance:
    def __init__(self, recorder: Recorder, uri: str, close: str) -> None:
        self.recorder = recorder
        self.uri = uri
        self.close = close

    async def aclose(self) -> None:
        self.recorder.events.append(f"close {self.uri}")
        if self.close == "hang":
            try:
                await trio.sleep_forever()
            finally:
                self.recorder.events.append(f"abandoned {self.uri}")
        if self.close == "raise":
            raise RuntimeError("close failed")
        await trio.lowlevel.checkpoint()


def plugin(
    recorder: Recorder,
    plugin_type: str,
    plugin_id: str,
    *requires: str,
    outcome: str = "ok",
    close: str = "ok",
    config: type | None = None,
    background: bool = False,
) -> Registration:
    """A registration whose init records itself and then succeeds, skips or fails as ``outcome`` says."""
    uri = f"{plugin_type}.{plugin_id}"

    async def run_in_background() -> None:
        recorder.events.append(f"background {uri}")
        try:
            await trio.sleep_forever()
        finally:
            recorder.events.append(f"background cancelled {uri}")

    async def init(ic: InitContext) -> object:
        recorder.events.append(f"init {uri}")
        recorder.seen[uri] = ic
        if background:
            ic.nursery.start_soon(run_in_background)
            await trio.testing.wait_all_tasks_blocked()
        if outcome == "skip":
            raise SkipPlugin(f"{plugin_id} does not apply here")
        if outcome == "error":
            raise RuntimeError(f"{plugin_id} is broken")
        return Instance(recorder, uri, close)

    return Registration(type=plugin_type, id=plugin_id, init=init, requires=requires, config=config)


@pytest.fixture
def sock_dir(tmp_path: Path) -> Iterator[Path]:
    """Where the daemon's socket goes: tmp_path, unless that is too long for a unix socket path."""
    if len(str(tmp_path / "berth.sock")) < 100:
        yield tmp_path
        return
    short = Path(tempfile.mkdtemp(prefix="bt", dir="/tmp"))
    try:
        yield short
    finally:
        shutil.rmtree(short, ignore_errors=True)


def make_daemon(tmp_path: Path, sock_dir: Path, registrations: Sequence[Registration], text: str = "") -> Daemon:
    config_file = tmp_path / "config.toml"
    config_file.write_text(text)
    loaded = load_config(config_file, registrations, overrides={
        ("root",): str(tmp_path / "root"),
        ("state",): str(tmp_path / "state"),
        ("rpc", "address"): str(sock_dir / "berth.sock"),
    })
    return Daemon(loaded, registrations)


async def start_and_stop(daemon: Daemon) -> None:
    """Run the daemon until it is ready, then shut it down."""
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(daemon.run)
            assert daemon.ready.is_set()
            daemon.request_shutdown()


async def fail_to_start(daemon: Daemon) -> StartupError:
    with trio.fail_after(10), pytest.raises(StartupError) as info:
        await daemon.run()
    assert not daemon.ready.is_set()
    return info.value


def statuses(daemon: Daemon) -> list[tuple[str, str]]:
    return [(p.uri, str(p.status)) for p in daemon.plugins.all()]


async def test_plugins_init_in_graph_order_and_close_in_reverse(tmp_path: Path, sock_dir: Path) -> None:
    rec = Recorder()
    regs = [plugin(rec, SERVICE, "svc", SNAP, META), plugin(rec, SNAP, "overlay"), plugin(rec, META, "db", SNAP),
            plugin(rec, SNAP, "native"), plugin(rec, OTHER, "last")]
    daemon = make_daemon(tmp_path, sock_dir, regs)
    await start_and_stop(daemon)
    order = [f"{SNAP}.overlay", f"{SNAP}.native", f"{META}.db", f"{SERVICE}.svc", f"{OTHER}.last"]
    assert rec.events == [f"init {u}" for u in order] + [f"close {u}" for u in reversed(order)]
    assert statuses(daemon) == [(u, "ok") for u in order]
    assert not (sock_dir / "berth.sock").exists()


async def test_init_context(tmp_path: Path, sock_dir: Path) -> None:
    @dataclass
    class Settings:
        level: int = 1

    rec = Recorder()
    regs = [plugin(rec, SNAP, "overlay", config=Settings), plugin(rec, SERVICE, "svc", SNAP)]
    daemon = make_daemon(tmp_path, sock_dir, regs, f'[plugins."{SNAP}.overlay"]\nlevel = 3\n')
    await start_and_stop(daemon)
    ic: InitContext = rec.seen[f"{SNAP}.overlay"]
    assert ic.config == Settings(level=3)
    assert ic.root == tmp_path / "root" / f"{SNAP}.overlay"
    assert ic.state == tmp_path / "state" / f"{SNAP}.overlay"
    assert ic.root.is_dir()
    assert ic.state.is_dir()
    assert list(ic.config_files) == [tmp_path / "config.toml"]
    assert ic.server is daemon.server_info
    assert ic.registration is regs[0]
    svc: InitContext = rec.seen[f"{SERVICE}.svc"]
    assert svc.config is None
    overlay = daemon.plugins.get(f"{SNAP}.overlay")
    assert overlay is not None
    assert svc.get_single(SNAP) is overlay.instance
    assert svc.get_by_id(SNAP, "overlay") is overlay.instance
    assert svc.get_by_type(SNAP) == {"overlay": overlay.instance}


async def test_skip_and_error_are_kept_and_dependents_see_why(tmp_path: Path, sock_dir: Path) -> None:
    rec = Recorder()
    found: dict[str, BaseException | object] = {}

    async def dependent(ic: InitContext) -> object:
        for label, lookup in [
            ("by_id failed", lambda: ic.get_by_id(SNAP, "broken")),
            ("by_id skipped", lambda: ic.get_by_id(SNAP, "skipped")),
            ("by_id missing", lambda: ic.get_by_id(SNAP, "nothing")),
            ("single failed", lambda: ic.get_single(META)),
            ("single skipped", lambda: ic.get_single(CONTENT)),
            ("single two ok", lambda: ic.get_single(OTHER)),
            ("by_type", lambda: ic.get_by_type(SNAP)),
        ]:
            try:
                found[label] = lookup()
            except Exception as exc:
                found[label] = exc
        return object()

    regs = [
        plugin(rec, SNAP, "broken", outcome="error"),
        plugin(rec, SNAP, "skipped", outcome="skip"),
        plugin(rec, SNAP, "fine"),
        plugin(rec, META, "db", outcome="error"),
        plugin(rec, CONTENT, "local", outcome="skip"),
        plugin(rec, OTHER, "one"),
        plugin(rec, OTHER, "two"),
        Registration(type=SERVICE, id="user", init=dependent, requires=(SNAP, META, CONTENT, OTHER)),
    ]
    daemon = make_daemon(tmp_path, sock_dir, regs)
    await start_and_stop(daemon)

    assert statuses(daemon) == [(f"{SNAP}.broken", "error"), (f"{SNAP}.skipped", "skip"), (f"{SNAP}.fine", "ok"),
                                (f"{META}.db", "error"), (f"{CONTENT}.local", "skip"), (f"{OTHER}.one", "ok"),
                                (f"{OTHER}.two", "ok"), (f"{SERVICE}.user", "ok")]
    broken = daemon.plugins.get(f"{SNAP}.broken")
    assert broken is not None
    assert isinstance(broken.error, RuntimeError)
    assert broken.error_message == "broken is broken"
    assert broken.status is PluginStatus.ERROR
    skipped = daemon.plugins.get(f"{SNAP}.skipped")
    assert skipped is not None
    assert isinstance(skipped.error, SkipPlugin)
    assert skipped.instance is None
    assert skipped.status is PluginStatus.SKIP

    error = found["by_id failed"]
    assert isinstance(error, FailedPrecondition)
    assert isinstance(error.__cause__, RuntimeError)
    assert "broken is broken" in str(error)
    assert f"{SNAP}.broken" in str(error)
    error = found["by_id skipped"]
    assert isinstance(error, NotFound)
    assert "skipped" in str(error)
    assert "does not apply here" in str(error)
    assert isinstance(found["by_id missing"], NotFound)
    error = found["single failed"]
    assert isinstance(error, FailedPrecondition)
    assert isinstance(error.__cause__, RuntimeError)
    assert isinstance(found["single skipped"], NotFound)
    error = found["single two ok"]
    assert isinstance(error, FailedPrecondition)
    assert "one, two" in str(error)
    fine = daemon.plugins.get(f"{SNAP}.fine")
    assert fine is not None
    assert found["by_type"] == {"fine": fine.instance}
    # only plugins that loaded are closed
    closes = [e for e in rec.events if e.startswith("close")]
    assert closes == [f"close {OTHER}.two", f"close {OTHER}.one", f"close {SNAP}.fine"]


async def test_a_failing_required_plugin_stops_startup_and_closes_the_others(tmp_path: Path, sock_dir: Path) -> None:
    rec = Recorder()
    regs = [plugin(rec, CONTENT, "local"), plugin(rec, META, "db"), plugin(rec, SNAP, "overlay", outcome="error"),
            plugin(rec, OTHER, "after")]
    daemon = make_daemon(tmp_path, sock_dir, regs, f'required_plugins = ["{SNAP}.overlay"]\n')
    error = await fail_to_start(daemon)
    assert f"{SNAP}.overlay" in str(error)
    assert "overlay is broken" in str(error)
    assert "required" in str(error)
    assert rec.events == [f"init {CONTENT}.local", f"init {META}.db", f"init {SNAP}.overlay",
                          f"close {META}.db", f"close {CONTENT}.local"]
    assert not (sock_dir / "berth.sock").exists()


async def test_a_skipped_required_plugin_stops_startup(tmp_path: Path, sock_dir: Path) -> None:
    rec = Recorder()
    regs = [plugin(rec, CONTENT, "local"), plugin(rec, SNAP, "btrfs", outcome="skip")]
    daemon = make_daemon(tmp_path, sock_dir, regs, f'required_plugins = ["{SNAP}.btrfs"]\n')
    error = await fail_to_start(daemon)
    assert f"required plugin {SNAP}.btrfs did not load" in str(error)
    assert "does not apply here" in str(error)
    assert rec.events[-1] == f"close {CONTENT}.local"


@pytest.mark.parametrize("how", ["disabled", "unregistered"])
async def test_a_required_plugin_that_is_not_there(tmp_path: Path, sock_dir: Path, how: str) -> None:
    rec = Recorder()
    regs = [plugin(rec, CONTENT, "local")]
    if how == "disabled":
        regs.append(plugin(rec, SNAP, "overlay"))
        text = f'required_plugins = ["{SNAP}.overlay"]\ndisabled_plugins = ["{SNAP}.overlay"]\n'
    else:
        text = f'required_plugins = ["{SNAP}.overlay"]\n'
    daemon = make_daemon(tmp_path, sock_dir, regs, text)
    error = await fail_to_start(daemon)
    assert f"required plugin {SNAP}.overlay is not included" in str(error)
    assert rec.events == [f"init {CONTENT}.local", f"close {CONTENT}.local"]


async def test_disabled_plugins_are_never_initialised(tmp_path: Path, sock_dir: Path) -> None:
    rec = Recorder()
    regs = [plugin(rec, SNAP, "overlay"), plugin(rec, SNAP, "btrfs"), plugin(rec, SERVICE, "svc", SNAP)]
    daemon = make_daemon(tmp_path, sock_dir, regs, f'disabled_plugins = ["{SNAP}.btrfs", "io.t.unknown.v1.x"]\n')
    await start_and_stop(daemon)
    assert [e for e in rec.events if e.startswith("init")] == [f"init {SNAP}.overlay", f"init {SERVICE}.svc"]
    assert daemon.plugins.get(f"{SNAP}.btrfs") is None


async def test_strict_plugins_makes_any_error_fatal(tmp_path: Path, sock_dir: Path) -> None:
    rec = Recorder()
    regs = [plugin(rec, CONTENT, "local"), plugin(rec, SNAP, "skips", outcome="skip"),
            plugin(rec, SNAP, "overlay", outcome="error"), plugin(rec, OTHER, "after")]
    daemon = make_daemon(tmp_path, sock_dir, regs, "strict_plugins = true\n")
    error = await fail_to_start(daemon)
    assert f"{SNAP}.overlay" in str(error)
    assert "strict_plugins" in str(error)
    assert f"init {OTHER}.after" not in rec.events
    assert rec.events[-1] == f"close {CONTENT}.local"


async def test_without_strict_plugins_an_error_is_not_fatal(tmp_path: Path, sock_dir: Path) -> None:
    rec = Recorder()
    regs = [plugin(rec, SNAP, "overlay", outcome="error"), plugin(rec, OTHER, "after")]
    daemon = make_daemon(tmp_path, sock_dir, regs)
    await start_and_stop(daemon)
    assert statuses(daemon) == [(f"{SNAP}.overlay", "error"), (f"{OTHER}.after", "ok")]


async def test_strict_plugins_tolerates_a_skip(tmp_path: Path, sock_dir: Path) -> None:
    rec = Recorder()
    regs = [plugin(rec, SNAP, "btrfs", outcome="skip"), plugin(rec, OTHER, "after")]
    daemon = make_daemon(tmp_path, sock_dir, regs, "strict_plugins = true\n")
    await start_and_stop(daemon)
    assert statuses(daemon) == [(f"{SNAP}.btrfs", "skip"), (f"{OTHER}.after", "ok")]


async def test_a_close_that_hangs_is_abandoned_and_the_next_is_closed(tmp_path: Path, sock_dir: Path) -> None:
    rec = Recorder()
    regs = [plugin(rec, CONTENT, "first"), plugin(rec, META, "raises", close="raise"),
            plugin(rec, SNAP, "hangs", close="hang"), plugin(rec, OTHER, "last")]
    daemon = make_daemon(tmp_path, sock_dir, regs, '[timeouts]\nplugin_close = "200ms"\n')
    await start_and_stop(daemon)
    assert [e for e in rec.events if not e.startswith("init")] == [
        f"close {OTHER}.last", f"close {SNAP}.hangs", f"abandoned {SNAP}.hangs", f"close {META}.raises",
        f"close {CONTENT}.first"]


async def test_background_tasks_are_cancelled_after_close(tmp_path: Path, sock_dir: Path) -> None:
    rec = Recorder()
    regs = [plugin(rec, CONTENT, "local", background=True), plugin(rec, OTHER, "other")]
    daemon = make_daemon(tmp_path, sock_dir, regs)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(daemon.run)
            await trio.testing.wait_all_tasks_blocked()
            assert f"background cancelled {CONTENT}.local" not in rec.events
            daemon.request_shutdown()
    assert rec.events == [f"init {CONTENT}.local", f"background {CONTENT}.local", f"init {OTHER}.other",
                          f"close {OTHER}.other", f"close {CONTENT}.local",
                          f"background cancelled {CONTENT}.local"]


async def test_a_failed_plugins_background_tasks_are_cancelled_at_once(tmp_path: Path, sock_dir: Path) -> None:
    rec = Recorder()
    regs = [plugin(rec, CONTENT, "local", background=True, outcome="error"), plugin(rec, OTHER, "other")]
    daemon = make_daemon(tmp_path, sock_dir, regs)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(daemon.run)
            await trio.testing.wait_all_tasks_blocked()
            assert f"background cancelled {CONTENT}.local" in rec.events
            daemon.request_shutdown()


@dataclass
class UsesSnapshotter:
    snapshotter: str = plugin_ref(SNAP, "overlay")


async def test_get_ref_returns_the_named_instance(tmp_path: Path, sock_dir: Path) -> None:
    rec = Recorder()
    regs = [plugin(rec, SNAP, "overlay"), plugin(rec, SNAP, "native"),
            plugin(rec, SERVICE, "user", SNAP, config=UsesSnapshotter)]
    daemon = make_daemon(tmp_path, sock_dir, regs, f'[plugins."{SERVICE}.user"]\nsnapshotter = "native"\n')
    await start_and_stop(daemon)
    ic: InitContext = rec.seen[f"{SERVICE}.user"]
    native = daemon.plugins.get(f"{SNAP}.native")
    assert native is not None
    assert ic.get_ref("snapshotter") is native.instance
    with pytest.raises(InvalidArgument, match="not a plugin reference"):
        ic.get_ref("workers")


@pytest.mark.parametrize("outcome", ["error", "skip"])
async def test_a_ref_to_a_plugin_that_did_not_load_stops_startup(tmp_path: Path, sock_dir: Path, outcome: str) -> None:
    rec = Recorder()
    regs = [plugin(rec, SNAP, "overlay"), plugin(rec, SNAP, "native", outcome=outcome),
            plugin(rec, SERVICE, "user", SNAP, config=UsesSnapshotter)]
    daemon = make_daemon(tmp_path, sock_dir, regs, f'[plugins."{SERVICE}.user"]\nsnapshotter = "native"\n')
    error = await fail_to_start(daemon)
    message = str(error)
    assert str(tmp_path / "config.toml") in message
    assert f'[plugins."{SERVICE}.user"] snapshotter' in message
    assert f"names {SNAP} plugin 'native'" in message
    assert {"error": "which failed to load", "skip": "which was skipped"}[outcome] in message
    assert f"init {SERVICE}.user" not in rec.events
    assert rec.events[-1] == f"close {SNAP}.overlay"


async def test_the_default_ref_is_checked_too(tmp_path: Path, sock_dir: Path) -> None:
    rec = Recorder()
    regs = [plugin(rec, SNAP, "overlay", outcome="error"), plugin(rec, SERVICE, "user", SNAP, config=UsesSnapshotter)]
    daemon = make_daemon(tmp_path, sock_dir, regs)
    error = await fail_to_start(daemon)
    assert f'[plugins."{SERVICE}.user"] snapshotter' in str(error)
    assert "overlay is broken" in str(error)
