"""POST/GET /v1/jobs and the job sub-resources."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from core.report import JobReport
from store import lifecycle
from store.artifacts import job_key
from store.models import Job, JobEvent, ModelRecord, Result
from store.settings import Settings
from tests.api.conftest import Caller, RecordingDispatcher

pytestmark = pytest.mark.postgres

DIGITS_JOB: dict[str, Any] = {
    "model": {"arch": "fcn", "options": {"depth": 2, "width": 16}},
    "dataset": {"name": "digits"},
    "train": {"epochs": 2},
    "compress": {"policy": "uniform", "keep": 0.5},
}


def submit(client: TestClient, caller: Caller, config: dict[str, Any], key: str | None = None) -> Any:
    headers = caller.headers | ({"Idempotency-Key": key} if key else {})
    return client.post("/v1/jobs", headers=headers, json=config)


def set_status(session: Session, job_id: str, status: str) -> None:
    job = session.get(Job, job_id)
    assert job is not None
    job.status = status
    session.flush()


def job_count(session: Session) -> int:
    return session.scalar(select(func.count()).select_from(Job)) or 0


def test_submit_stores_a_queued_job_before_dispatching_it(
    client: TestClient, alice: Caller, dispatcher: RecordingDispatcher, session: Session
) -> None:
    resp = submit(client, alice, DIGITS_JOB | {"name": "first"})

    assert resp.status_code == 202, resp.text
    body = resp.json()
    assert (body["status"], body["name"], body["progress"], body["attempt"]) == ("queued", "first", 0.0, 0)
    assert dispatcher.sent == [body["id"]]
    assert dispatcher.row_status_at_send == ["queued"]
    job = session.get(Job, body["id"])
    assert job is not None and job.tenant_id == alice.tenant.id
    # the stored config is the validated one: what was sent, plus the defaults of every other field
    compress = job.config["compress"]
    assert job.config["train"]["epochs"] == 2
    assert (compress["policy"], compress["keep"]) == ("uniform", 0.5)


def test_a_failed_enqueue_still_answers_202_and_leaves_the_job_queued(
    client: TestClient, alice: Caller, dispatcher: RecordingDispatcher, session: Session
) -> None:
    dispatcher.fail = True

    resp = submit(client, alice, DIGITS_JOB)

    assert resp.status_code == 202
    job = session.get(Job, resp.json()["id"])
    assert job is not None and job.status == "queued"


def test_unknown_config_field_is_422_naming_it(client: TestClient, alice: Caller, session: Session) -> None:
    config = DIGITS_JOB | {"train": {"epochs": 2, "learning_rate": 0.1}}

    resp = submit(client, alice, config)

    assert resp.status_code == 422
    detail = resp.json()["detail"]
    assert "train.learning_rate" in detail and "unknown field" in detail
    assert job_count(session) == 0


@pytest.mark.parametrize(
    ("dataset", "expected"),
    [
        ({"path": "/etc/passwd"}, "dataset.path is not accepted"),
        ({"name": "cifar10", "root": "/"}, "dataset.root is not accepted"),
    ],
)
def test_server_paths_are_refused(
    client: TestClient, alice: Caller, session: Session, dataset: dict[str, Any], expected: str
) -> None:
    resp = submit(client, alice, DIGITS_JOB | {"dataset": dataset})

    assert resp.status_code == 422
    assert expected in resp.json()["detail"]
    assert job_count(session) == 0


def test_weights_that_are_not_an_uploaded_model_are_refused(client: TestClient, alice: Caller) -> None:
    config = DIGITS_JOB | {"model": {"arch": "fcn", "weights": "/srv/secret/weights.pt"}}

    resp = submit(client, alice, config)

    assert resp.status_code == 404
    assert "not one of your uploaded models" in resp.json()["detail"]


def test_another_tenants_model_and_dataset_cannot_be_referenced(
    client: TestClient, alice: Caller, bob: Caller, session: Session
) -> None:
    record = ModelRecord(
        tenant_id=bob.tenant.id, name="m", arch="fcn", num_classes=10, input_shape=[64], options={},
        filename="w.safetensors", size_bytes=1, sha256="0" * 64, location="tenants/x/models/y/w.safetensors",
    )  # fmt: skip
    session.add(record)
    session.flush()

    by_model = submit(client, alice, DIGITS_JOB | {"model": {"arch": "fcn", "weights": record.id}})
    by_dataset = submit(client, alice, DIGITS_JOB | {"dataset": {"id": "0" * 32}})

    assert by_model.status_code == 404 and record.id in by_model.json()["detail"]
    assert by_dataset.status_code == 404 and "dataset" in by_dataset.json()["detail"]
    assert job_count(session) == 0


def test_uploaded_model_fills_num_classes_and_must_match_its_arch(
    client: TestClient, alice: Caller, session: Session
) -> None:
    record = ModelRecord(
        tenant_id=alice.tenant.id, name="m", arch="fcn", num_classes=10, input_shape=[64],
        options={"depth": 2, "width": 16}, filename="w.safetensors", size_bytes=1, sha256="0" * 64,
        location="tenants/x/models/y/w.safetensors",
    )  # fmt: skip
    session.add(record)
    session.flush()

    ok = submit(client, alice, DIGITS_JOB | {"model": {"arch": "fcn", "weights": record.id}})
    wrong_arch = submit(client, alice, DIGITS_JOB | {"model": {"arch": "resnet20", "weights": record.id}})

    assert ok.status_code == 202, ok.text
    model = ok.json()["config"]["model"]
    assert {k: model[k] for k in ("arch", "num_classes", "weights", "options", "program")} == {
        "arch": "fcn", "num_classes": 10, "weights": record.id, "options": {"depth": 2, "width": 16},
        "program": None,
    }  # fmt: skip
    assert wrong_arch.status_code == 422 and "'fcn'" in wrong_arch.json()["detail"]


def test_idempotency_key_returns_the_same_job(
    client: TestClient, alice: Caller, dispatcher: RecordingDispatcher, session: Session
) -> None:
    first = submit(client, alice, DIGITS_JOB, key="retry-1")
    again = submit(client, alice, DIGITS_JOB, key="retry-1")
    other_body = submit(client, alice, DIGITS_JOB | {"name": "changed"}, key="retry-1")

    assert first.status_code == 202 and again.status_code == 200
    assert again.json()["id"] == first.json()["id"]
    assert other_body.status_code == 409
    assert job_count(session) == 1 and dispatcher.sent == [first.json()["id"]]


def test_the_same_idempotency_key_of_two_tenants_makes_two_jobs(
    client: TestClient, alice: Caller, bob: Caller
) -> None:
    a = submit(client, alice, DIGITS_JOB, key="k")
    b = submit(client, bob, DIGITS_JOB, key="k")

    assert a.status_code == b.status_code == 202
    assert a.json()["id"] != b.json()["id"]


def test_cancel_queued_running_and_finished_jobs(client: TestClient, alice: Caller, session: Session) -> None:
    queued, running, done = (submit(client, alice, DIGITS_JOB).json()["id"] for _ in range(3))
    set_status(session, running, "running")
    set_status(session, done, "succeeded")

    r_queued = client.post(f"/v1/jobs/{queued}/cancel", headers=alice.headers)
    r_running = client.post(f"/v1/jobs/{running}/cancel", headers=alice.headers)
    r_done = client.post(f"/v1/jobs/{done}/cancel", headers=alice.headers)

    assert r_queued.status_code == 200 and r_queued.json()["status"] == "canceled"
    assert r_queued.json()["finished_at"] is not None
    assert r_running.status_code == 200
    assert (r_running.json()["status"], r_running.json()["cancel_requested"]) == ("running", True)
    assert r_done.status_code == 409 and "already succeeded" in r_done.json()["detail"]


def test_list_is_paginated_and_filtered_by_status(
    client: TestClient, alice: Caller, session: Session
) -> None:
    ids = [submit(client, alice, DIGITS_JOB).json()["id"] for _ in range(3)]
    set_status(session, ids[0], "failed")

    page = client.get("/v1/jobs", headers=alice.headers, params={"limit": 2}).json()
    failed = client.get("/v1/jobs", headers=alice.headers, params={"status": "failed"}).json()
    bad = client.get("/v1/jobs", headers=alice.headers, params={"limit": 500})

    assert page["count"] == 3 and len(page["data"]) == 2
    assert failed["count"] == 1 and failed["data"][0]["id"] == ids[0]
    assert bad.status_code == 422 and "limit" in bad.json()["detail"]


def test_report_is_409_until_the_job_succeeded(
    client: TestClient, alice: Caller, session: Session, real_report: JobReport
) -> None:
    job_id = submit(client, alice, DIGITS_JOB).json()["id"]

    before = client.get(f"/v1/jobs/{job_id}/report", headers=alice.headers)
    set_status(session, job_id, "succeeded")
    r = real_report
    session.add(
        Result(
            job_id=job_id,
            params_before=r.params.before,
            params_after=r.params.after,
            latency_ms=r.latency_by_batch(),
            report=r.model_dump(mode="json"),
        )
    )
    session.flush()
    after = client.get(f"/v1/jobs/{job_id}/report", headers=alice.headers)
    job = client.get(f"/v1/jobs/{job_id}", headers=alice.headers).json()

    assert before.status_code == 409 and "queued" in before.json()["detail"]
    assert after.status_code == 200 and JobReport.model_validate(after.json()) == r
    assert job["result"]["params_after"] == r.params.after
    assert job["result"]["params_ratio"] == r.params.ratio and job["result"]["flops_ratio"] == r.flops.ratio
    assert set(job["result"]["latency_ms"]) == set(r.latency_ms)


def test_events_list_the_progress_history(client: TestClient, alice: Caller, session: Session) -> None:
    job_id = submit(client, alice, DIGITS_JOB).json()["id"]
    for epoch, loss in ((1, 0.9), (2, 0.5)):
        session.add(
            JobEvent(job_id=job_id, attempt=1, stage="train", progress=epoch / 4, epoch=epoch, loss=loss)
        )
    session.flush()

    body = client.get(f"/v1/jobs/{job_id}/events", headers=alice.headers).json()

    assert [(e["epoch"], e["loss"]) for e in body["data"]] == [(1, 0.9), (2, 0.5)]
    first_id = body["data"][0]["id"]
    later = client.get(
        f"/v1/jobs/{job_id}/events", headers=alice.headers, params={"after_id": first_id}
    ).json()
    assert [e["epoch"] for e in later["data"]] == [2]


def test_artifact_download_streams_bytes_matching_the_checksum_header(
    client: TestClient, alice: Caller, session: Session, settings: Settings, real_report: JobReport
) -> None:
    job_id = submit(client, alice, DIGITS_JOB).json()["id"]
    payload = bytes(range(256)) * 4096  # 1 MiB
    key = job_key(alice.tenant.id, job_id, "model.onnx")
    path = Path(settings.artifact_dir) / key
    path.parent.mkdir(parents=True)
    path.write_bytes(payload)
    digest = hashlib.sha256(payload).hexdigest()
    # the artifact row is written the way a worker writes it: its run claims the job, then completes
    attempt = lifecycle.claim(session, job_id, "w1", lease_seconds=60)
    assert attempt == 1
    files = [("model.onnx", len(payload), digest, key)]
    assert lifecycle.complete(session, job_id, attempt, real_report, files)

    listing = client.get(f"/v1/jobs/{job_id}/artifacts", headers=alice.headers).json()
    with client.stream("GET", f"/v1/jobs/{job_id}/artifacts/model.onnx", headers=alice.headers) as resp:
        received = b"".join(resp.iter_bytes())

    assert listing["data"][0]["url"] == f"/v1/jobs/{job_id}/artifacts/model.onnx"
    assert resp.status_code == 200
    assert resp.headers["X-Checksum-SHA256"] == digest == hashlib.sha256(received).hexdigest()
    assert int(resp.headers["Content-Length"]) == len(payload)
    missing = client.get(f"/v1/jobs/{job_id}/artifacts/nope.bin", headers=alice.headers)
    assert missing.status_code == 404


def test_job_timestamps_are_utc(client: TestClient, alice: Caller) -> None:
    body = submit(client, alice, DIGITS_JOB).json()

    created = datetime.fromisoformat(body["created_at"])
    assert created.utcoffset() is not None and created.utcoffset().total_seconds() == 0  # type: ignore[union-attr]
    assert abs((datetime.now(UTC) - created).total_seconds()) < 600
