"""Attempt-guarded transitions on SQLite and PostgreSQL."""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest
from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError

from core.progress import Progress
from core.report import JobReport
from store import lifecycle
from store.db import session_scope
from store.models import Artifact, Job, JobEvent, Result, utcnow
from tests.worker.conftest import load_job, make_job

FILES = [("model.safetensors", 10, "a" * 64, "jobs/x/model.safetensors"), ("report.json", 5, "b" * 64, "r")]


def claim(url: str, job_id: str, worker: str = "w1", lease: float = 60) -> int | None:
    with session_scope(url) as s:
        return lifecycle.claim(s, job_id, worker, lease)


def expire_lease(url: str, job_id: str) -> None:
    with session_scope(url) as s:
        past = utcnow() - timedelta(seconds=1)
        s.execute(update(Job).where(Job.id == job_id).values(lease_expires_at=past))


def test_claim_increments_attempt_and_sets_lease(db_url: str, tenant_id: str) -> None:
    job_id = make_job(db_url, tenant_id)
    assert claim(db_url, job_id, "w1") == 1
    job = load_job(db_url, job_id)
    assert (job.status, job.attempt, job.worker_id) == ("running", 1, "w1")
    assert job.lease_expires_at is not None and job.lease_expires_at > utcnow() + timedelta(seconds=50)


def _race(db_url: str, job_id: str, barrier: threading.Barrier, name: str, results: list[int | None]) -> None:
    barrier.wait()
    try:
        results.append(claim(db_url, job_id, name))
    except Exception:  # a serialization error is a lost race too
        results.append(None)


def test_two_concurrent_claims_exactly_one_wins(db_url: str, tenant_id: str) -> None:
    for _ in range(5):
        job_id = make_job(db_url, tenant_id)
        barrier = threading.Barrier(2)
        results: list[int | None] = []
        threads = [
            threading.Thread(target=_race, args=(db_url, job_id, barrier, f"w{i}", results)) for i in range(2)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(results, key=lambda r: r or 0) == [None, 1]
        assert load_job(db_url, job_id).attempt == 1


def test_second_claim_of_running_job_with_live_lease_is_refused(db_url: str, tenant_id: str) -> None:
    job_id = make_job(db_url, tenant_id)
    assert claim(db_url, job_id, "w1") == 1
    assert claim(db_url, job_id, "w2") is None
    assert load_job(db_url, job_id).worker_id == "w1"


def test_expired_lease_can_be_taken_over_and_stale_writes_are_refused(
    db_url: str, tenant_id: str, real_report: JobReport
) -> None:
    job_id = make_job(db_url, tenant_id)
    assert claim(db_url, job_id, "w1") == 1
    expire_lease(db_url, job_id)
    assert claim(db_url, job_id, "w2") == 2
    p = Progress(stage="train", fraction=0.5, epoch=3, epochs=10, loss=0.1)
    with session_scope(db_url) as s:
        assert lifecycle.record_progress(s, job_id, 1, p) is False
        assert lifecycle.heartbeat(s, job_id, 1, 60) is False
        assert lifecycle.complete(s, job_id, 1, real_report, FILES) is False
        assert lifecycle.fail(s, job_id, 1, "boom") is False
        assert lifecycle.mark_canceled(s, job_id, 1) is False
    with session_scope(db_url) as s:
        assert s.scalar(select(func.count()).select_from(JobEvent).where(JobEvent.job_id == job_id)) == 0
        assert s.get(Result, job_id) is None
    job = load_job(db_url, job_id)
    assert (job.status, job.attempt, job.epoch, job.error) == ("running", 2, None, None)
    with session_scope(db_url) as s:
        assert lifecycle.record_progress(s, job_id, 2, p) is True
    job = load_job(db_url, job_id)
    assert (job.stage, job.epoch, job.epochs, job.progress) == ("train", 3, 10, 0.5)
    assert job.metrics["loss"] == pytest.approx(0.1)


def test_progress_event_carries_attempt_and_nan_loss_is_dropped(db_url: str, tenant_id: str) -> None:
    job_id = make_job(db_url, tenant_id)
    attempt = claim(db_url, job_id)
    assert attempt == 1
    with session_scope(db_url) as s:
        lifecycle.record_progress(s, job_id, 1, Progress("train", 0.2, epoch=1, loss=float("nan")))
    with session_scope(db_url) as s:
        events = s.scalars(select(JobEvent).where(JobEvent.job_id == job_id)).all()
        assert [(e.attempt, e.stage, e.epoch, e.loss) for e in events] == [(1, "train", 1, None)]


def test_complete_writes_result_and_artifacts_with_status_once(
    db_url: str, tenant_id: str, real_report: JobReport
) -> None:
    job_id = make_job(db_url, tenant_id)
    assert claim(db_url, job_id) == 1
    with session_scope(db_url) as s:
        assert lifecycle.complete(s, job_id, 1, real_report, FILES) is True
    with session_scope(db_url) as s:  # idempotent: completing again writes nothing
        assert lifecycle.complete(s, job_id, 1, real_report, FILES) is True
    job = load_job(db_url, job_id)
    assert (job.status, job.progress, job.stage) == ("succeeded", 1.0, "done")
    assert job.finished_at is not None and job.lease_expires_at is None
    with session_scope(db_url) as s:
        result = s.get(Result, job_id)
        assert result is not None
        r = real_report
        assert (result.params_before, result.params_after) == (r.params.before, r.params.after)
        assert (result.flops_before, result.flops_after) == (r.flops.before, r.flops.after)
        assert (result.val_accuracy_after, result.test_accuracy_after) == (
            r.accuracy.val.after,
            r.accuracy.test.after,
        )
        # every measured batch size, whatever measure.batch_sizes said (the tiny job: 1 and 8)
        assert set(result.latency_ms) == {"1", "8"}
        assert result.latency_ms["8"] == {
            "before": r.latency_ms["8"].before,
            "after": r.latency_ms["8"].after,
        }
        assert {k: v["kept_rank"] for k, v in result.ranks.items()} == {
            k: v.kept_rank for k, v in r.ranks.items()
        }
        assert JobReport.model_validate(result.report) == r  # the stored report reads back whole
        stmt = select(Artifact.name).where(Artifact.job_id == job_id).order_by(Artifact.name)
        names = s.scalars(stmt).all()
        assert names == ["model.safetensors", "report.json"]
    assert claim(db_url, job_id, "w2") is None  # a finished job is never run again


def test_complete_failing_midway_leaves_nothing(db_url: str, tenant_id: str, real_report: JobReport) -> None:
    job_id = make_job(db_url, tenant_id)
    assert claim(db_url, job_id) == 1
    duplicate = [*FILES, FILES[0]]  # unique(job_id, name) breaks on the third insert
    with pytest.raises(IntegrityError), session_scope(db_url) as s:
        lifecycle.complete(s, job_id, 1, real_report, duplicate)
    job = load_job(db_url, job_id)
    assert (job.status, job.finished_at) == ("running", None)
    with session_scope(db_url) as s:
        assert s.get(Result, job_id) is None
        assert s.scalar(select(func.count()).select_from(Artifact).where(Artifact.job_id == job_id)) == 0


def test_requeue_expired_then_gives_up_after_max_attempts(db_url: str, tenant_id: str) -> None:
    job_id = make_job(db_url, tenant_id, max_attempts=2)
    other = make_job(db_url, tenant_id)
    assert claim(db_url, other) == 1  # live lease: must be left alone
    assert claim(db_url, job_id) == 1
    expire_lease(db_url, job_id)
    with session_scope(db_url) as s:
        assert lifecycle.requeue_expired(s) == [job_id]
    job = load_job(db_url, job_id)
    assert (job.status, job.attempt, job.worker_id) == ("queued", 1, None)
    assert claim(db_url, job_id) == 2
    expire_lease(db_url, job_id)
    with session_scope(db_url) as s:
        assert lifecycle.requeue_expired(s) == []
    job = load_job(db_url, job_id)
    assert job.status == "failed"
    assert job.error == "gave up after 2 attempts: worker lost (lease expired)"
    assert load_job(db_url, other).status == "running"


def test_claim_past_max_attempts_fails_with_last_error(db_url: str, tenant_id: str) -> None:
    job_id = make_job(db_url, tenant_id, max_attempts=1, attempt=1, error="CUDA out of memory")
    assert claim(db_url, job_id) is None
    job = load_job(db_url, job_id)
    assert (job.status, job.error) == ("failed", "gave up after 1 attempts: CUDA out of memory")


def test_cancel_requested_is_seen_and_canceled_by_the_run(db_url: str, tenant_id: str) -> None:
    job_id = make_job(db_url, tenant_id)
    assert claim(db_url, job_id) == 1
    with session_scope(db_url) as s:
        assert lifecycle.cancel_requested(s, job_id) is False
        s.execute(update(Job).where(Job.id == job_id).values(cancel_requested=True))
    with session_scope(db_url) as s:
        assert lifecycle.cancel_requested(s, job_id) is True
        assert lifecycle.mark_canceled(s, job_id, 1) is True
    job = load_job(db_url, job_id)
    assert (job.status, job.error) == ("canceled", None)


def test_requeue_stuck_queued_resends_each_job_once_per_period(db_url: str, tenant_id: str) -> None:
    job_id = make_job(db_url, tenant_id, updated_at=utcnow() - timedelta(minutes=10))
    fresh = make_job(db_url, tenant_id)
    with session_scope(db_url) as s:
        assert lifecycle.requeue_stuck_queued(s, older_than_s=60) == [job_id]
    with session_scope(db_url) as s:
        assert lifecycle.requeue_stuck_queued(s, older_than_s=60) == []
    assert fresh != job_id
