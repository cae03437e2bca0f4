"""``lorita serve`` keeps its worker child running: one that exits is replaced, and stop ends it."""

from __future__ import annotations

import itertools
import subprocess
import sys
import time
from collections.abc import Callable

import pytest

from cli.processes import Supervisor


def _spawner() -> tuple[list[subprocess.Popen[bytes]], Callable[[], subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []

    def spawn() -> subprocess.Popen[bytes]:
        # the first child dies at once (as the worker did on a broker error), the next ones stay up
        code = "import sys; sys.exit(3)" if not started else "import time; time.sleep(600)"
        proc = subprocess.Popen([sys.executable, "-c", code], start_new_session=True)
        started.append(proc)
        return proc

    return started, spawn


def _wait_for(condition: Callable[[], bool], seconds: float = 20.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False


def test_a_child_that_exits_is_replaced_and_stop_ends_the_replacement(
    capfd: pytest.CaptureFixture[str],
) -> None:
    started, spawn = _spawner()
    supervisor = Supervisor(spawn, delay=0.05, steady=60.0)
    try:
        assert _wait_for(lambda: supervisor.restarts == 1 and len(started) == 2)
        assert started[0].returncode == 3
        replacement = supervisor.proc
        assert replacement is started[1] and replacement.poll() is None
    finally:
        supervisor.stop(timeout=5.0)
    assert replacement.poll() is not None  # stopped, and nothing new started after stop
    time.sleep(0.2)
    assert len(started) == 2 and supervisor.restarts == 1
    err = capfd.readouterr().err
    assert "the worker exited with code 3; starting another" in err


def test_children_that_keep_dying_are_restarted_ever_more_slowly() -> None:
    starts: list[float] = []

    def spawn() -> subprocess.Popen[bytes]:
        starts.append(time.monotonic())
        return subprocess.Popen([sys.executable, "-c", "pass"], start_new_session=True)

    supervisor = Supervisor(spawn, delay=0.1, max_delay=0.4, steady=60.0)
    try:
        assert _wait_for(lambda: len(starts) >= 5)
    finally:
        supervisor.stop(timeout=5.0)
    gaps = [b - a for a, b in itertools.pairwise(starts[:5])]
    # the waits are 0.1, 0.2, 0.4, 0.4 s: each gap is at least its wait (process start time adds to it)
    assert all(gap >= wait - 0.01 for gap, wait in zip(gaps, [0.1, 0.2, 0.4, 0.4], strict=True))
