"""HTTP conformance: 503 + Retry-After while the database is down, HEAD/OPTIONS/405 on every route,
error responses declared in the schema as they are sent, and schemathesis over every operation."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Iterator

import pytest
from fastapi import FastAPI
from fastapi.routing import iter_route_contexts
from fastapi.testclient import TestClient

from api.app import create_app
from api.deps import get_session
from api.dispatch import get_broker_ping, get_dispatcher
from store.db import dispose_engines
from store.settings import Settings
from tests.api.conftest import BrokerState, Caller, RecordingDispatcher

DIGITS_JOB = {
    "model": {"arch": "fcn", "options": {"depth": 2, "width": 16}},
    "dataset": {"name": "digits"},
    "train": {"epochs": 1},
}

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
        if not route.path.startswith("/v1/") or not _needs_session(getattr(route, "dependant", None)):
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


# ---------------------------------------------------------------- methods


def _concrete(path: str) -> str:
    return re.sub(r"\{[^}]+\}", "x", path).replace("{", "").replace("}", "")


@pytest.mark.timeout(60)
def test_head_answers_like_get_without_a_body_on_every_get_route(client: TestClient, alice: Caller) -> None:
    job = client.post("/v1/jobs", headers=alice.headers, json=DIGITS_JOB).json()
    checked = 0
    for route in iter_route_contexts(client.app.routes):  # type: ignore[attr-defined]
        methods = getattr(route, "methods", None) or set()
        if "GET" not in methods or "{name" in route.path:
            continue
        if route.path in ("/v1/jobs/{job_id}", "/v1/jobs/{job_id}/stream"):
            continue  # the first closes the test's session (checked below); the second never ends
        path = re.sub(r"\{[^}]+\}", job["id"], route.path)
        got = client.get(path, headers=alice.headers)
        head = client.head(path, headers=alice.headers)
        assert head.status_code == got.status_code, (route.path, head.status_code, got.status_code)
        assert head.content == b""
        assert head.headers.get("content-type") == got.headers.get("content-type")
        checked += 1
    assert checked >= 10
    head = client.head(f"/v1/jobs/{job['id']}", headers=alice.headers)
    assert head.status_code == 200 and head.content == b""
    assert int(head.headers["content-length"]) > 0  # the length GET would send


@pytest.mark.timeout(30)
def test_head_of_a_stream_that_never_ends_answers_with_its_headers() -> None:
    from fastapi import FastAPI
    from fastapi.responses import StreamingResponse

    from api.conformance import install

    app = FastAPI()

    async def forever() -> AsyncIterator[bytes]:
        while True:
            yield b"data: tick\n\n"
            await asyncio.sleep(0.01)

    @app.get("/events")
    async def events() -> StreamingResponse:
        return StreamingResponse(forever(), media_type="text/event-stream")

    install(app)
    client = TestClient(app)

    head = client.head("/events")

    assert head.status_code == 200 and head.content == b""
    assert head.headers["content-type"].startswith("text/event-stream")


@pytest.mark.parametrize(
    ("path", "allowed"),
    [
        ("/v1/jobs", "GET, HEAD, OPTIONS, POST"),
        ("/v1/models", "GET, HEAD, OPTIONS, POST"),
        ("/v1/datasets", "GET, HEAD, OPTIONS, POST"),
        ("/v1/jobs/abc/cancel", "OPTIONS, POST"),
        ("/healthz", "GET, HEAD, OPTIONS"),
        ("/v1/jobs/abc/artifacts/sub/model.onnx", "GET, HEAD, OPTIONS"),
    ],
)
def test_options_lists_every_method_of_the_path(client: TestClient, path: str, allowed: str) -> None:
    resp = client.options(path)

    assert resp.status_code == 204
    assert resp.headers["Allow"] == allowed


def test_a_method_the_path_lacks_is_405_listing_all_its_methods(client: TestClient, alice: Caller) -> None:
    resp = client.put("/v1/jobs", headers=alice.headers, json={})

    assert resp.status_code == 405
    assert resp.headers["Allow"] == "GET, HEAD, OPTIONS, POST"
    assert "PUT" in resp.json()["detail"]


def test_an_unknown_path_stays_404(client: TestClient) -> None:
    assert client.options("/v1/nothing-here").status_code == 404
    assert client.head("/v1/nothing-here").status_code == 404


# ---------------------------------------------------------------- the schema


def test_422_bodies_match_the_schema(client: TestClient, alice: Caller) -> None:
    schema = client.get("/openapi.json").json()
    declared = schema["paths"]["/v1/jobs"]["post"]["responses"]["422"]["content"]["application/json"][
        "schema"
    ]
    assert declared == {"$ref": "#/components/schemas/ErrorBody"}
    assert schema["components"]["schemas"]["ErrorBody"]["required"] == ["detail"]

    body = client.post("/v1/jobs", headers=alice.headers, json={"model": {}}).json()

    assert set(body) == {"detail"} and isinstance(body["detail"], str)


def test_every_secured_operation_declares_401_and_503_and_path_objects_404(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    for path, item in schema["paths"].items():
        for method, op in item.items():
            codes = set(op["responses"])
            if op.get("security"):
                assert {"401", "503"} <= codes, (method, path)
                assert "Retry-After" in op["responses"]["503"]["headers"]
            if "{" in path:
                assert "404" in codes, (method, path)
            if "requestBody" in op:
                assert "413" in codes, (method, path)
    uploads = schema["paths"]["/v1/datasets"]["post"]["responses"]
    assert {"409", "413", "422", "429", "503"} <= set(uploads)


def test_a_body_that_is_not_utf8_is_422_like_any_bad_input(client: TestClient, alice: Caller) -> None:
    resp = client.post(
        "/v1/jobs",
        headers=alice.headers | {"Content-Type": "application/json"},
        content=b"\xff\x0d\xca\x97\xfe",
    )

    assert resp.status_code == 422
    assert "UTF-8 JSON" in resp.json()["detail"]
