"""With the database down, a running job's reporter logs once per outage and backs off, instead
of a traceback per progress report (5.9 MB of log in 15 s before, issue 11)."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest

from core.progress import Progress
from store.db import dispose_engines
from store.outage import OutageGate
from store.settings import get_settings
from store.status import JobStatus
from tests.worker.conftest import load_job, make_job
from worker.tasks import JobReporter

# a real PostgreSQL URL with no server behind it: port 1 on loopback refuses at once
DOWN_URL = "postgresql+psycopg://postgres@127.0.0.1:1/lorita_down"


@pytest.fixture
def database(monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.MonkeyPatch]:
    """Point the worker's settings at a URL; restored afterwards."""
    yield monkeypatch
    dispose_engines()
    get_settings.cache_clear()


def _use(database: pytest.MonkeyPatch, url: str) -> None:
    database.setenv("LORITA_DATABASE_URL", url)
    get_settings.cache_clear()
    dispose_engines()


def test_many_failing_progress_reports_make_one_log_record(
    database: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    _use(database, DOWN_URL)
    reporter = JobReporter("j-down", attempt=1, lease_seconds=30)

    with caplog.at_level(logging.DEBUG, logger="worker.tasks"):
        for epoch in range(200):  # each a new epoch: every one would be written
            reporter.progress(Progress(stage="train", fraction=epoch / 200, epoch=epoch, epochs=200))
            reporter.should_stop()

    records = [r for r in caplog.records if r.name == "worker.tasks"]
    assert len(records) == 1, [r.getMessage() for r in records]
    assert "unreachable" in records[0].getMessage() and records[0].exc_info is None
    assert reporter.db.failures == 1  # the backoff kept the other 399 attempts off the network


def test_the_end_of_an_outage_is_logged_once_and_progress_resumes(
    database: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, db_url: str, tenant_id: str
) -> None:
    job_id = make_job(db_url, tenant_id, status=JobStatus.RUNNING, attempt=1)
    _use(database, DOWN_URL)
    reporter = JobReporter(job_id, attempt=1, lease_seconds=30)
    reporter.db = OutageGate(reporter.db.what, logging.getLogger("worker.tasks"), first_delay=0.0)

    with caplog.at_level(logging.DEBUG, logger="worker.tasks"):
        for epoch in range(5):
            reporter.progress(Progress(stage="train", fraction=0.1, epoch=epoch, epochs=10))
        _use(database, db_url)  # the database is back
        reporter.progress(Progress(stage="train", fraction=0.5, epoch=5, epochs=10))

    messages = [r.getMessage() for r in caplog.records if r.name == "worker.tasks"]
    assert len(messages) == 2 and "reachable again after 5 failed attempts" in messages[1]
    job = load_job(db_url, job_id)
    assert (job.stage, job.epoch, job.progress) == ("train", 5, 0.5)


def test_the_sweeper_logs_a_database_outage_once_not_a_traceback_a_pass(
    database: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from worker.recovery import BrokerWatch
    from worker.sweeper import SweeperThread

    _use(database, DOWN_URL)
    gate = OutageGate("sweeper", logging.getLogger("worker.sweeper"), first_delay=0.0)
    with caplog.at_level(logging.DEBUG, logger="worker.sweeper"):
        for _ in range(20):
            SweeperThread.sweep_once(BrokerWatch(), gate)

    records = [r for r in caplog.records if r.name == "worker.sweeper"]
    assert len(records) == 1, [r.getMessage() for r in records]
    assert "unreachable" in records[0].getMessage() and records[0].exc_info is None
    assert gate.failures == 20  # every pass tried (no backoff delay here) and failed quietly
