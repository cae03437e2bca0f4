"""The Celery application: JSON only, one message at a time, job ids only.

Broker choice
-------------
* ``LORITA_BROKER_URL=redis://...`` (or any Celery broker URL): the distributed deployment.
* unset: the embedded mode. Messages go through kombu's ``filesystem://`` transport in
  ``LORITA_BROKER_DIR`` (default ``./var/broker``), as ``worker.fs_broker`` (alias
  ``lorita-fs://``) which publishes each message atomically. It needs no server and no extra package,
  a message is consumed by an atomic ``rename`` so two consumers never get the same one, and it
  keeps the broker away from the SQLite file that holds the jobs (kombu's SQLAlchemy transport
  would poll that database from every process and fight the API for SQLite's single writer
  lock). It has no redelivery of unacknowledged messages, which is fine here: the database is
  the truth and the sweeper (``worker.sweeper``) re-sends every job id that is stuck.

Queues
------
A job goes to ``gpu`` or ``cpu`` (see :func:`worker.dispatch.queue_for`); a worker consumes the
queue of its device (``lorita worker`` probes CUDA in a subprocess, never in its own process).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from celery import Celery

from store.settings import Settings, get_settings
from worker import fs_broker

TASK_RUN_JOB = "lorita.run_job"
TASK_SWEEP = "lorita.sweep"


def _filesystem_transport_options(root: Path) -> dict[str, Any]:
    queue_dir = root / "queue"
    processed = root / "processed"
    control = root / "control"
    for d in (queue_dir, processed, control):
        d.mkdir(parents=True, exist_ok=True)
    return {
        # one folder both ways: producers and consumers on this machine share it
        "data_folder_in": str(queue_dir),
        "data_folder_out": str(queue_dir),
        "processed_folder": str(processed),
        "control_folder": str(control),
        "store_processed": False,
        "polling_interval": 0.2,
    }


def create_celery_app(settings: Settings | None = None) -> Celery:
    settings = settings or get_settings()
    url = settings.broker_url or None
    app = Celery("lorita")
    conf: dict[str, Any] = {
        "task_serializer": "json",
        "accept_content": ["json"],
        "result_serializer": "json",
        "event_serializer": "json",
        "task_ignore_result": True,  # the database holds the outcome
        "result_backend": None,
        "worker_prefetch_multiplier": 1,
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "task_default_queue": "cpu",
        "task_create_missing_queues": True,
        "task_routes": {TASK_SWEEP: {"queue": "cpu"}},
        "worker_hijack_root_logger": False,
        "worker_send_task_events": False,
        "broker_connection_retry_on_startup": True,
        "timezone": "UTC",
        "enable_utc": True,
        # Kept for operators who prefer `celery beat`: the workers run the sweeper themselves
        # (worker.sweeper.SweeperStep), because with concurrency 1 a beat-sent sweep would wait
        # behind the very training job it may have to rescue.
        "beat_schedule": {
            "lorita-sweep": {"task": TASK_SWEEP, "schedule": settings.sweep_interval},
        },
    }
    if url is None:
        conf["broker_url"] = f"{fs_broker.ALIAS}://"
        conf["broker_transport_options"] = _filesystem_transport_options(Path(settings.broker_dir).resolve())
        conf["worker_enable_remote_control"] = False
    else:
        conf["broker_url"] = url
        conf["broker_connection_timeout"] = 3.0
        if url.startswith(("redis://", "rediss://")):
            # a job may train for hours; redelivery of an unacked id is harmless (the claim is a
            # compare-and-set) but pointless, so keep it rare
            conf["broker_transport_options"] = {"visibility_timeout": 6 * 3600}
    app.conf.update(conf)
    app.conf.beat_schedule_filename = str(Path(settings.var_dir) / "celerybeat")
    return app


app = create_celery_app()
# the worker imports the task modules at start; senders use task names and import nothing
app.conf.include = ["worker.tasks", "worker.sweeper"]
