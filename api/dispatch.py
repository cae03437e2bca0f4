"""How the API hands a committed job to the workers, and how it checks the broker.

Both are dependencies so tests (and the embedded mode) can replace them. The real ones live in
``worker.dispatch`` (``send_job(job_id)`` and ``ping()``), imported lazily so the API starts
without the worker package's dependencies.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Protocol


class Dispatcher(Protocol):
    def send(self, job_id: str) -> None:
        """Enqueue ``job_id``; called only after the job row is committed. May raise."""
        ...


class WorkerDispatcher:
    """Sends through ``worker.dispatch.send_job``."""

    def send(self, job_id: str) -> None:
        module = importlib.import_module("worker.dispatch")
        module.send_job(job_id)


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
