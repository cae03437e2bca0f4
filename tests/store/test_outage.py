"""store.outage: one log line per outage, attempts spaced out while it lasts."""

from __future__ import annotations

import logging

import pytest

from store.outage import OutageGate


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_an_outage_logs_once_and_backs_off_then_logs_its_end(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    gate = OutageGate("job j1", logging.getLogger("test.outage"), first_delay=1.0, max_delay=8.0, clock=clock)
    attempts = 0
    with caplog.at_level(logging.INFO, logger="test.outage"):
        for _ in range(600):  # 60 s of progress reports every 0.1 s, the database down throughout
            if gate.ready():
                attempts += 1
                gate.failed(ConnectionError("refused"))
            clock.now += 0.1
        assert len(caplog.records) == 1
        assert "unreachable" in caplog.records[0].getMessage() and caplog.records[0].exc_info is None
        gate.succeeded()

    # delays 1, 2, 4, 8, 8, ...: about 10 attempts in 60 s instead of 600
    assert 8 <= attempts <= 12
    assert len(caplog.records) == 2 and "reachable again" in caplog.records[1].getMessage()
    assert gate.ready()
