"""Housekeeping of the artifact store: leftover job folders and the retention of job outputs.

A run cleans up after itself (``store.jobfiles``), but a worker killed at the wrong moment, a job
failed by the sweeper (attempts used up) or canceled while queued leaves folders behind. One pass
lists the job folders of the store and compares them with the jobs' rows:

* no row (the job was deleted): the folder goes;
* ``failed`` or ``canceled``: the folder goes (nothing of theirs is recorded);
* ``succeeded``: only the attempt folder its artifact rows point at stays (``work/``, superseded
  ``a<N>/`` go);
* ``queued`` or ``running`` at attempt N: ``a<k>/`` for k < N go (k <= N while queued: the run
  that made ``a<N>/`` is dead); ``work/`` stays (the next run resumes from it).

Retention (``LORITA_ARTIFACT_RETENTION_DAYS``): a finished job whose end is older than that loses
its artifact rows and files; the job row, its report and figures stay.

On an S3 store the process's local workspace (``LORITA_WORK_DIR/jobs``) is swept the same way for
jobs that are no longer running, and its read cache (``LORITA_WORK_DIR/cache``) loses the copies
of deleted uploads and of files of jobs that no longer run. Every step is idempotent; several workers may run it at once.
"""

from __future__ import annotations

import logging
import re
import shutil
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from store.artifacts import ArtifactStore, LocalArtifactStore, job_key
from store.db import session_scope
from store.models import Artifact, Dataset, Job, ModelRecord, utcnow
from store.status import JobStatus

log = logging.getLogger(__name__)

_ATTEMPT = re.compile(r"^a(\d+)$")
BATCH = 500


@dataclass
class HousekeepingReport:
    removed: list[str] = field(default_factory=list)  # keys of folders removed
    expired_jobs: list[str] = field(default_factory=list)


def _attempt_of(name: str) -> int | None:
    match = _ATTEMPT.match(name)
    return int(match.group(1)) if match else None


def _rows(session: Session, ids: list[str]) -> dict[str, tuple[JobStatus, int]]:
    out: dict[str, tuple[JobStatus, int]] = {}
    for i in range(0, len(ids), BATCH):
        chunk = ids[i : i + BATCH]
        for job_id, status, attempt in session.execute(
            select(Job.id, Job.status, Job.attempt).where(Job.id.in_(chunk))
        ).tuples():
            out[job_id] = (JobStatus(status), int(attempt))
    return out


def _kept_folders(session: Session, job_id: str) -> set[str]:
    locations = session.scalars(select(Artifact.location).where(Artifact.job_id == job_id)).all()
    kept = set()
    for location in locations:
        parts = location.split("/")
        if len(parts) > 5:  # tenants/<t>/jobs/<j>/<folder>/...
            kept.add(parts[4])
    return kept


def stale_children(
    status: JobStatus | None, attempt: int, children: Iterable[str], kept: set[str]
) -> list[str] | None:
    """The children of a job folder to remove; None: the whole folder."""
    if status is None or status in (JobStatus.FAILED, JobStatus.CANCELED):
        return None
    if status == JobStatus.SUCCEEDED:
        return [c for c in children if c not in kept]
    limit = attempt if status == JobStatus.QUEUED else attempt - 1
    return [c for c in children if (k := _attempt_of(c)) is not None and k <= limit]


def sweep_job_folders(store: ArtifactStore, database_url: str | None = None) -> list[str]:
    removed: list[str] = []
    for tenant in store.list_children("tenants"):
        jobs_prefix = f"tenants/{tenant}/jobs"
        ids = store.list_children(jobs_prefix)
        if not ids:
            continue
        with session_scope(database_url) as session:
            rows = _rows(session, ids)
            kept = {
                job_id: _kept_folders(session, job_id) for job_id, (s, _) in rows.items() if s == "succeeded"
            }
        for job_id in ids:
            status, attempt = rows.get(job_id, (None, 0))
            base = job_key(tenant, job_id)
            doomed = stale_children(status, attempt, store.list_children(base), kept.get(job_id, set()))
            if doomed is None:
                store.delete_prefix(base)
                removed.append(base)
                continue
            for child in doomed:
                store.delete_prefix(f"{base}/{child}")
                removed.append(f"{base}/{child}")
    return removed


def sweep_local_workspace(store: ArtifactStore, database_url: str | None = None) -> list[str]:
    """S3 only: this machine's copies of jobs that no longer run here (a killed run's leftovers)."""
    if isinstance(store, LocalArtifactStore):
        return []
    root = store.workspace("tenants").parent  # <work_dir>/jobs
    tenants = root / "tenants"
    if not tenants.is_dir():
        return []
    folders = {p.name: p for t in tenants.iterdir() for p in (t / "jobs").glob("*") if p.is_dir()}
    if not folders:
        return []
    with session_scope(database_url) as session:
        rows = _rows(session, list(folders))
    removed = []
    for job_id, path in folders.items():
        status = rows.get(job_id, (None, 0))[0]
        if status != JobStatus.RUNNING:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(str(Path(path).relative_to(root)))
    return removed


def sweep_local_cache(store: ArtifactStore, database_url: str | None = None) -> list[str]:
    """S3 only: this machine's cached downloads of uploads that were deleted, and of files of jobs
    that are no longer queued or running (a derived job's copy of its parent's dense model)."""
    if isinstance(store, LocalArtifactStore):
        return []
    cache = store.workspace("tenants").parent.parent / "cache" / "tenants"
    if not cache.is_dir():
        return []
    entries = {
        (kind, p.name): p
        for t in cache.iterdir()
        for kind in ("models", "datasets", "jobs")
        for p in (t / kind).glob("*")
        if p.is_dir()
    }
    if not entries:
        return []
    ids = {kind: [i for k, i in entries if k == kind] for kind in ("models", "datasets", "jobs")}
    with session_scope(database_url) as session:
        alive = {
            "models": set(session.scalars(select(ModelRecord.id).where(ModelRecord.id.in_(ids["models"])))),
            "datasets": set(session.scalars(select(Dataset.id).where(Dataset.id.in_(ids["datasets"])))),
            "jobs": {
                job_id
                for job_id, (status, _) in _rows(session, ids["jobs"]).items()
                if status in (JobStatus.QUEUED, JobStatus.RUNNING)
            },
        }
    removed = []
    for (kind, object_id), path in entries.items():
        if object_id not in alive[kind]:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(f"cache/{kind}/{object_id}")
    return removed


def expire_outputs(
    store: ArtifactStore, retention_days: float, database_url: str | None = None, now: datetime | None = None
) -> list[str]:
    """Artifact rows and files of jobs finished more than ``retention_days`` ago."""
    cutoff = (now or utcnow()) - timedelta(days=retention_days)
    finished = (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELED)
    with session_scope(database_url) as session:
        rows = session.execute(
            select(Job.id, Job.tenant_id)
            .where(Job.status.in_(finished), Job.finished_at.is_not(None), Job.finished_at < cutoff)
            .where(Job.id.in_(select(Artifact.job_id)))
            .limit(BATCH)
        ).all()
        ids = [r[0] for r in rows]
        if ids:
            session.execute(delete(Artifact).where(Artifact.job_id.in_(ids)))
    for job_id, tenant_id in rows:  # after the commit: a failure leaves files for the next pass
        store.delete_prefix(job_key(tenant_id, job_id))
    return ids


def housekeeping(
    store: ArtifactStore, retention_days: float | None = None, database_url: str | None = None
) -> HousekeepingReport:
    report = HousekeepingReport()
    if retention_days is not None:
        report.expired_jobs = expire_outputs(store, retention_days, database_url)
    report.removed = (
        sweep_job_folders(store, database_url)
        + sweep_local_workspace(store, database_url)
        + sweep_local_cache(store, database_url)
    )
    if report.removed or report.expired_jobs:
        log.info(
            "housekeeping: removed %d leftover folder(s), expired the outputs of %d job(s)",
            len(report.removed),
            len(report.expired_jobs),
        )
    return report
