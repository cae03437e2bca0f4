"""With real commits (a migrated SQLite file, no session override): the job row is committed
before the dispatcher hears of it, seen from a separate session, as a worker would see it."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from api.dispatch import get_dispatcher
from store.admin import create_api_key, upgrade_db
from store.db import dispose_engines, session_scope
from store.models import Job
from store.settings import Settings


class FreshSessionDispatcher:
    def __init__(self, url: str) -> None:
        self.url = url
        self.seen: list[tuple[str, str | None]] = []

    def send(self, job_id: str, config: Mapping[str, Any] | None = None) -> None:
        with session_scope(self.url) as session:
            job = session.get(Job, job_id)
            self.seen.append((job_id, job.status if job else None))


@pytest.fixture
def sqlite_url(tmp_path: Path) -> Iterator[str]:
    url = f"sqlite:///{tmp_path / 'db' / 'lorita.db'}"
    upgrade_db(url)
    yield url
    dispose_engines()


def test_job_row_is_committed_before_send(sqlite_url: str, tmp_path: Path) -> None:
    key = create_api_key("acme", url=sqlite_url)
    app = create_app(Settings(database_url=sqlite_url, artifact_dir=str(tmp_path / "artifacts")))
    dispatcher = FreshSessionDispatcher(sqlite_url)
    app.dependency_overrides[get_dispatcher] = lambda: dispatcher
    config = {"model": {"arch": "fcn"}, "dataset": {"name": "digits"}}

    with TestClient(app) as client:
        resp = client.post("/v1/jobs", json=config, headers={"Authorization": f"Bearer {key}"})

    assert resp.status_code == 202, resp.text
    assert dispatcher.seen == [(resp.json()["id"], "queued")]


def test_create_api_key_reuses_the_tenant(sqlite_url: str) -> None:
    first = create_api_key("acme", url=sqlite_url)
    second = create_api_key("acme", url=sqlite_url)

    from store.repositories import api_keys

    with session_scope(sqlite_url) as session:
        a = api_keys.tenant_for_key(session, first)
        b = api_keys.tenant_for_key(session, second)
        assert a is not None and b is not None and a.id == b.id and first != second
