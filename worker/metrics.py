"""A worker's Prometheus metrics and the per-run hooks that feed them.

Metrics (prometheus_client, multi-process mode: the jobs run in the pool's child processes, the
main process serves ``/metrics`` on ``LORITA_WORKER_METRICS_PORT`` with every child's values):

* ``lorita_worker_jobs_total{outcome}`` and ``lorita_worker_job_duration_seconds{outcome}``:
  runs by how they ended (succeeded, failed, canceled, stale, retry);
* ``lorita_worker_stage_duration_seconds{stage}``: time in each pipeline stage;
* ``lorita_worker_job_failures_total{reason}``: failed runs by reason (``config``, ``data``,
  ``reference``, ``no_space``, ``wall_time``, ``internal``);
* ``lorita_queue_depth{queue}``: jobs waiting, counted in the database at scrape time.

Without the port setting nothing is served and the counters stay in their process (harmless).
Multi-process mode needs ``PROMETHEUS_MULTIPROC_DIR`` set before prometheus_client creates a
metric, so the metrics are made on first use, after :func:`serve_worker_metrics` set it up.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from store.settings import export_to_libraries

log = logging.getLogger(__name__)

STAGE_BUCKETS = (0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 7200, 21600)
_metrics: dict[str, Any] = {}


def _get() -> dict[str, Any]:
    if not _metrics:
        from prometheus_client import Counter, Histogram

        _metrics["jobs"] = Counter("lorita_worker_jobs", "Job runs by outcome.", ["outcome"])
        _metrics["job_seconds"] = Histogram(
            "lorita_worker_job_duration_seconds", "Duration of a job run.", ["outcome"], buckets=STAGE_BUCKETS
        )
        _metrics["stage_seconds"] = Histogram(
            "lorita_worker_stage_duration_seconds",
            "Time in a pipeline stage.",
            ["stage"],
            buckets=STAGE_BUCKETS,
        )
        _metrics["failures"] = Counter("lorita_worker_job_failures", "Failed job runs by reason.", ["reason"])
    return _metrics


def failure_reason(err: BaseException) -> str:
    from store.artifacts import is_no_space

    if is_no_space(err):
        return "no_space"
    name = type(err).__name__
    return {
        "ConfigError": "config",
        "DataError": "data",
        "WeightsError": "data",
        "UnresolvedReference": "reference",
        "ReferenceNotFound": "reference",
        "JobError": "job",
    }.get(name, "internal")


def record_run(outcome: str, seconds: float, reason: str | None = None) -> None:
    try:
        m = _get()
        m["jobs"].labels(outcome).inc()
        m["job_seconds"].labels(outcome).observe(seconds)
        if outcome == "failed":
            m["failures"].labels(reason or "internal").inc()
    except Exception:  # metrics never break a job
        log.debug("could not record run metrics", exc_info=True)


class RunHooks:
    """Wraps a run's progress and should_stop callbacks: stage timing, the checkpoint upload at
    each new epoch, and the wall-time limit (``LORITA_JOB_WALL_SECONDS``)."""

    def __init__(
        self,
        progress: Callable[[Any], None],
        should_stop: Callable[[], bool],
        wall_seconds: float,
        on_epoch: Callable[[], object] | None = None,
    ) -> None:
        self._progress = progress
        self._should_stop = should_stop
        self._on_epoch = on_epoch
        self.started = time.monotonic()
        self.deadline = self.started + wall_seconds
        self.wall_seconds = wall_seconds
        self.timed_out = False
        self._stage: str | None = None
        self._stage_started = self.started
        self._epoch: Any = None

    def progress(self, p: Any) -> None:
        now = time.monotonic()
        new_epoch = p.epoch is not None and p.epoch != self._epoch
        if self._epoch is not None and self._on_epoch is not None and (new_epoch or p.stage != self._stage):
            self._on_epoch()  # the previous epoch's (or the last one's) checkpoint is on disk now
        if p.stage != self._stage:
            self.end_stage(now)
            self._stage, self._stage_started = p.stage, now
            if p.epoch is None:
                self._epoch = None
        if new_epoch:
            self._epoch = p.epoch
        self._progress(p)

    def end_stage(self, now: float | None = None) -> None:
        if self._stage is None:
            return
        now = time.monotonic() if now is None else now
        try:
            _get()["stage_seconds"].labels(str(self._stage)).observe(now - self._stage_started)
        except Exception:
            log.debug("could not record stage metrics", exc_info=True)
        self._stage = None

    def should_stop(self) -> bool:
        if time.monotonic() > self.deadline:
            self.timed_out = True
            return True
        return self._should_stop()

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def wall_time_message(self) -> str:
        return (
            f"the job ran longer than this server's limit of {self.wall_seconds:.0f} s per run and was "
            "stopped; use fewer epochs or a smaller model or dataset, or ask the operator to raise "
            "LORITA_JOB_WALL_SECONDS"
        )


def queue_depth_collector(database_url: str | None = None) -> Any:
    from prometheus_client.core import GaugeMetricFamily
    from prometheus_client.registry import Collector

    class QueueDepth(Collector):
        def collect(self) -> Any:
            from sqlalchemy import func, select

            from store.db import session_scope
            from store.models import Job
            from store.status import JobStatus

            try:
                with session_scope(database_url) as session:
                    n = session.scalar(
                        select(func.count()).select_from(Job).where(Job.status == JobStatus.QUEUED)
                    )
            except Exception as err:
                log.warning("metrics: queue depth unavailable: %s", type(err).__name__)
                return
            family = GaugeMetricFamily("lorita_queue_depth", "Jobs waiting for a worker.", labels=["queue"])
            family.add_metric(["all"], float(n or 0))
            yield family

    return QueueDepth()


def serve_worker_metrics(port: int, var_dir: str | os.PathLike[str]) -> Path:
    """In the worker's main process, before the pool forks: multi-process mode and the server."""
    base = Path(var_dir).resolve() / "metrics"
    base.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(dir=base, prefix=f"worker-{os.getpid()}-"))
    # prometheus_client's documented switch; read by it (not by us) when a metric is created
    export_to_libraries("PROMETHEUS_MULTIPROC_DIR", str(folder))
    from prometheus_client import CollectorRegistry, start_http_server
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(folder))
    registry.register(queue_depth_collector())
    start_http_server(port, addr="0.0.0.0", registry=registry)
    log.info("worker metrics on :%d/metrics", port)
    return folder


def remove_metrics_dir(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)


def _connect_signals() -> None:
    from celery import signals

    from store.logging import configure_logging
    from store.settings import get_settings

    settings = get_settings()

    folders: list[Path] = []

    @signals.worker_init.connect(weak=False)
    def _serve(**_: Any) -> None:
        if settings.worker_metrics_port is not None:
            folders.append(serve_worker_metrics(settings.worker_metrics_port, settings.var_dir))

    @signals.worker_shutdown.connect(weak=False)
    def _clean(**_: Any) -> None:
        for folder in folders:  # this worker's value files; a killed worker's go with var_dir
            remove_metrics_dir(folder)

    if settings.log_format is not None:
        fmt = settings.log_format

        # connected only when set: any receiver of setup_logging stops celery's own set-up
        @signals.setup_logging.connect(weak=False)
        def _logging(loglevel: Any = "INFO", **_: Any) -> None:
            configure_logging(fmt, loglevel or "INFO")


_connect_signals()
