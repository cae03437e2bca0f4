"""The job task against a real SQLite database and a real (tiny) pipeline run, no broker."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from sqlalchemy import select, update

from store.artifacts import sha256_file
from store.db import session_scope
from store.models import Artifact, Job, JobEvent, Result
from store.settings import get_settings
from tests.worker.conftest import job_row, submit, tiny_config
from worker.tasks import execute_job

pytestmark = pytest.mark.slow


def test_job_runs_to_success_with_result_and_verified_artifacts(service_db: str) -> None:
    job_id = submit(tiny_config())
    assert execute_job(job_id, "w1") == "succeeded"
    job = job_row(job_id)
    assert (job.status, job.attempt, job.progress, job.error) == ("succeeded", 1, 1.0, None)
    store_root = Path(get_settings().artifact_dir)
    with session_scope() as session:
        result = session.get(Result, job_id)
        assert result is not None
        report = result.report
        assert result.test_accuracy_after == report["accuracy"]["test"]["after"]
        assert result.params_before is not None and result.params_after is not None
        assert result.params_after < result.params_before
        artifacts = session.scalars(select(Artifact).where(Artifact.job_id == job_id)).all()
        names = sorted(a.name for a in artifacts)
        assert "model.safetensors" in names and "report.json" in names
        for a in artifacts:
            assert sha256_file(store_root / a.location) == (a.size_bytes, a.sha256)
        epochs = session.scalars(
            select(JobEvent.epoch).where(JobEvent.job_id == job_id, JobEvent.stage == "train")
        ).all()
        assert {1, 2} <= {e for e in epochs if e is not None}
    assert not (store_root / artifacts[0].location).parent.parent.joinpath("work").exists()
    assert execute_job(job_id, "w2") == "skipped"  # a finished job is never run again
    assert job_row(job_id).attempt == 1


def test_cancel_during_training_ends_canceled(service_db: str) -> None:
    job_id = submit(tiny_config(epochs=200))
    outcome: list[str] = []
    runner = threading.Thread(target=lambda: outcome.append(execute_job(job_id, "w1")))
    runner.start()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        job = job_row(job_id)
        if job.status == "running" and (job.epoch or 0) >= 1:
            break
        time.sleep(0.2)
    with session_scope() as session:
        session.execute(update(Job).where(Job.id == job_id).values(cancel_requested=True))
    runner.join(timeout=120)
    assert outcome == ["canceled"]
    job = job_row(job_id)
    assert job.status == "canceled" and job.finished_at is not None
    with session_scope() as session:
        assert session.get(Result, job_id) is None


def test_invalid_config_fails_with_the_message(service_db: str) -> None:
    job_id = submit(tiny_config(train={"epochs": 0}))
    assert execute_job(job_id) == "failed"
    error = job_row(job_id).error
    assert error is not None and error.startswith("invalid job config: train.epochs")


def test_unknown_model_id_fails_with_a_message(service_db: str) -> None:
    config = tiny_config()
    config["model"]["weights"] = "0" * 32
    job_id = submit(config)
    assert execute_job(job_id) == "failed"
    assert job_row(job_id).error == (
        f"model.weights {'0' * 32!r} is not one of your uploaded models; "
        "upload weights with POST /v1/models and put the returned id in model.weights"
    )


def test_torchvision_dataset_without_a_data_dir_fails_with_a_message(service_db: str) -> None:
    job_id = submit(tiny_config(dataset={"name": "mnist"}))
    assert execute_job(job_id) == "failed"
    error = job_row(job_id).error
    assert error is not None and "LORITA_DATA_DIR" in error and "POST /v1/datasets" in error


def test_torchvision_dataset_reads_the_operators_data_dir(
    service_db: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LORITA_DATA_DIR", str(tmp_path / "data"))
    get_settings.cache_clear()
    # the data directory is empty and downloads are off: the job fails saying what to provide
    job_id = submit(tiny_config(dataset={"name": "cifar10"}))
    assert execute_job(job_id) == "failed"
    error = job_row(job_id).error
    assert error is not None and "cifar10" in error and "root" in error
