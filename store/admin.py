"""Administrative operations behind ``lorita db upgrade`` and ``lorita keys create|list|revoke``.

The key commands open the database the settings name (``LORITA_DATABASE_URL``; by default the
embedded SQLite file ``./var/lorita.db``, relative to the directory the command runs in). They
check first that it exists and is migrated, so that a command run from the wrong directory says
which file it looked for instead of failing inside SQLAlchemy.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import inspect
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError

from store.db import ensure_sqlite_dir, make_engine, session_scope
from store.models import ApiKey
from store.repositories import api_keys, tenants
from store.settings import get_settings

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"


class AdminError(Exception):
    """A failure the person at the terminal can fix; the message says how."""


@dataclass(frozen=True)
class KeyInfo:
    """An API key as ``lorita keys list`` shows it (never the key itself)."""

    prefix: str
    tenant: str
    created_at: datetime
    revoked_at: datetime | None


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


def sqlite_file(url: str) -> Path | None:
    """The absolute path of a SQLite database file, or None for other databases (and :memory:)."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return None
    return Path(parsed.database).expanduser().resolve()


def check_database(url: str | None = None) -> str:
    """Raise :class:`AdminError` unless the database at ``url`` exists and is migrated; returns ``url``."""
    url = url or get_settings().database_url
    shown = make_url(url).render_as_string(hide_password=True)
    path = sqlite_file(url)
    if path is not None and not path.is_file():
        raise AdminError(
            f"no lorita database at {path} (LORITA_DATABASE_URL={shown}, relative to the directory "
            f"the command runs in, {Path.cwd()}); run the command where `lorita serve` runs, or point "
            "LORITA_DATABASE_URL at the database (e.g. sqlite:////abs/path/var/lorita.db); "
            "`lorita db upgrade` creates a new one"
        )
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            tables = set(inspect(conn).get_table_names())
    except SQLAlchemyError as err:
        reason = str(getattr(err, "orig", None) or err).strip().splitlines()[0]
        raise AdminError(f"cannot open the database {shown}: {reason}") from None
    finally:
        engine.dispose()
    if not {"tenants", "api_keys"} <= tables:
        raise AdminError(f"the database {shown} has no lorita tables; run `lorita db upgrade` first")
    return url


def create_api_key(tenant_name: str, url: str | None = None) -> str:
    """Create an API key for ``tenant_name`` (creating the tenant if needed); returns the key.

    The plaintext key is returned once and never stored; only its sha256 is kept.
    """
    url = check_database(url)
    with session_scope(url) as session:
        try:
            tenant = tenants.get_or_create(session, tenant_name)
        except ValueError as err:
            raise AdminError(str(err)) from None
        key, _record = api_keys.create(session, tenant)
    return key


def _info(key: ApiKey) -> KeyInfo:
    return KeyInfo(key.prefix, key.tenant.name, key.created_at, key.revoked_at)


def list_api_keys(tenant_name: str, url: str | None = None) -> list[KeyInfo]:
    """Every key of ``tenant_name``, revoked ones included, oldest first."""
    url = check_database(url)
    with session_scope(url) as session:
        tenant = tenants.get_by_name(session, tenant_name.strip())
        if tenant is None:
            raise AdminError(
                f"no tenant named {tenant_name!r}; create one with `lorita keys create --tenant NAME`"
            )
        return [_info(k) for k in api_keys.list_for_tenant(session, tenant.id)]


def revoke_api_keys(prefix: str, tenant_name: str | None = None, url: str | None = None) -> list[KeyInfo]:
    """Revoke the one key ``prefix`` names (its shown prefix, the start of it, or the whole key).

    Several matching keys are refused (name the tenant, or give more of the key), so that a short
    prefix never revokes more than was meant; a revoked key stops working within the API's
    ``LORITA_AUTH_CACHE_SECONDS``.
    """
    prefix = prefix.strip()
    if len(prefix) < len(api_keys.KEY_PREFIX) + 1:
        raise AdminError(
            f"give at least {len(api_keys.KEY_PREFIX) + 1} characters of the key "
            f"(e.g. the prefix `lorita keys list` shows, like {api_keys.KEY_PREFIX}AbCd)"
        )
    url = check_database(url)
    with session_scope(url) as session:
        tenant_id = None
        if tenant_name is not None:
            tenant = tenants.get_by_name(session, tenant_name.strip())
            if tenant is None:
                raise AdminError(f"no tenant named {tenant_name!r}")
            tenant_id = tenant.id
        keys = api_keys.matching(session, prefix, tenant_id)
        if not keys:
            where = f" of tenant {tenant_name!r}" if tenant_name else ""
            raise AdminError(
                f"no active key{where} starts with {prefix!r}; see `lorita keys list --tenant NAME`"
            )
        if len(keys) > 1:
            owners = ", ".join(sorted({k.tenant.name for k in keys}))
            raise AdminError(
                f"{len(keys)} active keys start with {prefix!r} (tenants: {owners}); give more of the key "
                "or --tenant NAME"
            )
        api_keys.revoke_keys(session, keys)
        return [_info(k) for k in keys]
