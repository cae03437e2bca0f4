"""Tenants: the owners of keys, uploads and jobs."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from store.models import Tenant


def get_by_name(session: Session, name: str) -> Tenant | None:
    return session.scalars(select(Tenant).where(Tenant.name == name)).one_or_none()


def create(session: Session, name: str) -> Tenant:
    tenant = Tenant(name=name)
    session.add(tenant)
    session.flush()
    return tenant


def get_or_create(session: Session, name: str) -> Tenant:
    name = name.strip()
    if not name:
        raise ValueError("a tenant name must not be empty")
    return get_by_name(session, name) or create(session, name)
