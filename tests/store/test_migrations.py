"""The Alembic migrations build the same schema on SQLite and PostgreSQL, and match the models."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect

from store.admin import alembic_config, upgrade_db
from store.db import dispose_engines, make_engine, session_scope
from store.models import Base, Job, Tenant

TABLES = {"tenants", "api_keys", "models", "datasets", "jobs", "job_events", "results", "artifacts"}
PG_ADMIN_URL = os.environ.get("LORITA_TEST_PG_ADMIN", "postgresql://postgres@127.0.0.1:5432/postgres")


@pytest.fixture
def sqlite_url(tmp_path: Path) -> Iterator[str]:
    yield f"sqlite:///{tmp_path / 'nested' / 'dir' / 'lorita.db'}"
    dispose_engines()


@pytest.fixture
def pg_url() -> Iterator[str]:
    import psycopg

    name = f"lorita_store_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base = PG_ADMIN_URL.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://", 1)
    yield f"{base}/{name}"
    dispose_engines()
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _schema_drift(url: str) -> list[object]:
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            return list(compare_metadata(MigrationContext.configure(conn), Base.metadata))
    finally:
        engine.dispose()


def test_sqlite_upgrade_creates_every_table_and_its_directory(sqlite_url: str) -> None:
    upgrade_db(sqlite_url)

    engine = make_engine(sqlite_url)
    try:
        names = set(inspect(engine).get_table_names())
        indexes = {i["name"] for i in inspect(engine).get_indexes("jobs")}
    finally:
        engine.dispose()
    assert names >= TABLES
    assert {"ix_jobs_status", "ix_jobs_tenant_id_created_at"} <= indexes
    assert _schema_drift(sqlite_url) == []


def test_sqlite_downgrade_and_upgrade_again(sqlite_url: str) -> None:
    upgrade_db(sqlite_url)
    command.downgrade(alembic_config(sqlite_url), "base")
    engine = make_engine(sqlite_url)
    try:
        assert not TABLES & set(inspect(engine).get_table_names())
    finally:
        engine.dispose()
    upgrade_db(sqlite_url)
    assert _schema_drift(sqlite_url) == []


@pytest.mark.postgres
def test_postgres_upgrade_matches_the_models(pg_url: str) -> None:
    upgrade_db(pg_url)
    upgrade_db(pg_url)  # a second run is a no-op

    assert _schema_drift(pg_url) == []


def test_sqlite_keeps_timestamps_utc_and_enforces_foreign_keys(sqlite_url: str) -> None:
    upgrade_db(sqlite_url)
    with session_scope(sqlite_url) as session:
        tenant = Tenant(name="t")
        session.add(tenant)
        session.flush()
        job = Job(tenant_id=tenant.id, config={}, max_attempts=3)
        session.add(job)
        session.flush()
        job_id = job.id
    with session_scope(sqlite_url) as session:
        loaded = session.get(Job, job_id)
        assert loaded is not None and loaded.created_at.tzinfo is not None
        assert loaded.created_at.utcoffset() == datetime.now(UTC).utcoffset()
        assert (loaded.status, loaded.attempt, loaded.cancel_requested) == ("queued", 0, False)
    with pytest.raises(Exception, match="FOREIGN KEY"), session_scope(sqlite_url) as session:
        session.add(Job(tenant_id="missing", config={}, max_attempts=3))
