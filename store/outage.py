"""One log line per database outage, and backoff while it lasts.

A worker writes progress, heartbeats and cancel polls every few seconds; with the database down,
logging a traceback for each wrote megabytes a minute (issue 11). A gate shared by those writers
logs the first failure of an outage (one line, no traceback), skips attempts while a growing
delay runs (1, 2, 4 ... 30 s), and logs once more when a write succeeds again.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable


class OutageGate:
    def __init__(
        self,
        what: str,
        logger: logging.Logger,
        *,
        first_delay: float = 1.0,
        max_delay: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.what = what
        self.log = logger
        self.first_delay, self.max_delay = first_delay, max_delay
        self.clock = clock
        self.failures = 0
        self._retry_at = 0.0
        self._lock = threading.Lock()

    def ready(self) -> bool:
        """False while the backoff after a failure runs: skip this attempt."""
        with self._lock:
            return self.failures == 0 or self.clock() >= self._retry_at

    def failed(self, err: BaseException) -> None:
        with self._lock:
            self.failures += 1
            delay = min(self.max_delay, self.first_delay * 2 ** min(self.failures - 1, 30))
            self._retry_at = self.clock() + delay
            first = self.failures == 1
        if first:
            self.log.warning(
                "%s: the database is unreachable (%s); retrying with backoff up to %.0f s, "
                "logged again when it is back",
                self.what,
                type(err).__name__,
                self.max_delay,
            )

    def succeeded(self) -> None:
        with self._lock:
            failures, self.failures = self.failures, 0
        if failures:
            self.log.warning(
                "%s: the database is reachable again after %d failed attempts", self.what, failures
            )
