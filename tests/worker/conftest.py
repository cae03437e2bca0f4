"""Real databases for the worker tests: a SQLite file and a fresh PostgreSQL database.

Both are built by the Alembic migrations (``store.admin.upgrade_db``), never by ``create_all``.
``service_db`` (or ``env``) is instead the database the worker's own settings point at, for tests
that run whole jobs through ``execute_job``; ``submit`` and ``job_row`` add and read jobs there.
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
from store.settings import get_settings

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
def service_db(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A migrated SQLite file that the worker's settings point at, with their artifact and work
    folders under ``tmp_path``; the settings are read afresh before and after."""
    url = f"sqlite:///{tmp_path / 'lorita.db'}"
    monkeypatch.setenv("LORITA_DATABASE_URL", url)
    monkeypatch.setenv("LORITA_ARTIFACT_DIR", str(tmp_path / "artifacts"))
    monkeypatch.setenv("LORITA_WORK_DIR", str(tmp_path / "work"))
    get_settings.cache_clear()
    upgrade_db(url)
    yield url
    dispose_engines()
    get_settings.cache_clear()


@pytest.fixture
def env(service_db: str, monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """``service_db``, for tests that set more of the worker's environment through the monkeypatch."""
    return monkeypatch


def tiny_config(epochs: int = 2, width: int = 32, **overrides: Any) -> dict[str, Any]:
    """A job config that trains a small FCN on digits on the CPU; ``overrides`` replace whole sections."""
    config: dict[str, Any] = {
        "model": {"arch": "fcn", "options": {"depth": 2, "width": width}},
        "dataset": {"name": "digits"},
        "train": {"factors": 2, "epochs": epochs, "batch_size": 64},
        "compress": {"policy": "global", "keep": 0.5},
        "measure": {"latency": False},
        "export": ["safetensors"],
        "device": "cpu",
    }
    return config | overrides


def parent_config() -> dict[str, Any]:
    """``tiny_config`` searching an accuracy budget, not fine-tuned: a job whose stored dense model
    and Pareto curve derived jobs (``select``) start from."""
    return tiny_config(
        compress={"policy": "accuracy_budget", "max_drop": 0.02, "max_evals": 8}, finetune={"epochs": 0}
    )


def submit(config: dict[str, Any], tenant_id: str | None = None, **fields: Any) -> str:
    """A job with this config in the database the worker's settings point at, under ``tenant_id`` or
    else a new tenant "acme"; its other columns as ``make_job``'s (``max_attempts`` 3 unless given)."""
    url = get_settings().database_url
    if tenant_id is None:
        with session_scope(url) as session:
            tenant = Tenant(name="acme")
            session.add(tenant)
            session.flush()
            tenant_id = tenant.id
    return make_job(url, tenant_id, config=config, **fields)


def job_row(job_id: str) -> Job:
    """The job's row, detached, from the database the worker's settings point at."""
    return load_job(get_settings().database_url, job_id)


@pytest.fixture
def artifact_dir(tmp_path: Path) -> Path:
    return tmp_path / "artifacts"
