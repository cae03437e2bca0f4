"""What a job's user reads when it fails: their input's problem without server paths, or a
sentence with a reference for an unexpected failure (it read ``internal error: <Type>: <text>``)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from store.admin import upgrade_db
from store.db import dispose_engines, session_scope
from store.models import Job, Tenant
from store.settings import get_settings
from worker.tasks import execute_job

CONFIG: dict[str, Any] = {
    "model": {"arch": "fcn", "options": {"depth": 2, "width": 8}},
    "dataset": {"name": "digits"},
    "train": {"epochs": 1, "batch_size": 64},
    "compress": {"policy": "global", "keep": 0.5},
    "measure": {"latency": False},
    "export": ["safetensors"],
    "device": "cpu",
}


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.MonkeyPatch]:
    url = f"sqlite:///{tmp_path / 'lorita.db'}"
    monkeypatch.setenv("LORITA_DATABASE_URL", url)
    monkeypatch.setenv("LORITA_ARTIFACT_DIR", str(tmp_path / "artifacts"))
    monkeypatch.setenv("LORITA_WORK_DIR", str(tmp_path / "work"))
    get_settings.cache_clear()
    upgrade_db(url)
    yield monkeypatch
    dispose_engines()
    get_settings.cache_clear()


def submit(config: dict[str, Any]) -> str:
    with session_scope() as session:
        tenant = Tenant(name="acme")
        session.add(tenant)
        session.flush()
        job = Job(tenant_id=tenant.id, config=config, max_attempts=1)
        session.add(job)
        session.flush()
        return job.id


def error_of(job_id: str) -> str:
    with session_scope() as session:
        job = session.get(Job, job_id)
        assert job is not None
        return job.error or ""


def test_an_unexpected_failure_reads_as_a_sentence_with_a_log_reference(
    env: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import core.pipeline

    def broken(*_args: Any, **_kwargs: Any) -> Any:
        raise KeyError("/srv/lorita/var/work/tenant-7/layers.3.weight_orig")

    env.setattr(core.pipeline, "run_job", broken)
    job_id = submit(CONFIG)

    with caplog.at_level(logging.ERROR, logger="worker.tasks"):
        assert execute_job(job_id) == "failed"

    error = error_of(job_id)
    assert error.startswith("the job failed because of a problem on the server")
    for internal in ("internal error", "KeyError", "/srv", "tenant-7", "weight_orig"):
        assert internal not in error
    reference = error.rsplit(" ", 1)[-1]
    assert any(reference in r.getMessage() and "KeyError" in r.getMessage() for r in caplog.records)


def test_a_data_error_keeps_its_advice_but_not_the_server_path(
    env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import core.pipeline
    from core.config import ConfigError

    def bad_data(*_args: Any, **_kwargs: Any) -> Any:  # as core.data.load_job_data raises it
        raise ConfigError(
            f"cannot read image {tmp_path}/tenants/t-1/datasets/d-2/imagefolder/cat/7.png; replace it"
        )

    env.setattr(core.pipeline, "run_job", bad_data)
    job_id = submit(CONFIG)

    execute_job(job_id)

    error = error_of(job_id)
    assert "7.png; replace it" in error
    assert str(tmp_path) not in error and "t-1" not in error
