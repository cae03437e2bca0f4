"""Uploaded models (weights + architecture)."""

from __future__ import annotations

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from store.models import ModelRecord


def add(session: Session, record: ModelRecord) -> ModelRecord:
    session.add(record)
    session.flush()
    return record


def get_for_tenant(session: Session, tenant_id: str, model_id: str) -> ModelRecord | None:
    stmt = select(ModelRecord).where(ModelRecord.id == model_id, ModelRecord.tenant_id == tenant_id)
    return session.scalars(stmt).one_or_none()


def list_for_tenant(
    session: Session, tenant_id: str, limit: int = 20, offset: int = 0
) -> tuple[list[ModelRecord], int]:
    where = ModelRecord.tenant_id == tenant_id
    count = session.scalar(select(func.count()).select_from(ModelRecord).where(where)) or 0
    stmt = (
        select(ModelRecord)
        .where(where)
        .order_by(ModelRecord.created_at.desc(), ModelRecord.id)
        .limit(limit)
        .offset(offset)
    )
    return list(session.scalars(stmt)), count
