"""``/metrics`` (Prometheus text) and the request-id middleware of the API.

Metrics (prometheus_client):

* ``lorita_http_requests_total{method,route,status}``: ``route`` is the route template
  (``/v1/jobs/{job_id}``), never the raw path, so ids do not explode the label set; a path no
  route matches counts as ``<unmatched>``.
* ``lorita_http_request_duration_seconds{method,route}``: a histogram, until the response ends.
* ``lorita_jobs{status}``: jobs by status, counted in the database at scrape time (a scrape while
  the database is down leaves it out rather than failing).

With several API processes (``lorita serve --workers N``) each process counts its own requests;
Prometheus sums the scrapes (or set ``PROMETHEUS_MULTIPROC_DIR``, prometheus_client's own
multi-process mode). ``/metrics`` needs no API key (the usual Prometheus convention: it shows
counts, never tenants or ids); keep it off the public side of a proxy.

Request ids: ``X-Request-ID`` from the client (a plain token up to 128 characters) or a fresh
one; it is on the response, on every log line of the request, and in the headers of the broker
message of a job the request submits, so the worker's lines for that job carry it too.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Iterable
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import Response
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from store.logging import clean_request_id, request_id_var
from store.settings import Settings
from store.status import JobStatus

log = logging.getLogger("lorita.api")

REQUESTS = Counter(
    "lorita_http_requests",
    "HTTP requests answered, by route template and status.",
    ["method", "route", "status"],
)
LATENCY = Histogram(
    "lorita_http_request_duration_seconds",
    "Time from the request's arrival to the end of its response, by route template.",
    ["method", "route"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
UNMATCHED = "<unmatched>"
PROMETHEUS_TEXT = "text/plain; version=0.0.4; charset=utf-8"

router = APIRouter(tags=["health"])


def route_template(app: Any, scope: Scope) -> str:
    route = scope.get("route")
    if route is not None and hasattr(route, "path"):
        return str(route.path)
    for candidate in getattr(app, "routes", ()):
        match, _ = candidate.matches(scope)
        if match == Match.FULL:
            return str(getattr(candidate, "path", UNMATCHED))
    return UNMATCHED


class RequestMetrics:
    """Pure ASGI (a streamed download is not buffered): request id in and out, counts, latency."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = None
        for name, value in scope.get("headers", ()):
            if name == b"x-request-id":
                incoming = clean_request_id(value.decode("latin-1"))
                break
        request_id = incoming or uuid.uuid4().hex
        token = request_id_var.set(request_id)
        started = time.perf_counter()
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", request_id.encode())]
            await self.app_send(send, message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            route = route_template(scope.get("app"), scope)
            method = scope.get("method", "GET")
            REQUESTS.labels(method, route, str(status)).inc()
            LATENCY.labels(method, route).observe(time.perf_counter() - started)
            request_id_var.reset(token)

    @staticmethod
    async def app_send(send: Send, message: Message) -> None:
        await send(message)


class JobsByStatus(Collector):
    def __init__(self, database_url: str) -> None:
        self.database_url = database_url

    def collect(self) -> Iterable[Metric]:
        from sqlalchemy import func, select

        from store.db import session_scope
        from store.models import Job

        try:
            with session_scope(self.database_url) as session:
                counts = dict(
                    session.execute(select(Job.status, func.count()).group_by(Job.status)).tuples().all()
                )
        except Exception as err:  # a scrape during a database outage: leave the gauge out
            log.warning("metrics: jobs by status unavailable: %s", type(err).__name__)
            return
        family = GaugeMetricFamily("lorita_jobs", "Jobs by status.", labels=["status"])
        for status in JobStatus:
            family.add_metric([status.value], counts.get(status, 0))
        yield family


@router.get("/metrics", summary="Prometheus metrics", response_class=Response, include_in_schema=True)
def metrics(request: Request) -> Response:
    registry: CollectorRegistry = request.app.state.metrics_registry
    body = generate_latest(REGISTRY) + generate_latest(registry)
    return Response(body, media_type=PROMETHEUS_TEXT)


def _add_request_id_to_message(headers: dict[str, Any] | None = None, **_: Any) -> None:
    """celery ``before_task_publish``: a job sent while serving a request carries its id."""
    request_id = request_id_var.get()
    if headers is not None and request_id is not None:
        headers["lorita_request_id"] = request_id


def install_metrics(app: FastAPI, settings: Settings) -> None:
    from celery import signals

    registry = CollectorRegistry(auto_describe=True)
    registry.register(JobsByStatus(settings.database_url))
    app.state.metrics_registry = registry
    app.include_router(router)
    app.add_middleware(RequestMetrics)
    signals.before_task_publish.connect(
        _add_request_id_to_message, weak=False, dispatch_uid="lorita-request-id"
    )
