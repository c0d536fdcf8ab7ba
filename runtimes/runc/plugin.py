"""``io.berth.runtime.v1.runc`` and ``io.berth.runtime.v1.builtin``: runc-compatible binaries the shims
run containers with (runc from the system, and berth's own ``berth-runtime``).

A runtime plugin's instance is a :class:`RuntimeBinary`; the tasks service picks one per container by
the container's runtime name and gives each namespace its own state root below the plugin's.
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import trio

from berth.core.plugin import InitContext, PluginType, Registration, Registry, SkipPlugin, hookimpl
from berth.runtimes.runc.command import RuntimeBinary


@dataclass(kw_only=True)
class Config:
    #: The binary: a name looked up on ``PATH`` (and next to the Python running berthd), or a path.
    binary: str = "runc"
    #: The runtime's ``--root``; default ``<state>/<plugin>/root``. Each namespace gets a directory in it.
    root: str = ""
    #: Pass ``--systemd-cgroup`` (cgroup paths as ``slice:prefix:name``).
    systemd_cgroup: bool = False
    #: Pass ``--no-pivot`` to ``create`` (for a rootfs on a ramdisk, where pivot_root fails).
    no_pivot: bool = False


@dataclass(kw_only=True)
class BuiltinConfig(Config):
    binary: str = "berth-runtime"


def find_binary(name: str) -> str | None:
    """``name`` as an absolute path: itself if it is one, else from the directory of the running
    Python (where ``pip`` installs scripts), else from ``PATH``."""
    if "/" in name:
        path = Path(name)
        return str(path) if path.is_file() else None
    beside = Path(sys.executable).parent / name
    if beside.is_file():
        return str(beside)
    return shutil.which(name)


def _init(name: str) -> Callable[[InitContext], Awaitable[RuntimeBinary]]:
    async def init(ic: InitContext) -> RuntimeBinary:
        config: Config = ic.config
        binary = await trio.to_thread.run_sync(find_binary, config.binary)
        if binary is None:
            raise SkipPlugin(f"{config.binary} is not installed (set binary to its path)")
        root = config.root or str(ic.state / "root")
        ic.meta.exports.update({"binary": binary, "root": root})
        return RuntimeBinary(name=name, binary=binary, root=root, systemd_cgroup=config.systemd_cgroup,
                             no_pivot=config.no_pivot)
    return init


@hookimpl
def berth_register(registry: Registry) -> None:
    registry.register(Registration(type=PluginType.RUNTIME, id="runc", config=Config, init=_init("runc")))
    registry.register(Registration(type=PluginType.RUNTIME, id="builtin", config=BuiltinConfig,
                                   init=_init("builtin")))
