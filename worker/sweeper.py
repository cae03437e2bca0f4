"""The sweeper: puts jobs whose worker vanished back in the queue, and re-sends lost ids.

* A ``running`` job whose lease expired (its worker was killed, or lost the database) goes back
  to ``queued`` and its id is re-sent; after ``max_attempts`` runs it fails with the reason.
* A job ``queued`` for longer than ``LORITA_REQUEUE_QUEUED_AFTER`` seconds (default 120) is
  re-sent: the broker only carries ids and may have lost one. Duplicates are harmless because
  the claim is a compare-and-set.

Every worker runs it in a thread of its main process, every ``LORITA_SWEEP_INTERVAL`` seconds
(default 15; ``LORITA_SWEEPER=0`` turns it off). Running it in several workers at once is safe:
each transition is a compare-and-set. It is also a Celery task (``lorita.sweep``) for a
``celery beat`` deployment. The main process never imports torch, so CUDA stays untouched.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from celery import signals
from sqlalchemy import select
from sqlalchemy.exc import DBAPIError

from store import lifecycle
from store.db import session_scope
from store.models import Job
from store.outage import OutageGate
from store.settings import get_settings
from worker.celery_app import TASK_SWEEP, app
from worker.dispatch import send_job
from worker.recovery import BrokerWatch, Housekeeper

log = logging.getLogger(__name__)


@dataclass
class SweepReport:
    requeued: list[str] = field(default_factory=list)
    resent: list[str] = field(default_factory=list)


def sweep(send: Callable[..., None] = send_job, queued_after_s: float | None = None) -> SweepReport:
    """One pass. Ids are sent only after the transitions are committed."""
    report = SweepReport()
    with session_scope() as session:
        report.requeued = lifecycle.requeue_expired(session)
    with session_scope() as session:
        report.resent = lifecycle.requeue_stuck_queued(
            session, get_settings().requeue_queued_after if queued_after_s is None else queued_after_s
        )
    ids = report.requeued + report.resent
    if ids:
        with session_scope() as session:
            configs: dict[str, Any] = dict(
                session.execute(select(Job.id, Job.config).where(Job.id.in_(ids))).tuples().all()
            )
        for job_id in ids:
            try:
                send(job_id, config=configs.get(job_id))
            except Exception:  # the next pass sends it again
                log.exception("could not re-send job %s", job_id)
    if report.requeued:
        log.warning("requeued jobs with expired leases: %s", ", ".join(report.requeued))
    if report.resent:
        log.info("re-sent jobs stuck in the queue: %s", ", ".join(report.resent))
    return report


@app.task(name=TASK_SWEEP, ignore_result=True)
def sweep_task() -> dict[str, Any]:
    report = sweep()
    return {"requeued": report.requeued, "resent": report.resent}


class SweeperThread(threading.Thread):
    def __init__(self, interval_s: float | None = None) -> None:
        super().__init__(name="lorita-sweeper", daemon=True)
        self.interval_s = get_settings().sweep_interval if interval_s is None else interval_s
        self.stopped = threading.Event()

    def run(self) -> None:
        broker = BrokerWatch()
        chores = Housekeeper()
        database = OutageGate("sweeper", log)
        while not self.stopped.wait(self.interval_s):
            self.sweep_once(broker, database)
            if database.failures == 0:  # housekeeping needs the database too
                chores.maybe_run()

    @staticmethod
    def sweep_once(broker: BrokerWatch, database: OutageGate) -> None:
        """One pass; with the database down, one log line per outage (not a traceback a pass)."""
        if not database.ready():
            return
        try:
            # after a broker outage or restart, ids it lost are re-sent now, not after 120 s
            sweep(queued_after_s=0.0 if broker.recovered() else None)
        except DBAPIError as err:
            database.failed(err)
        except Exception:  # anything else must not kill the thread either
            log.exception("sweep failed")
        else:
            database.succeeded()

    def stop(self) -> None:
        self.stopped.set()


_thread: SweeperThread | None = None


@signals.worker_ready.connect
def _start_sweeper(**_: Any) -> None:
    global _thread
    if not get_settings().sweeper or _thread is not None:
        return
    _thread = SweeperThread()
    _thread.start()
    log.info("sweeper running every %.0f s", _thread.interval_s)


@signals.worker_shutting_down.connect
def _stop_sweeper(**_: Any) -> None:
    if _thread is not None:
        _thread.stop()
