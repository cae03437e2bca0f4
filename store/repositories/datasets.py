"""Uploaded datasets (.npz files and extracted ImageFolder trees)."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from store.models import Dataset
from store.repositories.paging import newest_first


def add(session: Session, record: Dataset) -> Dataset:
    session.add(record)
    session.flush()
    return record


def get_for_tenant(session: Session, tenant_id: str, dataset_id: str) -> Dataset | None:
    stmt = select(Dataset).where(Dataset.id == dataset_id, Dataset.tenant_id == tenant_id)
    return session.scalars(stmt).one_or_none()


def list_for_tenant(
    session: Session, tenant_id: str, limit: int = 20, offset: int = 0
) -> tuple[list[Dataset], int]:
    return newest_first(session, Dataset, Dataset.tenant_id == tenant_id, limit=limit, offset=offset)
