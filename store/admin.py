"""Administrative operations called by ``lorita db upgrade`` and ``lorita keys create``."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config

from store.db import ensure_sqlite_dir, session_scope
from store.repositories import api_keys, tenants
from store.settings import get_settings

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"


def alembic_config(url: str | None = None) -> Config:
    """An Alembic config for the packaged migrations, bound to ``url`` (default: the settings)."""
    cfg = Config(str(MIGRATIONS_DIR / "alembic.ini"))
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.attributes["database_url"] = url or get_settings().database_url
    return cfg


def upgrade_db(url: str | None = None, revision: str = "head") -> None:
    """Bring the database at ``url`` (default: settings.database_url) to ``revision``.

    Works on SQLite (creating the file's directory) and PostgreSQL; it is the only way the
    schema is created, in tests too.
    """
    url = url or get_settings().database_url
    ensure_sqlite_dir(url)
    command.upgrade(alembic_config(url), revision)


def create_api_key(tenant_name: str, url: str | None = None) -> str:
    """Create an API key for ``tenant_name`` (creating the tenant if needed); returns the key.

    The plaintext key is returned once and never stored; only its sha256 is kept.
    """
    with session_scope(url) as session:
        tenant = tenants.get_or_create(session, tenant_name)
        key, _record = api_keys.create(session, tenant)
    return key
