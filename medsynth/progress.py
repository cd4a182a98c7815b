"""The one progress display of medsynth (validation, training, sampling, augment, evaluation, downstream).

``with progress_bar("augment", total=20) as bar: ... bar.advance()``. On a terminal it is a rich bar
on stderr with a count, elapsed time and an ETA; off a terminal (a log file, CI) it writes a plain
line at most every ``every_s`` seconds and at the end, and while one unit of work takes long it
repeats the line every ``every_s`` seconds with the time elapsed (a heartbeat), so a long job is never
silent. ``note`` names the current part of a phase. Disabled, it does nothing. Rich is imported only
when a bar is shown.
"""

from __future__ import annotations

import sys
import threading
import time
from types import TracebackType
from typing import TextIO

__all__ = ["ProgressBar", "progress_bar"]


class ProgressBar:
    """A count of ``total`` units of work; ``advance``/``update`` move it, ``note`` sets a status text."""

    def __init__(self, description: str, total: int, *, start: int = 0, enabled: bool = True,
                 transient: bool = False, every_s: float = 10.0, stream: TextIO | None = None) -> None:
        self.description = description
        self.total = max(int(total), 0)
        self.completed = int(start)
        self.enabled = enabled
        self.stream = stream if stream is not None else sys.stderr
        self.every_s = every_s
        self.text = ""
        self._tty = enabled and self.stream.isatty()
        self._transient = transient
        self._rich: object | None = None
        self._task: int | None = None
        self._t0 = time.monotonic()
        self._start = self.completed
        self._last_line = 0.0
        self._shown = -1  # the count the last plain line showed
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None

    # ------------------------------------------------------------------ context
    def __enter__(self) -> ProgressBar:
        if self._tty:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            bar = Progress(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                TimeRemainingColumn(), TextColumn("{task.fields[text]}"),
                console=Console(file=self.stream), transient=self._transient,
            )
            bar.start()
            self._task = bar.add_task(self.description, total=self.total, completed=self.completed, text="")
            self._rich = bar
        elif self.enabled:
            self._t0 = time.monotonic()
            self._heartbeat = threading.Thread(target=self._beat, name=f"progress {self.description}", daemon=True)
            self._heartbeat.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._heartbeat is not None:
            self._stop.set()
            self._heartbeat.join()
            self._heartbeat = None
        if self._rich is not None:
            self._rich.stop()  # type: ignore[attr-defined]
            self._rich = None
        elif self.enabled and exc_type is None and self.completed > self._start and self._shown != self.completed:
            self._line(force=True)

    # ------------------------------------------------------------------ updates
    def advance(self, n: int = 1) -> None:
        self.update(self.completed + n)

    def update(self, completed: int) -> None:
        self.completed = int(completed)
        if not self.enabled:
            return
        if self._rich is not None:
            self._rich.update(self._task, completed=self.completed, text=self.text)  # type: ignore[attr-defined]
        else:
            self._line()

    def add_total(self, n: int) -> None:
        """``n`` more units of work (a part of the phase that learned its size late, e.g. nested work)."""
        self.total += int(n)
        if self._rich is not None:
            self._rich.update(self._task, total=self.total)  # type: ignore[attr-defined]

    def note(self, text: str) -> None:
        """A short status shown beside the bar (losses, the current case)."""
        self.text = text
        if self._rich is not None:
            self._rich.update(self._task, text=text)  # type: ignore[attr-defined]

    # ------------------------------------------------------------------ plain lines
    def rate(self) -> float:
        """Units per second since the bar started (0 before the first unit)."""
        elapsed = time.monotonic() - self._t0
        done = self.completed - self._start
        return done / elapsed if elapsed > 0 and done > 0 else 0.0

    def eta_s(self) -> float | None:
        rate = self.rate()
        return (self.total - self.completed) / rate if rate > 0 else None

    def _beat(self) -> None:
        """The heartbeat thread of a plain bar: a line whenever ``every_s`` passed without one."""
        wait = self.every_s
        while not self._stop.wait(wait):
            self._line()
            wait = max(0.05, self.every_s - (time.monotonic() - max(self._last_line, self._t0)))

    def _line(self, force: bool = False) -> None:
        with self._lock:
            now = time.monotonic()
            if not force and now - self._last_line < self.every_s:
                return
            self._last_line, self._shown = now, self.completed
            eta = self.eta_s()
            if self.completed >= self.total:
                eta_text = ""
            elif eta is None:
                eta_text = f", {now - self._t0:.0f} s so far, ETA unknown"
            else:
                eta_text = f", ETA {eta:.0f} s"
            extra = f"  {self.text}" if self.text else ""
            self.stream.write(f"{self.description}: {self.completed}/{self.total} ({self.rate():.2f}/s{eta_text}){extra}\n")
            self.stream.flush()


def progress_bar(description: str, total: int, *, start: int = 0, enabled: bool = True,
                 transient: bool = False, every_s: float = 10.0) -> ProgressBar:
    """A :class:`ProgressBar` to use as a context manager (see the module docstring)."""
    return ProgressBar(description, total, start=start, enabled=enabled, transient=transient, every_s=every_s)
