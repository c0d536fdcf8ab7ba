"""Order registrations so that every plugin comes after the plugins it requires."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from berth.core.errdefs import InvalidArgument
from berth.core.plugin.registration import Registration

__all__ = ["CircularDependency", "plugin_graph"]


class CircularDependency(InvalidArgument):
    """The ``requires`` of some plugins form a cycle; the message lists it."""


def plugin_graph(
    registrations: Sequence[Registration],
    disabled: Callable[[Registration], bool] = lambda _: False,
) -> list[Registration]:
    """Return the registrations in init order, leaving out disabled ones.

    Depth-first in registration order, as containerd's ``Graph``: before each plugin come all
    plugins of each type it requires (every other plugin for ``"*"``), recursively; plugins of one
    type keep their registration order. A disabled plugin is never emitted and satisfies nothing.

    Raises:
        CircularDependency: the requirements form a cycle, named plugin by plugin.
    """
    enabled = [r for r in registrations if not disabled(r)]
    ordered: list[Registration] = []
    added: set[str] = set()
    path: list[Registration] = []

    def visit(reg: Registration) -> None:
        if reg.uri in added:
            return
        if reg in path:
            cycle = [*path[path.index(reg):], reg]
            raise CircularDependency("plugin dependency cycle: " + " -> ".join(r.uri for r in cycle))
        path.append(reg)
        for required in reg.requires:
            for dep in enabled:
                if dep is not reg and (required == "*" or dep.type == required):
                    visit(dep)
        path.pop()
        added.add(reg.uri)
        ordered.append(reg)

    for reg in enabled:
        visit(reg)
    return ordered
