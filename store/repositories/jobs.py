"""Jobs as the API sees them: create (idempotently), read, list, request cancellation.

The worker's attempt-guarded transitions (claim, heartbeat, progress, complete, fail, requeue)
live in ``store.lifecycle``.
"""

from __future__ import annotations

import enum
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from store.models import Artifact, Job, JobEvent, Result
from store.repositories.paging import newest_first
from store.status import JobStatus


class CancelOutcome(enum.Enum):
    CANCELED = "canceled"  # was queued: canceled at once
    REQUESTED = "requested"  # running: the worker stops at its next step
    FINISHED = "finished"  # already succeeded, failed or canceled: nothing to do


def get_for_tenant(session: Session, tenant_id: str, job_id: str) -> Job | None:
    return session.scalars(select(Job).where(Job.id == job_id, Job.tenant_id == tenant_id)).one_or_none()


def get_by_idempotency_key(session: Session, tenant_id: str, key: str) -> Job | None:
    stmt = select(Job).where(Job.tenant_id == tenant_id, Job.idempotency_key == key)
    return session.scalars(stmt).one_or_none()


def create(
    session: Session,
    tenant_id: str,
    config: dict[str, Any],
    *,
    max_attempts: int,
    name: str | None = None,
    idempotency_key: str | None = None,
) -> tuple[Job, bool]:
    """Insert a queued job; returns (job, created).

    With an ``idempotency_key`` already used by this tenant, the existing job is returned and
    nothing is inserted, also when two requests race (the unique constraint decides).
    """
    if idempotency_key is not None:
        existing = get_by_idempotency_key(session, tenant_id, idempotency_key)
        if existing is not None:
            return existing, False
    job = Job(
        tenant_id=tenant_id,
        name=name,
        config=config,
        status=JobStatus.QUEUED,
        max_attempts=max_attempts,
        idempotency_key=idempotency_key,
    )
    try:
        with session.begin_nested():
            session.add(job)
    except IntegrityError:
        if idempotency_key is None:
            raise
        existing = get_by_idempotency_key(session, tenant_id, idempotency_key)
        if existing is None:
            raise
        return existing, False
    return job, True


def list_for_tenant(
    session: Session,
    tenant_id: str,
    *,
    status: JobStatus | None = None,
    limit: int = 20,
    offset: int = 0,
) -> tuple[list[Job], int]:
    conditions = [Job.tenant_id == tenant_id]
    if status is not None:
        conditions.append(Job.status == status)
    return newest_first(session, Job, *conditions, limit=limit, offset=offset)


def request_cancel(session: Session, job: Job) -> CancelOutcome:
    """Cancel a queued job at once, or flag a running one; compare-and-set on the status."""
    now = datetime.now(UTC)
    canceled = session.execute(
        update(Job)
        .where(Job.id == job.id, Job.status == JobStatus.QUEUED)
        .values(status=JobStatus.CANCELED, cancel_requested=True, finished_at=now, updated_at=now)
        .execution_options(synchronize_session=False)
    )
    if canceled.rowcount:  # type: ignore[attr-defined]
        session.refresh(job)
        return CancelOutcome.CANCELED
    flagged = session.execute(
        update(Job)
        .where(Job.id == job.id, Job.status == JobStatus.RUNNING)
        .values(cancel_requested=True, updated_at=now)
        .execution_options(synchronize_session=False)
    )
    session.refresh(job)
    if flagged.rowcount:  # type: ignore[attr-defined]
        return CancelOutcome.REQUESTED
    return CancelOutcome.FINISHED


def list_events(session: Session, job_id: str, *, after_id: int = 0, limit: int = 500) -> list[JobEvent]:
    stmt = (
        select(JobEvent)
        .where(JobEvent.job_id == job_id, JobEvent.id > after_id)
        .order_by(JobEvent.id)
        .limit(limit)
    )
    return list(session.scalars(stmt))


def get_result(session: Session, job_id: str) -> Result | None:
    return session.get(Result, job_id)


def list_artifacts(session: Session, job_id: str) -> list[Artifact]:
    return list(session.scalars(select(Artifact).where(Artifact.job_id == job_id).order_by(Artifact.name)))


def get_artifact(session: Session, job_id: str, name: str) -> Artifact | None:
    stmt = select(Artifact).where(Artifact.job_id == job_id, Artifact.name == name)
    return session.scalars(stmt).one_or_none()
