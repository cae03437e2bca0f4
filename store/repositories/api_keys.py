"""API keys: ``lrt_`` + 43 url-safe characters; only the sha256 of the key is stored."""

from __future__ import annotations

import hashlib
import secrets
from datetime import UTC, datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from store.models import ApiKey, Tenant

KEY_PREFIX = "lrt_"
SHOWN_PREFIX_CHARS = 8


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def generate_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def create(session: Session, tenant: Tenant) -> tuple[str, ApiKey]:
    """A new key for ``tenant``: returns (plaintext key, record). The plaintext is not kept."""
    key = generate_key()
    record = ApiKey(tenant_id=tenant.id, prefix=key[:SHOWN_PREFIX_CHARS], key_hash=hash_key(key))
    session.add(record)
    session.flush()
    return key, record


def tenant_for_key(session: Session, key: str) -> Tenant | None:
    """The tenant owning an unrevoked ``key``, or None."""
    stmt = (
        select(Tenant)
        .join(ApiKey, ApiKey.tenant_id == Tenant.id)
        .where(ApiKey.key_hash == hash_key(key), ApiKey.revoked_at.is_(None))
    )
    return session.scalars(stmt).one_or_none()


def list_for_tenant(session: Session, tenant_id: str) -> list[ApiKey]:
    stmt = select(ApiKey).where(ApiKey.tenant_id == tenant_id).order_by(ApiKey.created_at)
    return list(session.scalars(stmt))


def matching(session: Session, prefix_or_key: str, tenant_id: str | None = None) -> list[ApiKey]:
    """Unrevoked keys that ``prefix_or_key`` names: the start of their shown prefix (as
    ``lorita keys list`` prints it), or the whole key. Only ``tenant_id``'s keys when given."""
    if len(prefix_or_key) > SHOWN_PREFIX_CHARS:
        condition = ApiKey.key_hash == hash_key(prefix_or_key)
    else:
        condition = ApiKey.prefix.startswith(prefix_or_key, autoescape=True)
    stmt = select(ApiKey).where(condition, ApiKey.revoked_at.is_(None))
    if tenant_id is not None:
        stmt = stmt.where(ApiKey.tenant_id == tenant_id)
    return list(session.scalars(stmt.order_by(ApiKey.created_at)))


def revoke_keys(session: Session, keys: list[ApiKey]) -> None:
    now = datetime.now(UTC)
    for k in keys:
        k.revoked_at = now
    session.flush()


def revoke(session: Session, tenant_id: str, prefix: str) -> int:
    """Revoke the tenant's keys that ``prefix`` names; returns how many were revoked."""
    keys = matching(session, prefix, tenant_id)
    revoke_keys(session, keys)
    return len(keys)
