"""Signal numbers, handlers and names for ``berth-runtime``, from CPython's C module ``_signal``.

:mod:`signal` wraps ``_signal`` in IntEnum classes, and importing ``enum`` (with ``functools`` and
``collections``) costs every runtime command a few milliseconds; the runtime needs only the numbers.
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    import signal as _impl
    from signal import SIG_DFL, SIGCHLD, SIGKILL, SIGPIPE, SIGRTMAX, SIGRTMIN, SIGSTOP, SIGXFSZ, signal, valid_signals
else:
    import _signal as _impl  # berth-runtime runs on CPython
    SIG_DFL, SIGCHLD, SIGKILL, SIGPIPE = _impl.SIG_DFL, _impl.SIGCHLD, _impl.SIGKILL, _impl.SIGPIPE
    SIGRTMAX, SIGRTMIN, SIGSTOP, SIGXFSZ = _impl.SIGRTMAX, _impl.SIGRTMIN, _impl.SIGSTOP, _impl.SIGXFSZ
    signal, valid_signals = _impl.signal, _impl.valid_signals

__all__ = [
    "SIGCHLD", "SIGKILL", "SIGPIPE", "SIGRTMAX", "SIGRTMIN", "SIGSTOP", "SIGXFSZ", "SIG_DFL", "number", "signal",
    "valid_signals",
]

# "KILL" -> 9: every SIG* number the platform has (not SIG_DFL, SIG_IGN, SIG_BLOCK, ...).
_NAMES = {name[3:]: int(value) for name, value in vars(_impl).items()
          if name.startswith("SIG") and not name.startswith("SIG_") and isinstance(value, int)}


def number(text: str) -> int:
    """The signal ``text`` names, as runc reads it: a number (passed on as it is, for kill(2) to judge),
    a name with or without ``SIG`` in any case (``TERM``, ``sigkill``), or a real-time signal as
    ``RTMIN+N`` / ``RTMAX-N``. Raise :class:`ValueError` for an unknown name."""
    if text.isdigit():
        return int(text)
    name = text.upper().removeprefix("SIG")
    if name.startswith(("RTMIN+", "RTMAX-")) and name[6:].isdigit():
        value = SIGRTMIN + int(name[6:]) if name.startswith("RTMIN") else SIGRTMAX - int(name[6:])
    else:
        value = _NAMES.get(name, 0)
    if value not in valid_signals():
        raise ValueError(f"unknown signal {text!r}")
    return value
