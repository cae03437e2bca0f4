"""A job's state transitions, each a compare-and-set guarded by the attempt that made it.

A worker claims a job with :func:`claim`, which increments ``attempt``; every later write of that
run (:func:`heartbeat`, :func:`record_progress`, :func:`complete`, :func:`fail`,
:func:`mark_canceled`) carries the attempt it claimed and touches the row only while the job is
still ``running`` under that attempt. A stale run (its lease expired and another worker took
over) therefore cannot overwrite a newer one: its writes match no row and return False.

The functions never commit: the caller's ``session_scope`` commits once, so a transition and
what goes with it (the result and the artifact rows of :func:`complete`) land together or not
at all. Plain SQL through SQLAlchemy Core, so SQLite and PostgreSQL behave the same.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any, cast

from sqlalchemy import CursorResult, and_, or_, select, update
from sqlalchemy.orm import Session

from core.progress import Stage
from core.report import JobReport
from store.models import Artifact, Job, JobEvent, Result, utcnow
from store.status import JobStatus

RUNNING = JobStatus.RUNNING
QUEUED = JobStatus.QUEUED
LEASE_LOST = "worker lost (lease expired)"


def _rowcount(result: Any) -> int:
    return int(cast(CursorResult[Any], result).rowcount)


def _lease_until(now: datetime, lease_seconds: float) -> datetime:
    return now + timedelta(seconds=lease_seconds)


def gave_up_message(attempts: int, last_error: str | None) -> str:
    return f"gave up after {attempts} attempts: {last_error or LEASE_LOST}"


def _final_values(
    cancel: bool, attempt: int, max_attempts: int, last_error: str | None, now: datetime
) -> dict[str, Any] | None:
    """The end of a job that may not run again, or None where it may run once more.

    Shared by :func:`claim` and :func:`requeue_expired`: a requested cancel wins, then a job
    whose attempts are used up fails with the reason of its last run.
    """
    if cancel:
        return {"status": JobStatus.CANCELED, "finished_at": now, "lease_expires_at": None}
    if attempt >= max_attempts:
        return {
            "status": JobStatus.FAILED,
            "error": gave_up_message(attempt, last_error),
            "finished_at": now,
            "lease_expires_at": None,
        }
    return None


def claim(session: Session, job_id: str, worker_id: str, lease_seconds: float) -> int | None:
    """Take the job for one run; return the new attempt, or None when it is not ours to run.

    Claimable: ``queued``, or ``running`` whose lease has expired (its worker is gone). A job
    whose attempts are used up is failed here with the reason; a job whose cancel was requested
    is canceled. Two workers claiming at once: the UPDATE matches the attempt it read, so exactly
    one of them wins.
    """
    now = utcnow()
    row = session.execute(
        select(
            Job.status, Job.attempt, Job.max_attempts, Job.lease_expires_at, Job.cancel_requested, Job.error
        ).where(Job.id == job_id)
    ).one_or_none()
    if row is None:
        return None
    status, attempt, max_attempts, lease_expires_at, cancel, last_error = row
    expired = status == RUNNING and (lease_expires_at is None or lease_expires_at <= now)
    if status != QUEUED and not expired:
        return None
    guard = and_(
        Job.id == job_id,
        Job.attempt == attempt,
        or_(
            Job.status == QUEUED,
            and_(Job.status == RUNNING, or_(Job.lease_expires_at.is_(None), Job.lease_expires_at <= now)),
        ),
    )
    final = _final_values(cancel, attempt, max_attempts, last_error, now)
    if final is not None:
        session.execute(update(Job).where(guard).values(**final))
        return None
    result = session.execute(
        update(Job)
        .where(guard)
        .values(
            status=RUNNING,
            attempt=attempt + 1,
            lease_expires_at=_lease_until(now, lease_seconds),
            heartbeat_at=now,
            worker_id=worker_id,
            started_at=now,
        )
    )
    return attempt + 1 if _rowcount(result) == 1 else None


def _ours(job_id: str, attempt: int) -> Any:
    return and_(Job.id == job_id, Job.attempt == attempt, Job.status == RUNNING)


def heartbeat(session: Session, job_id: str, attempt: int, lease_seconds: float) -> bool:
    """Extend the lease of our run; False when the run is stale (the job moved on)."""
    now = utcnow()
    result = session.execute(
        update(Job)
        .where(_ours(job_id, attempt))
        .values(heartbeat_at=now, lease_expires_at=_lease_until(now, lease_seconds))
    )
    return _rowcount(result) == 1


def _finite(value: float | None) -> float | None:
    if value is None or not math.isfinite(value):
        return None
    return float(value)


def record_progress(
    session: Session,
    job_id: str,
    attempt: int,
    progress: Any,
    *,
    lease_seconds: float | None = None,
    eta_seconds: float | None = None,
    event: bool = True,
) -> bool:
    """Store a :class:`core.progress.Progress` on the job (and as a job event); False if stale.

    ``progress`` is duck-typed (stage, fraction, epoch, epochs, step, steps, loss, val_accuracy,
    message) so this module does not import core (and torch). With ``lease_seconds`` the write
    also renews the lease.
    """
    now = utcnow()
    loss = _finite(progress.loss)
    val_accuracy = _finite(progress.val_accuracy)
    metrics = {
        k: v
        for k, v in {
            "loss": loss,
            "val_accuracy": val_accuracy,
            "step": progress.step,
            "steps": progress.steps,
            "message": progress.message or None,
        }.items()
        if v is not None
    }
    values: dict[str, Any] = {
        "stage": progress.stage,
        "progress": min(1.0, max(0.0, float(progress.fraction))),
        "metrics": metrics,
        "heartbeat_at": now,
        "eta_seconds": _finite(eta_seconds),
    }
    if progress.epoch is not None:
        values["epoch"] = progress.epoch
    if progress.epochs is not None:
        values["epochs"] = progress.epochs
    if lease_seconds is not None:
        values["lease_expires_at"] = _lease_until(now, lease_seconds)
    result = session.execute(update(Job).where(_ours(job_id, attempt)).values(**values))
    if _rowcount(result) != 1:
        return False
    if event:
        session.add(
            JobEvent(
                job_id=job_id,
                attempt=attempt,
                created_at=now,
                stage=progress.stage,
                progress=values["progress"],
                epoch=progress.epoch,
                loss=loss,
                val_accuracy=val_accuracy,
                message=progress.message or "",
            )
        )
    return True


def cancel_requested(session: Session, job_id: str) -> bool:
    value = session.execute(select(Job.cancel_requested).where(Job.id == job_id)).scalar_one_or_none()
    return bool(value)


def _result_row(job_id: str, report: JobReport, now: datetime) -> Result:
    """The figures of ``report`` the API lists without reading the whole report."""
    return Result(
        job_id=job_id,
        params_before=report.params.before,
        params_after=report.params.after,
        flops_before=report.flops.before,
        flops_after=report.flops.after,
        val_accuracy_before=report.accuracy.val.before,
        val_accuracy_after=report.accuracy.val.after,
        test_accuracy_before=report.accuracy.test.before,
        test_accuracy_after=report.accuracy.test.after,
        latency_ms=report.latency_by_batch(),  # every batch size the job measured
        ranks={name: row.model_dump(mode="json") for name, row in report.ranks.items()},
        report=report.model_dump(mode="json"),
        created_at=now,
    )


def complete(
    session: Session,
    job_id: str,
    attempt: int,
    report: JobReport | Mapping[str, Any],
    artifacts: Sequence[tuple[str, int, str, str]],
) -> bool:
    """Flip our run to ``succeeded`` with its result row and artifact rows, in one transaction.

    ``report`` is the job's :class:`core.report.JobReport` (a decoded report.json is validated
    first, so a malformed one raises before anything is written).

    Idempotent: completing again the run that already succeeded returns True and writes nothing.
    A stale run returns False and writes nothing. If an insert fails the caller's transaction
    rolls back, the status flip included.
    """
    if not isinstance(report, JobReport):
        report = JobReport.model_validate(report)
    now = utcnow()
    result = session.execute(
        update(Job)
        .where(_ours(job_id, attempt))
        .values(
            status=JobStatus.SUCCEEDED,
            stage=Stage.DONE,
            progress=1.0,
            eta_seconds=0.0,
            finished_at=now,
            lease_expires_at=None,
            error=None,
        )
    )
    if _rowcount(result) != 1:
        row = session.execute(select(Job.status, Job.attempt).where(Job.id == job_id)).one_or_none()
        return row is not None and row.status == JobStatus.SUCCEEDED and row.attempt == attempt
    session.add(_result_row(job_id, report, now))
    for name, size_bytes, sha256, location in artifacts:
        session.add(
            Artifact(
                job_id=job_id,
                name=name,
                size_bytes=int(size_bytes),
                sha256=sha256,
                location=location,
                created_at=now,
            )
        )
    session.flush()  # surface a constraint violation here, inside the caller's transaction
    return True


def _finish(session: Session, job_id: str, attempt: int, status: JobStatus, error: str | None) -> bool:
    now = utcnow()
    result = session.execute(
        update(Job)
        .where(_ours(job_id, attempt))
        .values(status=status, error=error, finished_at=now, lease_expires_at=None, eta_seconds=None)
    )
    return _rowcount(result) == 1


def fail(session: Session, job_id: str, attempt: int, message: str) -> bool:
    """Our run failed for good with ``message`` (a person's message, never a traceback)."""
    return _finish(session, job_id, attempt, JobStatus.FAILED, message)


def mark_canceled(session: Session, job_id: str, attempt: int) -> bool:
    return _finish(session, job_id, attempt, JobStatus.CANCELED, None)


def requeue_expired(session: Session, now: datetime | None = None) -> list[str]:
    """Running jobs whose lease expired go back to ``queued`` (their ids are returned, to re-send).

    The attempt is kept; the next claim increments it. A job whose attempts are used up fails
    with the reason; one whose cancel was requested is canceled.
    """
    now = now or utcnow()
    rows = session.execute(
        select(Job.id, Job.attempt, Job.max_attempts, Job.cancel_requested, Job.error).where(
            Job.status == RUNNING, Job.lease_expires_at.is_not(None), Job.lease_expires_at <= now
        )
    ).all()
    requeued: list[str] = []
    for job_id, attempt, max_attempts, cancel, last_error in rows:
        guard = and_(
            Job.id == job_id, Job.attempt == attempt, Job.status == RUNNING, Job.lease_expires_at <= now
        )
        values = _final_values(cancel, attempt, max_attempts, last_error, now) or {
            "status": QUEUED,
            "worker_id": None,
            "lease_expires_at": None,
            # queued for its next attempt: not the dead attempt's stage, epoch and progress
            "stage": None,
            "progress": 0.0,
            "epoch": None,
            "eta_seconds": None,
        }
        result = session.execute(update(Job).where(guard).values(**values))
        if _rowcount(result) == 1 and values["status"] == QUEUED:
            requeued.append(job_id)
    return requeued


def requeue_stuck_queued(session: Session, older_than_s: float, now: datetime | None = None) -> list[str]:
    """Ids of jobs ``queued`` and untouched for ``older_than_s``: their message may be lost.

    Their ``updated_at`` is bumped so that each is re-sent at most once per ``older_than_s``.
    A duplicate message is harmless: the claim is a compare-and-set.
    """
    now = now or utcnow()
    cutoff = now - timedelta(seconds=older_than_s)
    ids = list(
        session.execute(select(Job.id).where(Job.status == QUEUED, Job.updated_at <= cutoff)).scalars()
    )
    stuck: list[str] = []
    for job_id in ids:
        result = session.execute(
            update(Job)
            .where(Job.id == job_id, Job.status == QUEUED, Job.updated_at <= cutoff)
            .values(updated_at=now)
        )
        if _rowcount(result) == 1:
            stuck.append(job_id)
    return stuck
