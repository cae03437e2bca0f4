"""Deleting a tenant's models, datasets and jobs: which active jobs still need them, and the rows.

The rows go in one statement each; the database cascades a job's events, result and artifact rows,
and a derived job's ``parent_id`` becomes NULL. Files are removed by the caller after the commit
(a failure then leaves an orphan file for the housekeeping, never a row without its file).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from store.models import Dataset, Job, ModelRecord
from store.quotas import ACTIVE


def _active_configs(session: Session, tenant_id: str) -> list[tuple[str, dict[str, Any], str | None]]:
    rows = session.execute(
        select(Job.id, Job.config, Job.parent_id).where(Job.tenant_id == tenant_id, Job.status.in_(ACTIVE))
    ).all()
    return [(str(r[0]), dict(r[1] or {}), r[2]) for r in rows]


def active_jobs_using_model(session: Session, tenant_id: str, model_id: str) -> list[str]:
    return [
        job_id
        for job_id, config, _ in _active_configs(session, tenant_id)
        if (config.get("model") or {}).get("weights") == model_id
        or (config.get("model") or {}).get("program") == model_id
    ]


def active_jobs_using_dataset(session: Session, tenant_id: str, dataset_id: str) -> list[str]:
    return [
        job_id
        for job_id, config, _ in _active_configs(session, tenant_id)
        if (config.get("dataset") or {}).get("id") == dataset_id
    ]


def active_jobs_derived_from(session: Session, tenant_id: str, job_id: str) -> list[str]:
    return [jid for jid, _, parent in _active_configs(session, tenant_id) if parent == job_id]


def delete_model(session: Session, tenant_id: str, model_id: str) -> bool:
    result = session.execute(
        delete(ModelRecord).where(ModelRecord.id == model_id, ModelRecord.tenant_id == tenant_id)
    )
    return bool(getattr(result, "rowcount", 0))


def delete_dataset(session: Session, tenant_id: str, dataset_id: str) -> bool:
    result = session.execute(delete(Dataset).where(Dataset.id == dataset_id, Dataset.tenant_id == tenant_id))
    return bool(getattr(result, "rowcount", 0))


def delete_job(session: Session, tenant_id: str, job_id: str) -> bool:
    result = session.execute(
        delete(Job).where(Job.id == job_id, Job.tenant_id == tenant_id, Job.status.not_in(ACTIVE))
    )
    return bool(getattr(result, "rowcount", 0))
