"""Uploaded models (weights + architecture)."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from store.models import ModelRecord
from store.repositories.paging import newest_first


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
    return newest_first(session, ModelRecord, ModelRecord.tenant_id == tenant_id, limit=limit, offset=offset)
