"""berth's pluggy hooks. Hooks are synchronous and declarative; async work happens in ``init``.

A plugin module implements::

    from berth.core.plugin import Registration, hookimpl

    @hookimpl
    def berth_register(registry):
        registry.register(Registration(type=..., id=..., init=init, config=Config))
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from berth.core.metadata.containers import Container
    from berth.core.plugin.registration import Registry

__all__ = ["PROJECT", "BerthHookSpecs", "hookimpl", "hookspec"]

PROJECT = "berth"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


class BerthHookSpecs:
    # ------------------------------------------------------------------ registration, at startup

    @hookspec
    def berth_register(self, registry: Registry) -> None:
        """Add this module's plugins with ``registry.register(Registration(...))``.

        Called once per plugin module when the daemon (or ``berthd config default``) builds its
        registry, in module load order: built-ins in the order of ``plugins/builtins.py``, then
        entry points. It must not do I/O or start anything; that belongs in ``init``.
        """

    # ------------------------------------------------------------------ containers, before create

    @hookspec
    def berth_adjust_spec(self, spec: dict[str, Any], container: Container) -> None:
        """Adjust the OCI runtime ``spec`` of ``container`` in place just before its task is created
        (containerd's NRI, in spirit): add mounts, devices, env, annotations, limits.

        Every implementation runs, in plugin load order (see
        :func:`berth.runtimes.oci.apply_spec_adjustments`). It must be quick and must not block on I/O;
        raising a :class:`~berth.core.errdefs.BerthError` refuses the container with that error.
        """
