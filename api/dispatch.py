"""How the API hands a committed job to the workers, and how it checks the broker.

Both are dependencies so tests (and the embedded mode) can replace them. The real ones live in
``worker.dispatch`` (``send_job(job_id, config=...)`` and ``ping()``), imported lazily so the API starts
without the worker package's dependencies.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any, Protocol


class Dispatcher(Protocol):
    def send(self, job_id: str, config: Mapping[str, Any] | None = None) -> None:
        """Enqueue ``job_id``; called only after the job row is committed. May raise.

        ``config`` is the stored job config; its ``device`` picks the queue (gpu or cpu)."""
        ...


class WorkerDispatcher:
    """Sends through ``worker.dispatch.send_job``."""

    def send(self, job_id: str, config: Mapping[str, Any] | None = None) -> None:
        module = importlib.import_module("worker.dispatch")
        module.send_job(job_id, config=config)


def get_dispatcher() -> Dispatcher:
    return WorkerDispatcher()


def _worker_ping() -> None:
    try:
        module = importlib.import_module("worker.dispatch")
    except ImportError:
        return  # embedded mode without a worker package: nothing to reach
    ping = getattr(module, "ping", None)
    if ping is not None:
        ping()


def get_broker_ping() -> Callable[[], None]:
    """A callable that returns when the broker is reachable and raises otherwise."""
    return _worker_ping
