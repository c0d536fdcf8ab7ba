"""OCI lifecycle hooks: each hook's ``path`` runs with ``args`` (``args[0]`` is its argv[0]) and ``env``,
the container's state JSON on stdin, and its optional ``timeout`` in seconds.

Where each phase runs (OCI runtime spec, "Lifecycle"): ``prestart`` and ``createRuntime`` in the runtime's
namespaces during ``create``, after the namespaces exist and before the pivot; ``createContainer`` in the
container's mount namespace at the same moment; ``startContainer`` in the container just before the
user process; ``poststart`` in the runtime after ``start``; ``poststop`` in the runtime during ``delete``.
A failing hook raises :class:`HookFailed` (the caller decides whether that is fatal: it is not for
``poststart`` and ``poststop``).
"""

from __future__ import annotations

import json
import subprocess

from berth.core.errdefs import FailedPrecondition

TYPE_CHECKING = False  # not typing's: importing typing costs every runtime call ~5 ms
if TYPE_CHECKING:
    from typing import Any

__all__ = ["HookFailed", "hook_state", "run_hooks"]


class HookFailed(FailedPrecondition):
    """A hook could not run, failed, or timed out."""


def hook_state(container_id: str, status: str, pid: int, bundle: str, spec: dict[str, Any]) -> dict[str, Any]:
    """The OCI state a hook reads on stdin (``pid`` only while there is a process, as runc writes it)."""
    state = {"ociVersion": "1.0.2", "id": container_id, "status": status, "pid": pid, "bundle": bundle,
             "annotations": spec.get("annotations") or {}}
    if pid <= 0:
        del state["pid"]
    return state


def run_hooks(phase: str, hooks: list[dict[str, Any]], state: dict[str, Any]) -> None:
    """Run ``hooks`` of ``phase`` in order, each with ``state`` as JSON on stdin; stop at the first failure."""
    payload = json.dumps(state).encode()
    for i, hook in enumerate(hooks):
        path = hook["path"]
        args = hook.get("args") or [path]
        env = dict(entry.split("=", 1) for entry in hook.get("env") or () if "=" in entry)
        timeout = hook.get("timeout")
        if timeout is not None and timeout <= 0:
            raise HookFailed(f"{phase} hook {i} ({path}): timeout must be positive")
        try:
            result = subprocess.run(args, executable=path, input=payload, env=env, capture_output=True,
                                    timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            raise HookFailed(f"{phase} hook {i} ({path}) did not finish within {timeout} s") from None
        except OSError as exc:
            raise HookFailed(f"{phase} hook {i} ({path}) could not run: {exc.strerror}") from None
        if result.returncode != 0:
            detail = (result.stderr or result.stdout).decode(errors="replace").strip()[-500:]
            raise HookFailed(f"{phase} hook {i} ({path}) failed with status {result.returncode}"
                             + (f": {detail}" if detail else ""))
