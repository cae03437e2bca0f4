"""/metrics in Prometheus text, request ids in and out, and JSON log lines that carry them."""

from __future__ import annotations

import io
import json
import logging
import uuid
from typing import Any

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from api.metrics import _add_request_id_to_message
from store.logging import clean_request_id, job_context, make_handler, request_id_var
from tests.api.conftest import Caller

pytestmark = pytest.mark.postgres


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def count(text: str, method: str, route: str, status: str) -> float:
    key = ("lorita_http_requests_total", (("method", method), ("route", route), ("status", status)))
    return samples(text).get(key, 0.0)


def test_requests_are_counted_by_route_template_and_status(client: TestClient, alice: Caller) -> None:
    route = "/v1/jobs/{job_id}"
    before = client.get("/metrics").text
    for _ in range(3):
        assert client.get(f"/v1/jobs/{uuid.uuid4().hex}", headers=alice.headers).status_code == 404
    client.get("/no/such/path")

    resp = client.get("/metrics")

    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/plain")
    after = resp.text
    assert count(after, "GET", route, "404") - count(before, "GET", route, "404") == 3
    assert count(after, "GET", "<unmatched>", "404") >= 1
    assert "/v1/jobs/" + "0" * 32 not in after  # raw paths never become labels
    hist = samples(after)
    key = ("lorita_http_request_duration_seconds_count", (("method", "GET"), ("route", route)))
    assert hist[key] >= 3
    statuses = {dict(labels)["status"] for name, labels in hist if name == "lorita_jobs"}
    assert statuses == {"queued", "running", "succeeded", "failed", "canceled"}


@pytest.mark.parametrize(
    ("sent", "kept"),
    [
        ("abc-123_x.y:z", True),
        ("two words", False),
        ("a" * 129, False),
        ('x"\ninjected', False),
        (None, False),
    ],
)
def test_request_id_is_echoed_when_safe_and_made_otherwise(
    client: TestClient, sent: str | None, kept: bool
) -> None:
    headers = {"X-Request-ID": sent} if sent is not None else {}

    resp = client.get("/healthz", headers=headers)

    rid = resp.headers["x-request-id"]
    assert (rid == sent) is kept
    assert clean_request_id(rid) == rid


def test_a_json_log_line_carries_the_request_and_job_ids() -> None:
    stream = io.StringIO()
    handler = make_handler("json")
    handler.setStream(stream)  # type: ignore[attr-defined]
    logger = logging.getLogger("lorita.test.json")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        with job_context("job123", request_id="req456"):
            logger.warning("epoch %d done", 3)
        logger.warning("outside")
    finally:
        logger.removeHandler(handler)
    first, second = (json.loads(line) for line in stream.getvalue().splitlines())
    assert first["message"] == "epoch 3 done" and first["level"] == "WARNING"
    assert (first["job_id"], first["request_id"]) == ("job123", "req456")
    assert (second["job_id"], second["request_id"]) == (None, None)
    assert first["logger"] == "lorita.test.json" and "time" in first


def test_a_job_sent_while_serving_a_request_carries_its_id() -> None:
    headers: dict[str, Any] = {}
    token = request_id_var.set("req-789")
    try:
        _add_request_id_to_message(headers=headers, body=None)
    finally:
        request_id_var.reset(token)
    assert headers == {"lorita_request_id": "req-789"}
    outside: dict[str, Any] = {}
    _add_request_id_to_message(headers=outside)
    assert outside == {}
