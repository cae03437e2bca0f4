"""/healthz and /readyz."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from tests.api.conftest import BrokerState

pytestmark = pytest.mark.postgres


def test_healthz(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}


def test_readyz_ok_when_database_and_broker_answer(client: TestClient) -> None:
    resp = client.get("/readyz")

    assert resp.status_code == 200
    assert resp.json()["checks"] == {"database": "ok", "broker": "ok"}


def test_readyz_503_names_the_broker_when_its_ping_fails(client: TestClient, broker: BrokerState) -> None:
    broker.error = ConnectionError("redis://127.0.0.1:1 refused")

    resp = client.get("/readyz")

    assert resp.status_code == 503
    body = resp.json()
    assert body["checks"]["database"] == "ok"
    assert body["checks"]["broker"].startswith("unreachable: ConnectionError")
    assert "broker" in body["detail"]


def test_unknown_route_is_json_404(client: TestClient) -> None:
    resp = client.get("/v1/nope")

    assert resp.status_code == 404 and resp.json() == {"detail": "Not Found"}


def test_openapi_documents_the_routes(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()

    assert "/v1/jobs/{job_id}/artifacts/{name}" in spec["paths"]
    assert spec["paths"]["/v1/jobs"]["post"]["description"]


def test_readiness_never_shows_the_brokers_address(client: TestClient, broker: BrokerState) -> None:
    broker.error = ConnectionError(
        "Error 111 connecting to redis://:s3cret@10.0.0.7:6379/0. Connection refused."
    )

    body = client.get("/readyz").json()

    assert body["checks"]["broker"] == "unreachable: ConnectionError"
    assert "s3cret" not in str(body) and "10.0.0.7" not in str(body)
