"""Child processes of the CLI (the embedded worker, the demo's service): stop a whole group, and
keep the embedded worker running (``Supervisor``)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable


def stop_process_group(
    proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout: float = 30.0
) -> None:
    """Send ``sig`` to the child's process group (SIGTERM: a warm shutdown), then SIGKILL what is left.

    The child must have been started with ``start_new_session=True`` so that its group is its own.
    """
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


class Supervisor:
    """Keep one child running: when it exits on its own, start another (``lorita serve``'s worker).

    The embedded service has no process manager above it, so a worker that dies (a crash in a
    library, the OOM killer) would leave every job queued for good. The restart waits ``delay``
    seconds, doubling up to ``max_delay`` while children keep dying within ``steady`` seconds of
    their start. ``stop`` ends the loop and stops the current child's process group.
    """

    def __init__(
        self,
        spawn: Callable[[], subprocess.Popen[bytes]],
        *,
        name: str = "worker",
        delay: float = 1.0,
        max_delay: float = 30.0,
        steady: float = 60.0,
    ) -> None:
        self._spawn, self.name = spawn, name
        self._delay, self._max_delay, self._steady = delay, max_delay, steady
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self.proc = spawn()
        self.restarts = 0
        self._thread = threading.Thread(target=self._watch, name=f"supervise-{name}", daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        delay = self._delay
        while not self._stopping.is_set():
            started = time.monotonic()
            code = self.proc.wait()
            if self._stopping.is_set():
                return
            delay = self._delay if time.monotonic() - started >= self._steady else delay
            print(
                f"lorita: the {self.name} exited with code {code}; starting another in {delay:g} s",
                file=sys.stderr,
                flush=True,
            )
            if self._stopping.wait(delay):
                return
            with self._lock:
                if self._stopping.is_set():
                    return
                self.proc = self._spawn()
                self.restarts += 1
            delay = min(delay * 2, self._max_delay)

    def stop(self, timeout: float = 30.0) -> None:
        self._stopping.set()
        with self._lock:
            stop_process_group(self.proc, timeout=timeout)
        self._thread.join(timeout=5.0)
