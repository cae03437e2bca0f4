"""Newest-first pages of a tenant's rows, with the total count: one shape for every listing."""

from __future__ import annotations

from typing import Any, TypeVar

from sqlalchemy import func, select
from sqlalchemy.orm import Session

Row = TypeVar("Row")


def newest_first(
    session: Session, model: type[Row], *conditions: Any, limit: int, offset: int
) -> tuple[list[Row], int]:
    """Rows of ``model`` matching ``conditions``, newest first (ties by id), and how many match."""
    count = session.scalar(select(func.count()).select_from(model).where(*conditions)) or 0
    stmt = (
        select(model)
        .where(*conditions)
        .order_by(model.created_at.desc(), model.id)  # type: ignore[attr-defined]
        .limit(limit)
        .offset(offset)
    )
    return list(session.scalars(stmt)), count
