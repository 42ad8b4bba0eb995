"""A minimal progress line on stderr (results go to stdout; logs and progress never do)."""

from __future__ import annotations

import sys
import time

from instret.process_rank import rank


def log(message: str) -> None:
    """One line on stderr; under torchrun from rank 0 only (every process would say the same)."""
    if rank() == 0:
        print(message, file=sys.stderr, flush=True)


def plural(n: int, noun: str) -> str:
    """'1 epoch', '2 epochs'."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def clock(seconds: float) -> str:
    """A duration as a person reads it: 42 s, 3 min 05 s, 1 h 02 min."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


class Progress:
    """`\\r`-redrawn bar on a terminal, throttled; silent when stderr is not a terminal."""

    def __init__(self, total: int, label: str, enabled: bool | None = None, min_interval: float = 0.25):
        self.total, self.label, self.done = total, label, 0
        self.start = time.perf_counter()
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self.min_interval, self._last = min_interval, 0.0

    def due(self) -> bool:
        """Whether a redraw would show now: callers skip costly status (a GPU sync) otherwise."""
        return self.enabled and time.perf_counter() - self._last >= self.min_interval

    def update(self, n: int = 1, status: str | None = None) -> None:
        self.done += n
        if status is None or not self.enabled:
            return
        self._last = time.perf_counter()
        width = 24
        filled = int(width * self.done / max(1, self.total))
        bar = "#" * filled + "." * (width - filled)
        left = (self._last - self.start) / max(1, self.done) * (self.total - self.done)
        sys.stderr.write(f"\r{self.label} [{bar}] {self.done}/{self.total} {status}  {clock(left)} left\x1b[K")
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\r\x1b[K")
            sys.stderr.flush()


class StagedProgress:
    """progress(stage, done, total) callbacks (instret.duplicates) drawn as a Progress bar per
    stage, labelled by `labels` (stage -> label), counting `units`; a stage without a total shows
    its label alone. Silent when stderr is not a terminal, as Progress is."""

    def __init__(self, labels: dict[str, str], units: str = "", enabled: bool | None = None):
        self.labels, self.units = labels, units
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self.stage: str | None = None
        self.bar: Progress | None = None

    def __call__(self, stage: str, done: int, total: int) -> None:
        if stage != self.stage:
            self.close()
            self.stage = stage
            if total:
                self.bar = Progress(total, self.labels[stage], self.enabled)
            elif self.enabled:
                sys.stderr.write(f"\r{self.labels[stage]}…\x1b[K")
                sys.stderr.flush()
        if self.bar is not None and done > self.bar.done:
            self.bar.update(done - self.bar.done, status=self.units)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        elif self.stage is not None and self.enabled:
            sys.stderr.write("\r\x1b[K")
            sys.stderr.flush()
