"""Plugins adjust a spec before create: every ``berth_adjust_spec`` implementation, in load order."""

from __future__ import annotations

from typing import Any

import pluggy

from berth.core.errdefs import BerthError, Internal
from berth.core.metadata.containers import Container

__all__ = ["apply_spec_adjustments"]


def apply_spec_adjustments(manager: pluggy.PluginManager, spec: dict[str, Any], container: Container) -> dict[str, Any]:
    """Run each plugin's ``berth_adjust_spec(spec, container)`` on ``spec`` in place, oldest plugin
    first (pluggy itself would call the newest first), and return ``spec``.

    Raises:
        BerthError: what an implementation raised, unchanged.
        Internal: an implementation failed otherwise (the message names its plugin).
    """
    for impl in manager.hook.berth_adjust_spec.get_hookimpls():
        try:
            impl.function(spec=spec, container=container)
        except BerthError:
            raise
        except Exception as err:
            raise Internal(f"plugin {impl.plugin_name} failed to adjust the spec of container {container.id}: "
                           f"{type(err).__name__}: {err}") from err
    return spec
