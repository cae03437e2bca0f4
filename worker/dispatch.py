"""The sending side: put a job id on the right queue, check the broker. Imports no task code.

Call :func:`send_job` only after the job row is committed (the database is the truth; the
message only carries the id). A lost message is re-sent by the sweeper.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from store.settings import get_settings
from worker.celery_app import TASK_RUN_JOB, app

log = logging.getLogger(__name__)


def default_queue() -> str:
    """``LORITA_QUEUE`` (``gpu`` or ``cpu``): where jobs go unless their config names a device."""
    return get_settings().queue


def queue_for(config: Mapping[str, Any] | None) -> str:
    """``device: cpu`` -> cpu, ``device: cuda`` -> gpu, otherwise the default queue."""
    device = (config or {}).get("device", "auto")
    if device == "cpu":
        return "cpu"
    if device == "cuda":
        return "gpu"
    return default_queue()


def send_job(job_id: str, queue: str | None = None, config: Mapping[str, Any] | None = None) -> None:
    """Send ``job_id`` to ``queue`` (default: :func:`queue_for` of ``config``)."""
    queue = queue or queue_for(config)
    app.send_task(TASK_RUN_JOB, args=[job_id], queue=queue, routing_key=queue)
    log.info("sent job %s to queue %s", job_id, queue)


def ping(timeout: float = 2.0) -> None:
    """Raise ``ConnectionError`` if the broker cannot be reached within ``timeout`` seconds."""
    try:
        with app.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=timeout)
            if conn.transport_cls in ("redis", "rediss") or conn.transport.driver_type == "redis":
                conn.default_channel.client.ping()
    except Exception as err:
        raise ConnectionError(f"broker unreachable: {type(err).__name__}: {err}") from err
