"""Structured logs: one JSON object per line, with the request id and the job id of the line.

``LORITA_LOG_FORMAT=json`` (the docker image's default) makes every logger of the process (ours,
uvicorn's, celery's) write JSON through one handler on stderr; ``text`` keeps plain lines with
the same fields appended. The ids come from context variables: the API's middleware sets
``request_id`` for the request it serves; the worker sets ``job_id`` (and the ``request_id`` of
the request that submitted the job, carried in the broker message's headers) for the job it runs.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

request_id_var: ContextVar[str | None] = ContextVar("lorita_request_id", default=None)
job_id_var: ContextVar[str | None] = ContextVar("lorita_job_id", default=None)

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
# loggers that bring their own handlers; they are pointed at ours so every line has one shape
_FOREIGN_LOGGERS = ("uvicorn", "uvicorn.error", "uvicorn.access", "celery", "celery.task", "celery.worker")


def clean_request_id(value: str | None) -> str | None:
    """A client's ``X-Request-ID`` if it is a plain token (no spaces, quotes or newlines that could
    forge log lines), else None (a fresh id is made)."""
    return value if value and _REQUEST_ID.match(value) else None


class ContextFilter(logging.Filter):
    """Adds ``request_id`` and ``job_id`` (or None) to every record."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "request_id", None) is None:
            record.request_id = request_id_var.get()
        if getattr(record, "job_id", None) is None:
            record.job_id = job_id_var.get()
        return True


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        ids = [
            f"{name}={value}"
            for name in ("request_id", "job_id")
            if (value := getattr(record, name, None)) is not None
        ]
        return f"{line} [{' '.join(ids)}]" if ids else line


def make_handler(fmt: str) -> logging.Handler:
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(ContextFilter())
    if fmt == "json":
        from pythonjsonlogger.json import JsonFormatter

        handler.setFormatter(
            JsonFormatter(
                "%(asctime)s %(levelname)s %(name)s %(message)s %(request_id)s %(job_id)s %(process)d",
                rename_fields={"asctime": "time", "levelname": "level", "name": "logger", "process": "pid"},
                timestamp=False,
            )
        )
    else:
        handler.setFormatter(TextFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.set_name("lorita")
    return handler


def configure_logging(fmt: str = "text", level: str | int = "INFO") -> None:
    """Route every logger of this process through one ``lorita`` handler (idempotent)."""
    root = logging.getLogger()
    root.handlers = [h for h in root.handlers if h.get_name() != "lorita"]
    handler = make_handler(fmt)
    root.addHandler(handler)
    root.setLevel(level)
    for name in _FOREIGN_LOGGERS:
        foreign = logging.getLogger(name)
        if foreign.handlers:
            foreign.handlers = [handler]
            foreign.propagate = False


@contextmanager
def job_context(job_id: str, request_id: str | None = None) -> Iterator[None]:
    """Log lines inside carry ``job_id`` (and the submitting request's id)."""
    job_token = job_id_var.set(job_id)
    request_token = request_id_var.set(request_id)
    try:
        yield
    finally:
        request_id_var.reset(request_token)
        job_id_var.reset(job_token)
