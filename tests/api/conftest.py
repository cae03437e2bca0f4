"""API test fixtures: a real PostgreSQL database built by the migrations, one transaction per test.

- ``pg_url``: a fresh database ``lorita_api_<random>`` on 127.0.0.1:5432 (override the server with
  ``LORITA_TEST_PG_ADMIN``), migrated once per session with ``store.admin.upgrade_db``, dropped at the end.
- ``session``: joins an outer transaction that is rolled back after the test; the routes' own
  ``commit()`` calls only release savepoints (``join_transaction_mode="create_savepoint"``).
- ``client``: the app with the session, dispatcher and broker ping overridden.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import Connection, Engine
from sqlalchemy.orm import Session

from api.app import create_app
from api.deps import get_session
from api.dispatch import get_broker_ping, get_dispatcher
from store.admin import upgrade_db
from store.db import make_engine
from store.models import Job, Tenant
from store.repositories import api_keys, tenants
from store.settings import Settings

PG_ADMIN_URL = os.environ.get("LORITA_TEST_PG_ADMIN", "postgresql://postgres@127.0.0.1:5432/postgres")


def _pg_admin(sql: str) -> None:
    import psycopg

    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(sql)


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    name = f"lorita_api_{uuid.uuid4().hex[:8]}"
    _pg_admin(f'CREATE DATABASE "{name}"')
    base = PG_ADMIN_URL.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://", 1)
    url = f"{base}/{name}"
    try:
        upgrade_db(url)
        yield url
    finally:
        _pg_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def engine(pg_url: str) -> Iterator[Engine]:
    engine = make_engine(pg_url)
    yield engine
    engine.dispose()


@pytest.fixture
def connection(engine: Engine) -> Iterator[Connection]:
    with engine.connect() as conn:
        outer = conn.begin()
        try:
            yield conn
        finally:
            outer.rollback()


@pytest.fixture
def session(connection: Connection) -> Iterator[Session]:
    session = Session(bind=connection, join_transaction_mode="create_savepoint", expire_on_commit=False)
    try:
        yield session
    finally:
        session.close()


@dataclass
class RecordingDispatcher:
    """Records each send, and whether the job's row was already written and queued at that moment."""

    session: Session
    sent: list[str] = field(default_factory=list)
    row_status_at_send: list[str | None] = field(default_factory=list)
    fail: bool = False

    def send(self, job_id: str, config: Mapping[str, Any] | None = None) -> None:
        job = self.session.get(Job, job_id, populate_existing=True)
        self.row_status_at_send.append(job.status if job is not None else None)
        self.sent.append(job_id)
        if self.fail:
            raise ConnectionError("broker down (test)")


@pytest.fixture
def dispatcher(session: Session) -> RecordingDispatcher:
    return RecordingDispatcher(session)


@pytest.fixture
def settings(pg_url: str, tmp_path: Path) -> Settings:
    return Settings(
        database_url=pg_url, artifact_dir=str(tmp_path / "artifacts"), max_upload_bytes=8 * 1024 * 1024
    )


@dataclass
class BrokerState:
    error: Exception | None = None

    def ping(self) -> None:
        if self.error is not None:
            raise self.error


@pytest.fixture
def broker() -> BrokerState:
    return BrokerState()


@pytest.fixture
def make_client(
    session: Session, dispatcher: RecordingDispatcher, broker: BrokerState
) -> Iterator[Callable[[Settings], TestClient]]:
    clients: list[TestClient] = []

    def build(settings: Settings) -> TestClient:
        app: FastAPI = create_app(settings)
        app.dependency_overrides[get_session] = lambda: session
        app.dependency_overrides[get_dispatcher] = lambda: dispatcher
        app.dependency_overrides[get_broker_ping] = lambda: broker.ping
        client = TestClient(app)
        clients.append(client)
        return client

    yield build
    for c in clients:
        c.close()


@pytest.fixture
def client(make_client: Callable[[Settings], TestClient], settings: Settings) -> TestClient:
    return make_client(settings)


@dataclass
class Caller:
    tenant: Tenant
    key: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}


def _caller(session: Session, name: str) -> Caller:
    tenant = tenants.create(session, f"{name}-{uuid.uuid4().hex[:6]}")
    key, _ = api_keys.create(session, tenant)
    return Caller(tenant, key)


@pytest.fixture
def alice(session: Session) -> Caller:
    return _caller(session, "alice")


@pytest.fixture
def bob(session: Session) -> Caller:
    return _caller(session, "bob")
