"""The report's contract over HTTP: ``GET /v1/schemas/report`` and ``GET /v1/jobs/{id}/report``."""

from __future__ import annotations

import json
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session

from core.report import JobReport
from store.models import Job, Result
from tests.api.conftest import Caller

pytestmark = pytest.mark.postgres


def test_the_report_schema_is_served_without_a_key(client: TestClient, real_report: JobReport) -> None:
    resp = client.get("/v1/schemas/report")

    assert resp.status_code == 200
    schema = resp.json()
    assert schema == json.loads(json.dumps(JobReport.model_json_schema()))
    # a report written by a real job is an instance of the schema served
    jsonschema = pytest.importorskip("jsonschema")
    jsonschema.validate(json.loads(real_report.model_dump_json()), schema)


def test_openapi_types_the_report_route_as_the_report_model(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()

    ok = spec["paths"]["/v1/jobs/{job_id}/report"]["get"]["responses"]["200"]
    assert ok["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/JobReport"}
    assert "schema_version" in spec["components"]["schemas"]["JobReport"]["properties"]
    assert "/v1/schemas/report" in spec["paths"]


def _succeeded_job(session: Session, caller: Caller, report: dict[str, Any]) -> str:
    job = Job(tenant_id=caller.tenant.id, config=report["config"], max_attempts=3, status="succeeded")
    session.add(job)
    session.flush()
    session.add(Result(job_id=job.id, report=report))
    session.flush()
    return job.id


def test_a_report_the_server_cannot_read_is_409_with_a_way_out(
    client: TestClient, session: Session, alice: Caller, real_report: JobReport
) -> None:
    stale = json.loads(real_report.model_dump_json())
    del stale["schema_version"], stale["pareto"]
    stale["ranks_by_layer"] = stale.pop("ranks")  # what an older format could look like
    job_id = _succeeded_job(session, alice, stale)

    resp = client.get(f"/v1/jobs/{job_id}/report", headers=alice.headers)

    assert resp.status_code == 409
    detail = resp.json()["detail"]
    assert "rerun the job" in detail and "artifacts" in detail
    assert "Traceback" not in detail and "validation error" not in detail
