"""HTTP conformance: a database outage is a 503 with Retry-After on every route that needs it."""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest
from fastapi import FastAPI
from fastapi.routing import iter_route_contexts
from fastapi.testclient import TestClient

from api.app import create_app
from api.deps import get_session
from api.dispatch import get_broker_ping, get_dispatcher
from store.db import dispose_engines
from store.settings import Settings
from tests.api.conftest import BrokerState, RecordingDispatcher

pytestmark = pytest.mark.postgres

# a real PostgreSQL URL whose server is not there: port 1 on loopback refuses at once
DOWN_URL = "postgresql+psycopg://postgres@127.0.0.1:1/lorita_down"


def _needs_session(dependant: object) -> bool:
    deps = getattr(dependant, "dependencies", [])
    return any(getattr(d, "call", None) is get_session or _needs_session(d) for d in deps)


@pytest.fixture
def down_app(tmp_path: object, dispatcher: RecordingDispatcher) -> Iterator[FastAPI]:
    settings = Settings(database_url=DOWN_URL, artifact_dir=str(tmp_path) + "/artifacts")
    app = create_app(settings)
    app.dependency_overrides[get_dispatcher] = lambda: dispatcher
    app.dependency_overrides[get_broker_ping] = lambda: BrokerState().ping
    yield app
    dispose_engines()


def test_every_route_that_reads_the_database_answers_503_with_retry_after_while_it_is_down(
    down_app: FastAPI,
) -> None:
    client = TestClient(down_app, raise_server_exceptions=False)
    headers = {"Authorization": "Bearer lorita_not-a-real-key"}
    checked = []
    for route in iter_route_contexts(down_app.routes):
        if not _needs_session(getattr(route, "dependant", None)):
            continue
        path = re.sub(r"\{[^}]+\}", "x", route.path)
        for method in sorted(route.methods):
            resp = client.request(method, path, headers=headers)
            checked.append((method, route.path, resp.status_code))
            assert resp.status_code == 503, (method, route.path, resp.text)
            assert int(resp.headers["Retry-After"]) > 0
            assert "database" in resp.json()["detail"] and "Traceback" not in resp.text
    assert len(checked) >= 10, checked
    assert client.get("/healthz").status_code == 200
    ready = client.get("/readyz")
    assert ready.status_code == 503 and "Retry-After" in ready.headers


def test_a_cached_key_still_gets_503_not_500_when_the_database_goes_away(
    down_app: FastAPI, session: object
) -> None:
    from api.deps import KeyCache, TenantRef
    from store.repositories import api_keys

    # the key was checked a moment ago, so auth needs no query: the route's own query meets the outage
    cache = KeyCache(ttl=60)
    cache.put(api_keys.hash_key("lorita_cached"), TenantRef(id="t1", name="t"))
    down_app.state.key_cache = cache
    client = TestClient(down_app, raise_server_exceptions=False)

    resp = client.get("/v1/jobs", headers={"Authorization": "Bearer lorita_cached"})

    assert resp.status_code == 503, resp.text
    assert resp.headers["Retry-After"] == "5"
