"""The job task: claim, resolve references, delegate to ``core.pipeline.run_job``, record.

Thin and idempotent by construction: the claim is a compare-and-set, so a duplicate message, a
finished job or a job another worker runs is a no-op; a rerun after a crash resumes from the
training checkpoint in the job's ``work/`` folder. Every write carries the claimed attempt.

torch (core's pipeline) is imported inside the task only, in the pool's child process: the
worker's main process never touches CUDA. References to uploads are checked against the job's
tenant and resolved to files by ``store.references``.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import traceback
from typing import Any

from celery import signals
from sqlalchemy.exc import SQLAlchemyError

from core.messages import failure_message, new_reference, user_message
from store import lifecycle, references
from store.artifacts import NO_SPACE_MESSAGE, ArtifactStoreUnavailable, get_artifact_store
from store.db import dispose_engines, session_scope
from store.jobfiles import JobFiles
from store.logging import job_context
from store.models import Job
from store.outage import OutageGate
from store.settings import Settings, get_settings
from store.status import JobStatus
from worker import derive
from worker.celery_app import TASK_RUN_JOB, app
from worker.metrics import RunHooks, failure_reason, record_run

log = logging.getLogger(__name__)

PROGRESS_INTERVAL_S = 1.0
CANCEL_POLL_INTERVAL_S = 1.0


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class JobReporter:
    """The progress / should_stop callbacks of one run, plus a heartbeat thread.

    Progress is written at most once per second, and always at a stage change or a new epoch
    (those also become job events). A write refused as stale, or a lost heartbeat, makes
    ``should_stop`` answer True so that a superseded run stops early.
    """

    def __init__(self, job_id: str, attempt: int, lease_seconds: float) -> None:
        self.job_id = job_id
        self.attempt = attempt
        self.lease_seconds = lease_seconds
        self.stale = False
        self.started = time.monotonic()
        # heartbeats, progress and cancel polls share one view of the database: while it is down
        # they log once and back off, instead of a traceback per report
        self.db = OutageGate(f"job {job_id} attempt {attempt}", log)
        self._last_write = 0.0
        self._last_key: tuple[Any, Any] | None = None
        self._last_cancel_poll = 0.0
        self._cancel = False
        self._stop = threading.Event()
        self._beat = threading.Thread(target=self._heartbeat_loop, name="lorita-heartbeat", daemon=True)

    def __enter__(self) -> JobReporter:
        self._beat.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._beat.join(timeout=5)

    def _heartbeat_loop(self) -> None:
        interval = max(1.0, self.lease_seconds / 3)
        while not self._stop.wait(interval):
            if not self.db.ready():
                continue
            try:
                with session_scope() as session:
                    alive = lifecycle.heartbeat(session, self.job_id, self.attempt, self.lease_seconds)
            except SQLAlchemyError as err:
                self.db.failed(err)
                continue
            self.db.succeeded()
            if not alive:
                self.stale = True
                return

    def eta(self, fraction: float) -> float | None:
        if fraction < 0.02:
            return None
        elapsed = time.monotonic() - self.started
        return max(0.0, elapsed / fraction * (1.0 - fraction))

    def progress(self, p: Any) -> None:
        key = (p.stage, p.epoch)
        significant = key != self._last_key
        now = time.monotonic()
        if not significant and now - self._last_write < PROGRESS_INTERVAL_S:
            return
        if not self.db.ready():
            return
        try:
            with session_scope() as session:
                ok = lifecycle.record_progress(
                    session,
                    self.job_id,
                    self.attempt,
                    p,
                    lease_seconds=self.lease_seconds,
                    eta_seconds=self.eta(p.fraction),
                    event=significant,
                )
        except SQLAlchemyError as err:
            self.db.failed(err)
            return
        self.db.succeeded()
        self._last_write = now
        self._last_key = key
        if not ok:
            self.stale = True

    def should_stop(self) -> bool:
        if self.stale or self._cancel:
            return True
        now = time.monotonic()
        if now - self._last_cancel_poll >= CANCEL_POLL_INTERVAL_S and self.db.ready():
            self._last_cancel_poll = now
            try:
                with session_scope() as session:
                    self._cancel = lifecycle.cancel_requested(session, self.job_id)
                self.db.succeeded()
            except SQLAlchemyError as err:
                self.db.failed(err)
        return self._cancel or self.stale


def limit_torch_threads(threads: int | None) -> None:
    """``LORITA_TORCH_THREADS``: cap torch's intra-op threads in this (pool) process, e.g. to
    leave cores to an API on the same machine. None keeps torch's default (all cores)."""
    if threads is None:
        return
    import torch

    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


def _record_outcome(job_id: str, attempt: int, status: JobStatus, message: str | None = None) -> str:
    """Record the end of our run; returns the outcome for the clean-up: ``status``, or ``stale``
    when a newer attempt owns the job (its files must then be left alone)."""
    with session_scope() as session:
        if status == JobStatus.CANCELED:
            done = lifecycle.mark_canceled(session, job_id, attempt)
        else:
            done = lifecycle.fail(session, job_id, attempt, message or "failed")
    if not done:
        log.warning("job %s attempt %d is stale; its %s outcome was not recorded", job_id, attempt, status)
    return str(status) if done else "stale"


def execute_job(job_id: str, worker: str | None = None) -> str:
    """Run one claimed attempt of ``job_id``; return what happened (for logs and tests)."""
    settings = get_settings()
    with session_scope() as session:
        attempt = lifecycle.claim(session, job_id, worker or worker_id(), settings.lease_seconds)
    if attempt is None:
        log.info("job %s is not claimable (finished, canceled or taken); skipping", job_id)
        return "skipped"
    with session_scope() as session:
        job = session.get(Job, job_id)
        assert job is not None  # we just claimed it
        raw_config, tenant_id = dict(job.config), job.tenant_id
    log.info("job %s: attempt %d started", job_id, attempt)
    reporter = JobReporter(job_id, attempt, settings.lease_seconds)
    # the lease is renewed from the claim on: importing torch, fetching inputs from S3 and uploading
    # outputs take time too
    with reporter:
        return _run_attempt(job_id, attempt, raw_config, tenant_id, settings, reporter)


def _run_attempt(
    job_id: str,
    attempt: int,
    raw_config: dict[str, Any],
    tenant_id: str,
    settings: Settings,
    reporter: JobReporter,
) -> str:
    from core.config import ConfigError, parse_config
    from core.pipeline import run_job
    from core.progress import JobCanceled, JobError

    limit_torch_threads(settings.torch_threads)

    store = get_artifact_store(settings)
    # each attempt writes its own folder, so a superseded run cannot touch recorded files
    files = JobFiles(store, tenant_id, job_id, attempt)
    hooks = RunHooks(
        reporter.progress, reporter.should_stop, settings.job_wall_seconds, on_epoch=files.sync_checkpoint
    )
    outcome, reason = "failed", None
    try:
        with session_scope() as session:
            config = references.resolve_for_run(
                session, tenant_id, parse_config(raw_config), store.local_path, settings
            )
        out_dir, work_dir = files.prepare()
        runner = derive.runner_for(job_id, store) or run_job  # a derived job selects from its parent
        report = runner(
            config,
            out_dir,
            work_dir=work_dir,
            progress=hooks.progress,
            should_stop=hooks.should_stop,
        )
        hooks.end_stage()
        artifacts = files.collect() + derive.dense_artifacts(out_dir, files.prefix, store)
        with session_scope() as session:
            done = lifecycle.complete(session, job_id, attempt, report, artifacts)
        outcome = "succeeded" if done else "stale"
    except JobCanceled:
        if reporter.stale:
            log.warning("job %s attempt %d was superseded; stopped", job_id, attempt)
            outcome = "stale"
        elif hooks.timed_out:
            outcome = _record_outcome(job_id, attempt, JobStatus.FAILED, hooks.wall_time_message())
            log.info("job %s failed: past the wall-time limit", job_id)
            reason = "wall_time"
        else:
            outcome = _record_outcome(job_id, attempt, JobStatus.CANCELED)
            log.info("job %s canceled", job_id)
    except (JobError, ConfigError, references.UnresolvedReference) as err:
        outcome = _record_outcome(job_id, attempt, JobStatus.FAILED, user_message(err))
        log.info("job %s failed: %s", job_id, err)
        reason = failure_reason(err)
    except ArtifactStoreUnavailable as err:
        # not the job's fault: its lease expires and the sweeper runs it again (from the checkpoint)
        log.error("job %s attempt %d: %s; it will be retried", job_id, attempt, err)
        outcome = "retry"
    except Exception as err:
        if files.out_of_space(err):
            files.remove_partials()
            log.error("job %s attempt %d: no space left on the artifact store", job_id, attempt)
            outcome = _record_outcome(job_id, attempt, JobStatus.FAILED, NO_SPACE_MESSAGE)
            reason = "no_space"
        else:
            ref = new_reference()
            log.error(
                "job %s attempt %d: internal error (reference %s)\n%s",
                job_id,
                attempt,
                ref,
                traceback.format_exc(),
            )
            outcome = _record_outcome(job_id, attempt, JobStatus.FAILED, failure_message(err, ref))
            reason = "internal"
    finally:
        hooks.end_stage()
    if outcome != "retry":
        files.finish(outcome)
    record_run(outcome, hooks.elapsed, reason)
    if outcome == "stale":
        log.warning("job %s attempt %d finished but was superseded; result discarded", job_id, attempt)
    elif outcome == "succeeded":
        log.info("job %s succeeded (attempt %d)", job_id, attempt)
    return outcome


@app.task(name=TASK_RUN_JOB, ignore_result=True, acks_late=True, reject_on_worker_lost=True, bind=True)
def run_job_task(self: Any, job_id: str) -> str:
    # the id of the request that submitted the job (api.metrics puts it in the message headers)
    request_id = getattr(self.request, "lorita_request_id", None)
    with job_context(job_id, request_id if isinstance(request_id, str) else None):
        return execute_job(job_id)


@signals.worker_process_init.connect
def _fresh_connections_after_fork(**_: Any) -> None:
    """A forked pool process must not reuse the parent's pooled database connections."""
    dispose_engines(close=False)
