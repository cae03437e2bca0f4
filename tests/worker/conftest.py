"""Real databases for the worker tests: a SQLite file and a fresh PostgreSQL database.

Both are built by the Alembic migrations (``store.admin.upgrade_db``), never by ``create_all``.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from store.admin import upgrade_db
from store.db import dispose_engines, session_scope
from store.models import Job, Tenant

PG_ADMIN_URL = os.environ.get("LORITA_TEST_PG_ADMIN", "postgresql://postgres@127.0.0.1:5432/postgres")


def create_pg_database(name: str) -> str:
    import psycopg

    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')
    return f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"


def drop_pg_database(name: str) -> None:
    import psycopg

    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="module", params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path_factory.mktemp('db') / 'lorita.db'}"
        upgrade_db(url)
        yield url
        dispose_engines()
        return
    name = f"lorita_worker_{uuid.uuid4().hex[:8]}"
    url = create_pg_database(name)
    upgrade_db(url)
    yield url
    dispose_engines()
    drop_pg_database(name)


@pytest.fixture
def tenant_id(db_url: str) -> str:
    with session_scope(db_url) as session:
        tenant = Tenant(name=f"t-{uuid.uuid4().hex[:8]}")
        session.add(tenant)
        session.flush()
        return tenant.id


def make_job(db_url: str, tenant_id: str, **fields: Any) -> str:
    values: dict[str, Any] = {"config": {"model": {"arch": "fcn"}}, "max_attempts": 3} | fields
    with session_scope(db_url) as session:
        job = Job(tenant_id=tenant_id, **values)
        session.add(job)
        session.flush()
        return job.id


def load_job(db_url: str, job_id: str) -> Job:
    with session_scope(db_url) as session:
        job = session.get(Job, job_id)
        assert job is not None
        session.expunge(job)
        return job


@pytest.fixture
def artifact_dir(tmp_path: Path) -> Path:
    return tmp_path / "artifacts"
