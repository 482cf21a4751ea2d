"""Progress for long loops: a tqdm bar on a terminal, a log line with rate and ETA elsewhere.

tqdm alone goes silent when stderr is not a terminal (a batch job, CI, `nohup ... > log`), which
is exactly where an hour-long corpus encoding most needs to say how far it is. `Progress` keeps
the bar for people at a terminal and otherwise logs one line every `log_every_seconds`.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Optional

log = logging.getLogger("gemb.progress")


def format_duration(seconds: float) -> str:
    """3725 -> '1h02m05s'; 65 -> '1m05s'."""
    seconds = int(max(seconds, 0))
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m{seconds:02d}s" if hours else f"{minutes}m{seconds:02d}s"


class Progress:
    """Counts `total` units of work; use as a context manager and call update(n).

    mode: None picks a bar when stderr is a terminal and log lines otherwise; "bar", "log" and
    "off" force one. Log lines only start after `log_every_seconds`, so short loops stay quiet.
    """

    def __init__(self, total: int, description: str, unit: str = "item",
                 mode: Optional[str] = None, log_every_seconds: float = 30.0,
                 logger: Optional[logging.Logger] = None, clock=time.monotonic):
        if mode is None:
            mode = "bar" if _stderr_is_terminal() else "log"
        if mode not in ("bar", "log", "off"):
            raise ValueError(f"progress mode must be 'bar', 'log' or 'off', got {mode!r}")
        self.total, self.description, self.unit, self.mode = total, description, unit, mode
        self.log_every_seconds = log_every_seconds
        self.logger = logger or log
        self.done = 0
        self._clock = clock
        self._bar = None
        self._start = self._last_log = clock()

    def __enter__(self) -> "Progress":
        if self.mode == "bar":
            from tqdm.auto import tqdm

            self._bar = tqdm(total=self.total, desc=self.description, unit=self.unit, leave=False)
        self._start = self._last_log = self._clock()
        return self

    def update(self, count: int = 1) -> None:
        self.done += count
        if self._bar is not None:
            self._bar.update(count)
        elif self.mode == "log":
            now = self._clock()
            if now - self._last_log >= self.log_every_seconds and self.done < self.total:
                self.logger.info("%s", self.status_line(now))
                self._last_log = now

    def status_line(self, now: Optional[float] = None) -> str:
        """'encode documents: 1,536/6,267 texts (24.5%), 21.3 texts/s, ETA 3m42s'."""
        elapsed = max((self._clock() if now is None else now) - self._start, 1e-9)
        rate = self.done / elapsed
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        percent = 100.0 * self.done / self.total if self.total else 100.0
        eta_text = format_duration(eta) if eta != float("inf") else "unknown"
        return (f"{self.description}: {self.done:,}/{self.total:,} {self.unit}s ({percent:.1f}%), "
                f"{rate:.1f} {self.unit}s/s, ETA {eta_text}")

    def __exit__(self, *exc_info) -> None:
        if self._bar is not None:
            self._bar.close()
        elif self.mode == "log" and self._clock() - self._start >= self.log_every_seconds:
            # A loop long enough to have logged progress also logs how it finished.
            self.logger.info("%s (done in %s)", self.status_line(),
                             format_duration(self._clock() - self._start))


def _stderr_is_terminal() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed stderr
        return False
