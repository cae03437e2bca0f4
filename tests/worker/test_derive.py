"""Derived jobs (``parent_id``): the worker runs ``select`` from the parent's stored dense model,
and the figures agree with ``core.pipeline.select`` run locally on the parent's files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from store.db import session_scope
from store.models import Artifact, Job, Result
from store.settings import get_settings
from tests.worker.conftest import job_row, parent_config, submit
from worker.tasks import execute_job

pytestmark = pytest.mark.slow

PARENT = parent_config()
POLICY = {"policy": "params_budget", "budget": 0.4, "max_evals": 8}


def artifacts_of(job_id: str) -> dict[str, Artifact]:
    with session_scope() as session:
        rows = session.scalars(select(Artifact).where(Artifact.job_id == job_id)).all()
        for r in rows:
            session.expunge(r)
        return {r.name: r for r in rows}


def report_of(job_id: str) -> dict[str, Any]:
    with session_scope() as session:
        result = session.get(Result, job_id)
        assert result is not None
        return dict(result.report)


def test_a_finished_job_keeps_its_dense_model_and_a_derived_job_agrees_with_local_select(
    service_db: str, tmp_path: Path
) -> None:
    from core.pipeline import select as select_point

    parent_id = submit(PARENT)
    assert execute_job(parent_id, "w1") == "succeeded"
    stored = artifacts_of(parent_id)
    assert {"dense/model.safetensors", "dense/model.json"} <= set(stored)
    root = Path(get_settings().artifact_dir)
    parent_dir = (root / stored["report.json"].location).parent

    tenant_id = job_row(parent_id).tenant_id
    derived_config = PARENT | {"compress": POLICY, "finetune": {"epochs": 0}}
    derived_id = submit(derived_config, tenant_id=tenant_id, parent_id=parent_id)
    assert execute_job(derived_id, "w1") == "succeeded"
    derived = report_of(derived_id)

    local = select_point(parent_dir, POLICY, tmp_path / "local")
    local_report = local.model_dump(mode="json") if hasattr(local, "model_dump") else dict(local)

    for key in ("params", "flops", "accuracy", "ranks"):
        assert derived[key] == local_report[key], key
    assert derived["params"]["after"] <= 0.4 * derived["params"]["before"]
    assert derived["selected_from"] == f"job {parent_id}"
    assert derived["training"] == report_of(parent_id)["training"]  # nothing was trained again
    assert "dense/model.safetensors" in artifacts_of(derived_id)


def test_a_derived_job_whose_parent_lost_its_dense_model_fails_with_a_message(service_db: str) -> None:
    parent_id = submit(PARENT)
    assert execute_job(parent_id, "w1") == "succeeded"
    with session_scope() as session:
        for a in session.scalars(select(Artifact).where(Artifact.job_id == parent_id)).all():
            if a.name.startswith("dense/"):
                session.delete(a)
        tenant_id = session.get(Job, parent_id).tenant_id  # type: ignore[union-attr]
    derived_id = submit(PARENT | {"compress": POLICY}, tenant_id=tenant_id, parent_id=parent_id)

    assert execute_job(derived_id, "w1") == "failed"
    with session_scope() as session:
        job = session.get(Job, derived_id)
        assert job is not None and job.error is not None
        assert "dense model" in job.error and parent_id in job.error
