"""berthd's lifecycle: initialise the plugin graph, serve RPC, shut down in reverse order.

:class:`Daemon` does the work; :func:`run_daemon` wraps it with signal handling for the
``berthd`` command: the first SIGTERM or SIGINT starts a graceful shutdown (stop accepting, let
requests in flight finish for ``timeouts.shutdown_grace``, close plugins newest first, each within
``timeouts.plugin_close``); a second one exits at once.
"""

from __future__ import annotations

import fcntl
import os
import signal
import socket
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any, cast

import pluggy
import structlog
import trio

from berth.core import __version__
from berth.core.config import LoadedConfig
from berth.core.errdefs import BerthError, FailedPrecondition, Unavailable
from berth.core.plugin.graph import plugin_graph
from berth.core.plugin.manager import LoadError
from berth.core.plugin.registration import (
    InitContext,
    LoadedPlugin,
    Meta,
    PluginSet,
    PluginStatus,
    Registration,
    ServerInfo,
    SkipPlugin,
    describe_error,
)
from berth.core.plugin.types import PluginType
from berth.core.rpc.server import RPCServer, RPCService, check_socket_free, serve_unix, socket_authorizer

__all__ = ["Daemon", "StartupError", "run_daemon"]

log = structlog.get_logger("berth.daemon")


class StartupError(FailedPrecondition):
    """The daemon cannot start: a required plugin failed or is missing, or a plugin reference is broken."""


class Daemon:
    """One berthd instance.

    Args:
        config: the loaded config (see :func:`berth.core.config.load_config`).
        registrations: every registered plugin, in registration order.
        load_errors: plugin modules that could not be loaded (shown in the summary and introspection).
    """

    def __init__(
        self,
        config: LoadedConfig,
        registrations: Sequence[Registration],
        load_errors: Sequence[LoadError] = (),
        hooks: pluggy.PluginManager | None = None,
    ) -> None:
        self.loaded_config = config
        self.hooks = hooks
        self.config = config.config
        self.registrations = list(registrations)
        self.load_errors = list(load_errors)
        self.plugins = PluginSet()
        self.plugins.load_errors = [(e.name, e.error) for e in self.load_errors]
        self.server_info = ServerInfo(uuid=str(uuid.uuid4()), pid=os.getpid(), started_at=time.time(),
                                      version=__version__, revision="")
        self.ready = trio.Event()
        self.stopping = trio.Event()
        self.rpc_server: RPCServer | None = None

    @property
    def address(self) -> Path:
        return Path(self.config.rpc.address)

    def request_shutdown(self) -> None:
        """Start a graceful shutdown (idempotent)."""
        self.stopping.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Initialise every plugin, serve until :meth:`request_shutdown` or cancellation, then close.

        Reports readiness through ``task_status`` only after every plugin is initialised and the
        socket accepts connections.

        Raises:
            StartupError: a required plugin failed or is missing, ``strict_plugins`` is set and a
                plugin failed, or a config key names a plugin that did not load.
        """
        async with _lone_berth_error(), AsyncExitStack() as stack:
            stack.callback(os.close, await trio.to_thread.run_sync(self._claim_root))
            await self._init_plugins(stack)
            self._check_required()
            self._log_summary()
            services = [cast(RPCService, s) for s in self.plugins.get_by_type(PluginType.RPC).values()]
            self.rpc_server = RPCServer.from_services(
                services,
                max_message_size=self.config.rpc.max_message_size,
                max_concurrent_requests=self.config.rpc.max_concurrent_requests,
                authorize=socket_authorizer(self.config.rpc.gid),
            )
            async with trio.open_nursery() as nursery:
                await nursery.start(self._serve)
                self.ready.set()
                _sd_notify("READY=1")
                log.info("daemon_ready", address=str(self.address), pid=self.server_info.pid,
                         methods=len(self.rpc_server.methods))
                task_status.started()
            log.info("daemon_stopping")
            _sd_notify("STOPPING=1")
        log.info("daemon_stopped")

    def _claim_root(self) -> int:
        """Lock ``<root>/berthd.lock`` and check the socket, before any plugin touches the root.

        Returns the lock's file descriptor (closing it releases the lock).

        Raises:
            Unavailable: another berthd holds the root, or serves on the socket.
        """
        root = Path(self.config.root)
        root.mkdir(parents=True, exist_ok=True, mode=0o711)
        fd = os.open(root / "berthd.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise Unavailable(f"another berthd is using root {root}") from None
            check_socket_free(self.address)
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        return fd

    async def _serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        assert self.rpc_server is not None
        await serve_unix(self.rpc_server, self.address, gid=self.config.rpc.gid, stop=self.stopping,
                         grace=self.config.timeouts.shutdown_grace, task_status=task_status)

    async def _init_plugins(self, stack: AsyncExitStack) -> None:
        disabled = set(self.config.disabled_plugins)
        for uri in sorted(disabled - {r.uri for r in self.registrations}):
            log.warning("disabled_plugin_unknown", uri=uri)
        ordered = plugin_graph(self.registrations, lambda r: r.uri in disabled)
        for registration in ordered:
            nursery = await stack.enter_async_context(_plugin_nursery())
            loaded = await self._init_one(registration, nursery)
            self.plugins.add(loaded)
            if loaded.status is PluginStatus.OK:
                stack.push_async_callback(self._close_plugin, loaded)
            else:
                nursery.cancel_scope.cancel()
            if loaded.status is PluginStatus.ERROR and (
                registration.uri in self.config.required_plugins or self.config.strict_plugins
            ):
                why = "required" if registration.uri in self.config.required_plugins else "strict_plugins is set"
                raise StartupError(f"plugin {registration.uri} failed to load ({why}): {loaded.error_message}")

    async def _init_one(self, registration: Registration, nursery: trio.Nursery) -> LoadedPlugin:
        uri = registration.uri
        plugin_log = log.bind(type=registration.type, id=registration.id)
        meta = Meta()
        config = self.loaded_config.plugin_configs.get(uri)
        self._check_refs(registration, config)
        root = Path(self.config.root) / uri
        state = Path(self.config.state) / uri
        await trio.to_thread.run_sync(_make_dirs, root, state)
        context = InitContext(registration=registration, config=config, root=root, state=state, meta=meta,
                              nursery=nursery, log=plugin_log, plugins=self.plugins, server=self.server_info,
                              config_files=tuple(self.loaded_config.files), hooks=self.hooks)
        started = time.perf_counter()
        try:
            instance = await registration.init(context)
        except SkipPlugin as skip:
            plugin_log.info("plugin_skipped", reason=str(skip))
            return LoadedPlugin(registration=registration, status=PluginStatus.SKIP, meta=meta, error=skip)
        except Exception as exc:
            plugin_log.warning("plugin_failed", error=describe_error(exc))
            return LoadedPlugin(registration=registration, status=PluginStatus.ERROR, meta=meta, error=exc)
        plugin_log.debug("plugin_loaded", seconds=round(time.perf_counter() - started, 4))
        return LoadedPlugin(registration=registration, status=PluginStatus.OK, meta=meta, instance=instance)

    def _check_refs(self, registration: Registration, config: Any) -> None:
        """A config key naming another plugin must name one that loaded, before this plugin starts."""
        for name, ref_type in registration.plugin_refs():
            value = getattr(config, name)
            if not value:
                continue
            target = self.plugins.get(f"{ref_type}.{value}")
            if target is not None and target.status is PluginStatus.OK:
                continue
            if target is None:
                why = "did not load"
            elif target.status is PluginStatus.SKIP:
                why = f"was skipped: {target.error_message}"
            else:
                why = f"failed to load: {target.error_message}"
            error = self.loaded_config.error(("plugins", registration.uri, name),
                                             f"names {ref_type} plugin {value!r}, which {why}")
            raise StartupError(error.message)

    def _check_required(self) -> None:
        for uri in self.config.required_plugins:
            plugin = self.plugins.get(uri)
            if plugin is None:
                raise StartupError(f"required plugin {uri} is not included (not registered, or disabled)")
            if plugin.status is not PluginStatus.OK:
                raise StartupError(f"required plugin {uri} did not load: {plugin.status}: {plugin.error_message}")

    def _log_summary(self) -> None:
        all_plugins = self.plugins.all()
        for plugin in all_plugins:
            fields: dict[str, Any] = {"type": plugin.registration.type, "id": plugin.registration.id,
                                      "status": str(plugin.status)}
            if plugin.status is PluginStatus.ERROR:
                log.warning("plugin_status", **fields, error=plugin.error_message)
            elif plugin.status is PluginStatus.SKIP:
                log.info("plugin_status", **fields, reason=plugin.error_message)
            else:
                log.info("plugin_status", **fields)
        for error in self.load_errors:
            log.warning("plugin_module_failed", module=error.name, error=error.error)
        counts = {status: sum(p.status is status for p in all_plugins) for status in PluginStatus}
        log.info("plugins_loaded", ok=counts[PluginStatus.OK], skip=counts[PluginStatus.SKIP],
                 error=counts[PluginStatus.ERROR] + len(self.load_errors),
                 disabled=len(self.config.disabled_plugins))

    async def _close_plugin(self, plugin: LoadedPlugin) -> None:
        instance = plugin.instance
        closer = getattr(instance, "aclose", None)
        if closer is None:
            return
        limit = self.config.timeouts.plugin_close
        with trio.CancelScope(shield=True):
            with trio.move_on_after(limit) as scope:
                try:
                    await closer()
                except Exception as exc:
                    log.error("plugin_close_failed", uri=plugin.uri, error=describe_error(exc))
            if scope.cancelled_caught:
                log.warning("plugin_close_timed_out", uri=plugin.uri, seconds=limit)


@asynccontextmanager
async def _plugin_nursery() -> AsyncIterator[trio.Nursery]:
    # The plugin's nursery belongs to a task of its own: the daemon's task runs on inside this
    # context, so cancelling the plugin's tasks (it failed, or shutdown) must not cancel the daemon.
    async with trio.open_nursery() as outer:
        nursery: trio.Nursery = await outer.start(_hold_nursery)
        try:
            yield nursery
        finally:
            nursery.cancel_scope.cancel()


async def _hold_nursery(*, task_status: trio.TaskStatus[trio.Nursery] = trio.TASK_STATUS_IGNORED) -> None:
    async with trio.open_nursery() as nursery:
        task_status.started(nursery)
        await trio.sleep_forever()


@asynccontextmanager
async def _lone_berth_error() -> AsyncIterator[None]:
    """Re-raise a :class:`BerthError` that nurseries wrapped in exception groups as itself.

    Each plugin nursery wraps what passes through it; callers (and berthd's "cannot start") catch
    :class:`StartupError` and other berth errors by class.
    """
    try:
        yield
    except BaseExceptionGroup as group:
        error: BaseException = group
        while isinstance(error, BaseExceptionGroup) and len(error.exceptions) == 1:
            error = error.exceptions[0]
        if not isinstance(error, BerthError):
            raise
        raise error from error.__cause__


def _make_dirs(*paths: Path) -> None:
    for path in paths:
        path.mkdir(parents=True, exist_ok=True, mode=0o711)


def _sd_notify(state: str) -> None:
    """Tell systemd (``Type=notify``) about readiness when ``NOTIFY_SOCKET`` is set; otherwise nothing."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.sendto(state.encode(), address)
    except OSError as err:
        log.warning("sd_notify_failed", error=str(err))


async def run_daemon(daemon: Daemon) -> None:
    """Run ``daemon`` as the ``berthd`` process.

    The first SIGTERM or SIGINT shuts it down gracefully (during startup: stops the startup and
    closes what was loaded); a second one exits the process at once.

    Raises:
        BerthError: as :meth:`Daemon.run`.
    """
    async with trio.open_nursery() as nursery:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            run_scope = trio.CancelScope()

            async def watch_signals(*, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
                task_status.started()
                async for signum in signals:
                    name = signal.Signals(signum).name
                    if daemon.stopping.is_set():
                        log.warning("shutdown_forced", signal=name)
                        os._exit(128 + signum)
                    log.info("shutdown_requested", signal=name)
                    daemon.request_shutdown()
                    if not daemon.ready.is_set():
                        run_scope.cancel()

            # started before run(): a run() that fails before its first checkpoint must not leave
            # watch_signals to first iterate a receiver that is already closed (a RuntimeError).
            await nursery.start(watch_signals)
            try:
                with run_scope:
                    await daemon.run()
            finally:
                nursery.cancel_scope.cancel()
