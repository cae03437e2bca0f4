"""Bearer auth on every /v1 route, and another tenant's objects answering 404 on every {id} route."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session

from core.report import JobReport
from store.models import Artifact, Dataset, Job, ModelRecord, Result
from store.repositories import api_keys
from tests.api.conftest import Caller

pytestmark = pytest.mark.postgres


def _alice_objects(session: Session, alice: Caller, report: JobReport) -> dict[str, str]:
    tid = alice.tenant.id
    model = ModelRecord(
        tenant_id=tid, name="m", arch="fcn", num_classes=10, input_shape=[64], options={},
        filename="w.safetensors", size_bytes=1, sha256="0" * 64, location=f"tenants/{tid}/models/m/w",
    )  # fmt: skip
    dataset = Dataset(
        tenant_id=tid, name="d", kind="npz", num_classes=2, input_shape=[4], n_train=10, n_test=10,
        size_bytes=1, sha256="0" * 64, location=f"tenants/{tid}/datasets/d/data.npz",
    )  # fmt: skip
    job = Job(tenant_id=tid, config={"model": {"arch": "fcn"}}, max_attempts=3, status="succeeded")
    session.add_all([model, dataset, job])
    session.flush()
    session.add(Result(job_id=job.id, report=report.model_dump(mode="json")))
    session.add(Artifact(job_id=job.id, name="model.onnx", size_bytes=1, sha256="0" * 64, location="x/y"))
    session.flush()
    return {"model": model.id, "dataset": dataset.id, "job": job.id}


ID_ROUTES = [
    ("GET", "/v1/models/{model}"),
    ("GET", "/v1/datasets/{dataset}"),
    ("GET", "/v1/jobs/{job}"),
    ("POST", "/v1/jobs/{job}/cancel"),
    ("GET", "/v1/jobs/{job}/events"),
    ("GET", "/v1/jobs/{job}/report"),
    ("GET", "/v1/jobs/{job}/artifacts"),
    ("GET", "/v1/jobs/{job}/artifacts/model.onnx"),
]


@pytest.mark.parametrize(("method", "route"), ID_ROUTES)
def test_another_tenants_object_is_404(
    client: TestClient,
    session: Session,
    alice: Caller,
    bob: Caller,
    method: str,
    route: str,
    real_report: JobReport,
) -> None:
    url = route.format(**_alice_objects(session, alice, real_report))

    resp = client.request(method, url, headers=bob.headers)

    assert resp.status_code == 404
    assert "not found" in resp.json()["detail"]


@pytest.mark.parametrize(("method", "route"), ID_ROUTES)
def test_the_owner_reaches_every_id_route(
    client: TestClient, session: Session, alice: Caller, method: str, route: str, real_report: JobReport
) -> None:
    url = route.format(**_alice_objects(session, alice, real_report))

    resp = client.request(method, url, headers=alice.headers)

    # the artifact's file is absent from the store and the job is finished: both answer with a reason
    assert resp.status_code in (200, 404, 409)
    if resp.status_code != 200:
        assert "not found" not in resp.json()["detail"]


LIST_ROUTES = [
    ("GET", "/v1/models"),
    ("GET", "/v1/datasets"),
    ("GET", "/v1/jobs"),
    ("POST", "/v1/jobs"),
    ("POST", "/v1/models"),
    ("POST", "/v1/datasets"),
    *ID_ROUTES,
]


@pytest.mark.parametrize(("method", "route"), LIST_ROUTES)
@pytest.mark.parametrize("authorization", [None, "Bearer lrt_wrong", "Basic abc"])
def test_missing_or_wrong_key_is_401(
    client: TestClient,
    session: Session,
    alice: Caller,
    method: str,
    route: str,
    authorization: str | None,
    real_report: JobReport,
) -> None:
    url = route.format(**_alice_objects(session, alice, real_report))
    headers = {"Authorization": authorization} if authorization else {}

    resp = client.request(method, url, headers=headers)

    assert resp.status_code == 401
    assert "API key" in resp.json()["detail"]
    assert resp.headers["WWW-Authenticate"] == "Bearer"


def test_a_revoked_key_is_401(client: TestClient, session: Session, alice: Caller) -> None:
    assert api_keys.revoke(session, alice.tenant.id, alice.key[:8]) == 1

    resp = client.get("/v1/jobs", headers=alice.headers)

    assert resp.status_code == 401 and "revoked" in resp.json()["detail"]


def test_only_the_key_hash_is_stored(session: Session, alice: Caller) -> None:
    (record,) = api_keys.list_for_tenant(session, alice.tenant.id)

    assert alice.key.startswith("lrt_") and record.prefix == alice.key[:8]
    assert record.key_hash == api_keys.hash_key(alice.key) and alice.key not in record.key_hash


@pytest.mark.parametrize(
    ("method", "route"),
    [
        *ID_ROUTES,
        ("DELETE", "/v1/jobs/{job}"),
        ("DELETE", "/v1/models/{model}"),
        ("DELETE", "/v1/datasets/{dataset}"),
    ],
)
def test_a_404_names_a_long_id_without_echoing_all_of_it(
    client: TestClient, alice: Caller, method: str, route: str
) -> None:
    long_id = "z" * 3000
    url = route.format(model=long_id, dataset=long_id, job=long_id)

    resp = client.request(method, url, headers=alice.headers)

    assert resp.status_code == 404
    detail = resp.json()["detail"]
    assert "not found" in detail and "(3000 characters)" in detail and len(detail) < 120
