"""Progress of pulls and pushes on the terminal: a rich progress bar per blob on a TTY, and one plain line
per change of status otherwise (so logs and pipes get readable text, not bar redraws).

Imported only by the commands that show progress: rich costs tens of milliseconds to import.
"""

from __future__ import annotations

import sys
from types import TracebackType
from typing import Any, Self, TextIO

__all__ = ["ProgressDisplay"]


class ProgressDisplay:
    """Feed it the daemon's progress batches (``[{ref, status, offset, total}, ...]``) as they come."""

    def __init__(self, stream: TextIO | None = None, *, tty: bool | None = None) -> None:
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self._statuses: dict[str, str] = {}
        self._tasks: dict[str, Any] = {}
        self._progress: Any = None

    def __enter__(self) -> Self:
        if self.tty:
            from rich.console import Console
            from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

            self._progress = Progress(TextColumn("{task.description:<30}"), TextColumn("{task.fields[status]:<11}"),
                                      BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                                      console=Console(file=self.stream), transient=False)
            self._progress.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._progress is not None:
            self._progress.stop()

    def update(self, batch: list[dict[str, Any]]) -> None:
        for event in batch:
            ref, status = str(event.get("ref", "")), str(event.get("status", ""))
            offset, total = int(event.get("offset") or 0), int(event.get("total") or 0)
            if self._progress is not None:
                self._update_bar(ref, status, offset, total)
            elif self._statuses.get(ref) != status:
                self._statuses[ref] = status
                size = f" {offset}/{total}" if total and status not in ("unpacking", "unpacked") else ""
                self.stream.write(f"{_short(ref)}: {status}{size}\n")
                self.stream.flush()

    def _update_bar(self, ref: str, status: str, offset: int, total: int) -> None:
        unpack = status in ("unpacking", "unpacked")
        task = self._tasks.get(ref)
        if task is None:
            task = self._progress.add_task(_short(ref), total=None if unpack else (total or None), status=status)
            self._tasks[ref] = task
        if unpack:
            self._progress.update(task, status=status)
        else:
            self._progress.update(task, completed=offset, status=status)


def _short(ref: str) -> str:
    """``layer-sha256:0123456789ab...`` -> ``layer-0123456789ab``."""
    kind, _, digest = ref.partition("-")
    return f"{kind}-{digest.partition(':')[2][:12]}" if ":" in digest else ref
