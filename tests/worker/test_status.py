"""One status vocabulary: the enum drives the check constraint, reads come back typed, and
``claim`` and ``requeue_expired`` end a job that may not run again the same way."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import CheckConstraint, text, update
from sqlalchemy.exc import IntegrityError

from store import lifecycle
from store.db import session_scope
from store.models import Base, Job, utcnow
from store.status import FINISHED, JobStatus, sql_in_list
from tests.worker.conftest import load_job, make_job


def test_the_check_constraint_lists_every_status() -> None:
    constraints = Base.metadata.tables["jobs"].constraints
    constraint = next(c for c in constraints if c.name == "ck_jobs_status")
    assert isinstance(constraint, CheckConstraint)
    assert str(constraint.sqltext) == sql_in_list("status")
    assert sql_in_list("status") == "status IN ('queued', 'running', 'succeeded', 'failed', 'canceled')"
    assert {s for s in JobStatus if s.finished} == FINISHED


def test_status_reads_back_as_the_enum_and_unknown_values_are_refused(db_url: str, tenant_id: str) -> None:
    job_id = make_job(db_url, tenant_id)
    job = load_job(db_url, job_id)
    assert type(job.status) is JobStatus and job.status is JobStatus.QUEUED
    with pytest.raises(IntegrityError), session_scope(db_url) as s:
        s.execute(text("UPDATE jobs SET status = 'paused' WHERE id = :id"), {"id": job_id})


def _expire(db_url: str, job_id: str) -> None:
    with session_scope(db_url) as s:
        s.execute(
            update(Job).where(Job.id == job_id).values(lease_expires_at=utcnow() - timedelta(seconds=1))
        )


def _take_back(db_url: str, job_id: str, via: str) -> None:
    """The expired job seen again by another worker's ``claim`` or the sweeper's
    ``requeue_expired``: neither hands it out to run once more."""
    with session_scope(db_url) as s:
        if via == "claim":
            assert lifecycle.claim(s, job_id, "w2", 60) is None
        else:
            assert lifecycle.requeue_expired(s) == []


@pytest.mark.parametrize("via", ["claim", "requeue_expired"])
def test_a_requested_cancel_wins_over_a_retry(db_url: str, tenant_id: str, via: str) -> None:
    job_id = make_job(db_url, tenant_id)
    with session_scope(db_url) as s:
        assert lifecycle.claim(s, job_id, "w1", 60) == 1
    _expire(db_url, job_id)
    with session_scope(db_url) as s:
        s.execute(update(Job).where(Job.id == job_id).values(cancel_requested=True))
    _take_back(db_url, job_id, via)
    job = load_job(db_url, job_id)
    assert (job.status, job.attempt, job.lease_expires_at) == (JobStatus.CANCELED, 1, None)
    assert job.finished_at is not None


@pytest.mark.parametrize("via", ["claim", "requeue_expired"])
def test_used_up_attempts_fail_with_the_same_message(db_url: str, tenant_id: str, via: str) -> None:
    job_id = make_job(db_url, tenant_id, max_attempts=1)
    with session_scope(db_url) as s:
        assert lifecycle.claim(s, job_id, "w1", 60) == 1
    _expire(db_url, job_id)
    _take_back(db_url, job_id, via)
    job = load_job(db_url, job_id)
    assert (job.status, job.error) == (
        JobStatus.FAILED,
        "gave up after 1 attempts: worker lost (lease expired)",
    )
