"""``GET /v1/schemas/report``: the JSON Schema of report.json (:class:`core.report.JobReport`).

Public, like ``/openapi.json``: it documents a format and reveals nothing of any tenant.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from core.report import report_schema

router = APIRouter(prefix="/v1/schemas", tags=["jobs"])


@router.get(
    "/report",
    summary="The JSON Schema of a job's report",
    response_model=dict[str, Any],
    responses={
        200: {"description": "JSON Schema (draft 2020-12) of report.json and GET /v1/jobs/{id}/report."}
    },
)
def get_report_schema() -> dict[str, Any]:
    """No API key needed. ``schema_version`` in a report says which version of this schema it follows."""
    return report_schema()
