"""Noticing that the broker lost its messages, so lost job ids are re-sent at once.

Redis keeps its queue in memory: a restart without persistence loses every job id waiting in it.
The database still has those jobs ``queued``, and the sweeper re-sends ids of jobs queued longer
than ``LORITA_REQUEUE_QUEUED_AFTER`` (120 s). :class:`BrokerWatch` shortens that wait to the
next sweep: it answers True once after the broker was unreachable and is back, or when Redis's
``run_id`` changed since the last look (a restart between two sweeps). Re-sending every queued
job then is harmless: a duplicate message is a no-op (the claim is a compare-and-set).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

log = logging.getLogger(__name__)


def redis_run_id() -> str | None:
    """The broker's identity: Redis's run_id (a new one at every start); None for other brokers."""
    from worker.celery_app import app

    with app.connection_for_write() as conn:
        conn.ensure_connection(max_retries=1, timeout=2)
        if conn.transport.driver_type != "redis":
            return None
        info = conn.default_channel.client.info("server")
        return str(info.get("run_id"))


class BrokerWatch:
    def __init__(self, probe: Callable[[], str | None] = redis_run_id) -> None:
        self.probe = probe
        self.down = False
        self.run_id: str | None = None

    def recovered(self) -> bool:
        """True once after an outage or a restart of the broker; False otherwise (and while down)."""
        try:
            run_id = self.probe()
        except Exception as err:
            if not self.down:
                log.warning(
                    "broker unreachable (%s); queued jobs are re-sent when it is back", type(err).__name__
                )
            self.down = True
            return False
        restarted = self.run_id is not None and run_id is not None and run_id != self.run_id
        came_back = self.down
        self.down, self.run_id = False, run_id
        if came_back or restarted:
            log.warning("broker %s: re-sending every queued job now", "restarted" if restarted else "is back")
            return True
        return False


class Housekeeper:
    """Runs ``store.housekeeping`` at most every ``LORITA_HOUSEKEEPING_INTERVAL`` seconds."""

    def __init__(self) -> None:
        self.last: float | None = None

    def maybe_run(self) -> None:
        import time

        from store.artifacts import get_artifact_store
        from store.housekeeping import housekeeping
        from store.settings import get_settings

        settings = get_settings()
        now = time.monotonic()
        if self.last is not None and now - self.last < settings.housekeeping_interval:
            return
        self.last = now
        try:
            housekeeping(get_artifact_store(settings), settings.artifact_retention_days)
        except Exception:  # a store or database hiccup: the next pass tries again
            log.exception("housekeeping failed")
