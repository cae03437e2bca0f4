"""Recovery and housekeeping: leftover job folders against the jobs' rows, retention, a requeued
job shown as queued, and the broker watch that re-sends lost ids right after an outage."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from sqlalchemy import select, update

from store import lifecycle
from store.artifacts import LocalArtifactStore, job_key, open_artifact_store
from store.db import session_scope
from store.housekeeping import expire_outputs, sweep_job_folders, sweep_local_cache
from store.models import Artifact, Dataset, Job, Result, utcnow
from tests.store.s3_server import S3Server
from tests.worker.conftest import load_job, make_job
from worker.recovery import BrokerWatch


def touch(store: LocalArtifactStore, key: str) -> None:
    path = store.path_for(key)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")


def folders(store: LocalArtifactStore, tenant_id: str, job_id: str) -> list[str]:
    return store.list_children(job_key(tenant_id, job_id))


def test_leftover_folders_are_removed_by_the_jobs_state(db_url: str, tenant_id: str, tmp_path: Path) -> None:
    store = LocalArtifactStore(tmp_path / "store")
    ok = make_job(db_url, tenant_id, status="succeeded", attempt=2)
    failed = make_job(db_url, tenant_id, status="failed", attempt=1)
    canceled = make_job(db_url, tenant_id, status="canceled", attempt=0)
    running = make_job(db_url, tenant_id, status="running", attempt=3)
    queued = make_job(db_url, tenant_id, status="queued", attempt=2)
    gone = "0" * 32  # a deleted job's folder
    for job_id in (ok, failed, canceled, running, queued, gone):
        for name in ("a1/model.onnx", "a2/model.onnx", "a3/model.onnx", "work/checkpoint.pt"):
            touch(store, job_key(tenant_id, job_id, name))
    with session_scope(db_url) as session:
        location = job_key(tenant_id, ok, "a2/model.onnx")
        session.add(Artifact(job_id=ok, name="model.onnx", size_bytes=1, sha256="0" * 64, location=location))

    sweep_job_folders(store, db_url)

    assert folders(store, tenant_id, ok) == ["a2"]
    for job_id in (failed, canceled, gone):
        assert not store.exists(job_key(tenant_id, job_id))
    assert folders(store, tenant_id, running) == ["a3", "work"]  # the live run's, and its checkpoint
    assert folders(store, tenant_id, queued) == ["a3", "work"]  # a1, a2: dead runs; work: to resume


def test_retention_expires_old_outputs_but_keeps_the_job_and_its_report(
    db_url: str, tenant_id: str, tmp_path: Path
) -> None:
    store = LocalArtifactStore(tmp_path / "store")
    old = make_job(
        db_url, tenant_id, status="succeeded", attempt=1, finished_at=utcnow() - timedelta(days=10)
    )
    new = make_job(db_url, tenant_id, status="succeeded", attempt=1, finished_at=utcnow() - timedelta(days=1))
    with session_scope(db_url) as session:
        for job_id in (old, new):
            location = job_key(tenant_id, job_id, "a1/model.onnx")
            touch(store, location)
            session.add(
                Artifact(job_id=job_id, name="model.onnx", size_bytes=1, sha256="0" * 64, location=location)
            )
            session.add(Result(job_id=job_id, report={"params": {"after": 1}}))

    expired = expire_outputs(store, retention_days=7, database_url=db_url)

    assert expired == [old]
    with session_scope(db_url) as session:
        left = session.scalars(select(Artifact.job_id).where(Artifact.job_id.in_([old, new]))).all()
        assert left == [new]
        assert session.get(Result, old) is not None and session.get(Job, old) is not None
    assert not store.exists(job_key(tenant_id, old)) and store.exists(
        job_key(tenant_id, new, "a1/model.onnx")
    )


def test_a_requeued_job_shows_as_queued_for_its_next_attempt(db_url: str, tenant_id: str) -> None:
    job_id = make_job(db_url, tenant_id, status="running", attempt=1, lease_expires_at=utcnow())
    with session_scope(db_url) as session:
        session.execute(
            update(Job).where(Job.id == job_id).values(stage="train", progress=0.6, epoch=7, eta_seconds=30.0)
        )

    with session_scope(db_url) as session:
        assert lifecycle.requeue_expired(session, now=utcnow() + timedelta(seconds=1)) == [job_id]

    job = load_job(db_url, job_id)
    assert (job.status, job.stage, job.progress, job.epoch, job.eta_seconds) == (
        "queued",
        None,
        0.0,
        None,
        None,
    )
    assert job.attempt == 1  # the next claim makes it 2


def test_broker_watch_fires_once_after_an_outage_or_a_restart() -> None:
    answers: list[object] = [
        "r1",
        "r1",
        ConnectionError("down"),
        ConnectionError("down"),
        "r1",
        "r1",
        "r2",
        "r2",
    ]

    def probe() -> str | None:
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return str(answer)

    watch = BrokerWatch(probe)

    assert [watch.recovered() for _ in range(8)] == [False, False, False, False, True, False, True, False]


def test_an_s3_workers_cache_drops_deleted_uploads_and_finished_jobs(
    db_url: str, tenant_id: str, tmp_path: Path, s3: S3Server
) -> None:
    store = open_artifact_store(s3.url(), tmp_path / "work")
    src = tmp_path / "f"
    src.write_bytes(b"x")
    with session_scope(db_url) as session:
        kept = Dataset(
            tenant_id=tenant_id,
            name="d",
            kind="npz",
            num_classes=2,
            input_shape=[4],
            n_train=2,
            n_test=2,
            size_bytes=1,
            sha256="0" * 64,
            location=f"tenants/{tenant_id}/datasets/x/data.npz",
        )
        session.add(kept)
        session.flush()
        kept_id = kept.id
    running = make_job(db_url, tenant_id, status="running", attempt=1)
    finished = make_job(db_url, tenant_id, status="succeeded", attempt=1)
    keys = {
        "gone model": f"tenants/{tenant_id}/models/{'1' * 32}/weights.safetensors",
        "dataset": f"tenants/{tenant_id}/datasets/{kept_id}/data.npz",
        "running job": job_key(tenant_id, running, "a1/dense/model.json"),
        "finished job": job_key(tenant_id, finished, "a1/dense/model.json"),
    }
    cached = {}
    for what, key in keys.items():
        store.put_file(key, src)
        cached[what] = store.local_path(key)

    removed = sweep_local_cache(store, db_url)

    assert sorted(removed) == sorted([f"cache/models/{'1' * 32}", f"cache/jobs/{finished}"])
    assert {what for what, path in cached.items() if path.exists()} == {"dataset", "running job"}
