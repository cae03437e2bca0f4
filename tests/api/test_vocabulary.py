"""The OpenAPI schema shows a job's status and stage as the enums the code uses."""

from __future__ import annotations

from pathlib import Path

from api.app import create_app
from core.progress import Stage
from store.settings import Settings
from store.status import JobStatus


def test_openapi_lists_the_job_statuses_and_stages(tmp_path: Path) -> None:
    settings = Settings(database_url=f"sqlite:///{tmp_path / 'x.db'}", artifact_dir=str(tmp_path / "a"))
    schema = create_app(settings).openapi()
    components = schema["components"]["schemas"]

    assert components["JobStatus"]["enum"] == [s.value for s in JobStatus]
    assert components["Stage"]["enum"] == [s.value for s in Stage]
    job = components["JobRead"]["properties"]
    assert job["status"] == {"$ref": "#/components/schemas/JobStatus"}
    assert {"$ref": "#/components/schemas/Stage"} in job["stage"]["anyOf"]
    assert components["JobEventRead"]["properties"]["stage"] == {"$ref": "#/components/schemas/Stage"}
    status_filter = next(p for p in schema["paths"]["/v1/jobs"]["get"]["parameters"] if p["name"] == "status")
    assert {"$ref": "#/components/schemas/JobStatus"} in status_filter["schema"]["anyOf"]
