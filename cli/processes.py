"""Child processes of the CLI (the embedded worker, the demo's service): stop a whole group."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess


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
