"""What one tenant uses, for the quotas: active jobs and stored bytes (queries only, no policy).

Stored bytes are the sizes recorded with the rows (uploads and job outputs), not a walk of the
artifact store: one indexed query per check, and the same figure on a local disk and on S3.
"""

from __future__ import annotations

from sqlalchemy import func, select, text
from sqlalchemy.orm import Session

from store.models import Artifact, Dataset, Job, ModelRecord
from store.status import JobStatus

ACTIVE = (JobStatus.QUEUED, JobStatus.RUNNING)


def lock_tenant(session: Session, tenant_id: str) -> None:
    """Serialize quota checks of one tenant until the transaction ends (PostgreSQL advisory lock),
    so that two concurrent submissions cannot both take the last slot. SQLite has one writer
    already; there this does nothing."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(
            text("SELECT pg_advisory_xact_lock(hashtext(:key))"), {"key": f"lorita-quota:{tenant_id}"}
        )


def active_jobs(session: Session, tenant_id: str) -> int:
    query = select(func.count()).select_from(Job).where(Job.tenant_id == tenant_id, Job.status.in_(ACTIVE))
    return int(session.scalar(query) or 0)


def stored_bytes(session: Session, tenant_id: str) -> int:
    models = select(func.coalesce(func.sum(ModelRecord.size_bytes), 0)).where(
        ModelRecord.tenant_id == tenant_id
    )
    datasets = select(func.coalesce(func.sum(Dataset.size_bytes), 0)).where(Dataset.tenant_id == tenant_id)
    outputs = (
        select(func.coalesce(func.sum(Artifact.size_bytes), 0))
        .join(Job, Job.id == Artifact.job_id)
        .where(Job.tenant_id == tenant_id)
    )
    return sum(int(session.scalar(q) or 0) for q in (models, datasets, outputs))


def job_with_key(session: Session, tenant_id: str, idempotency_key: str | None) -> bool:
    if idempotency_key is None:
        return False
    query = select(Job.id).where(Job.tenant_id == tenant_id, Job.idempotency_key == idempotency_key)
    return session.scalar(query) is not None
