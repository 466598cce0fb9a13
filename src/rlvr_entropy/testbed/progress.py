"""A progress line that suits both a terminal and a log file (pure Python).

On a terminal the line is redrawn in place (at most every ``min_interval`` seconds). Anywhere else (a file, a pipe,
``run.log``) it prints a plain line at every 10% of the work and at the end: a log holds about a dozen lines, never
hundreds of carriage-return redraws.

The ETA is measured from the first update on, so set-up time (imports, the warm start, the step-0 evaluation) does
not inflate it: no ETA is shown before two updates, then ``remaining * (elapsed since the first update) / (work
since the first update)``.
"""
from __future__ import annotations

import sys
import time
from typing import IO, Callable


def _fmt_s(s: float) -> str:
    s = max(0, int(round(s)))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class Progress:
    """``Progress(total, desc)``; ``update(done, **info)`` with the absolute amount done; ``close()``."""

    def __init__(self, total: int, desc: str, stream: IO[str] | None = None, initial: int = 0,
                 tty: bool | None = None, min_interval: float = 0.5, clock: Callable[[], float] = time.monotonic):
        self.total, self.desc = max(int(total), 0), desc
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)()) if tty is None else tty
        self.min_interval, self.clock = min_interval, clock
        self.done = initial
        self._first: tuple[float, int] | None = None  # (time, done) at the first update
        self._last_draw = -1e9
        self._next_decile = (10 * initial // self.total + 1) if self.total else 11
        self._width = 0
        self._closed = False

    def eta(self) -> float | None:
        """Seconds left, or None while the rate is not measured yet."""
        if self._first is None:
            return None
        t0, n0 = self._first
        if self.done <= n0:
            return None
        return (self.total - self.done) * (self.clock() - t0) / (self.done - n0)

    def line(self, info: dict | None = None) -> str:
        pct = 100 * self.done / self.total if self.total else 100.0
        eta = self.eta()
        extra = "".join(f" {k}={v}" for k, v in (info or {}).items())
        return (f"{self.desc}: {self.done}/{self.total} ({pct:3.0f}%) "
                f"ETA {_fmt_s(eta) if eta is not None else '--'}{extra}")

    def update(self, done: int, **info) -> None:
        now = self.clock()
        self.done = min(int(done), self.total) if self.total else int(done)
        if self._first is None:
            self._first = (now, self.done)
        if self.tty:
            if now - self._last_draw >= self.min_interval or self.done >= self.total:
                text = self.line(info)
                self.stream.write("\r" + text + " " * max(0, self._width - len(text)))
                self.stream.flush()
                self._width = len(text)
                self._last_draw = now
        elif self.total and 10 * self.done >= self._next_decile * self.total:
            self._next_decile = 10 * self.done // self.total + 1
            self.stream.write(self.line(info) + "\n")
            self.stream.flush()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.tty and self._width:
            self.stream.write("\n")
            self.stream.flush()
