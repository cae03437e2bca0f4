"""Following a job through ``GET /v1/jobs/{id}/stream`` (server-sent events) instead of polling.

:func:`follow_stream` reads the stream, reconnecting with ``Last-Event-ID`` when the server ends
it early or the connection drops, and hands each ``progress`` event (shaped like the job that
``GET /v1/jobs/{id}`` returns: status, stage, progress, epoch, epochs, metrics) to ``on_update``.
It returns True once the job has ended, or False when the server has no stream (an older
service, a proxy that buffers) so that the caller polls instead.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx

READ_TIMEOUT_S = 60.0  # the server sends a heartbeat at least every 15 s
MAX_RECONNECTS = 20
RECONNECT_DELAY_S = 1.0


class StreamUnavailable(Exception):
    """The server offers no event stream for this job (the caller polls instead)."""


def parse_events(lines: Iterator[str]) -> Iterator[tuple[str, str, str | None]]:
    """(event, data, id) of each event in a ``text/event-stream`` body; comments skipped."""
    event, data, ident = "message", list[str](), None
    for line in lines:
        if line == "":
            if data:
                yield event, "\n".join(data), ident
            event, data, ident = "message", [], None
            continue
        if line.startswith(":"):
            continue
        field, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if field == "event":
            event = value
        elif field == "data":
            data.append(value)
        elif field == "id":
            ident = value


def follow_stream(
    http: httpx.Client,
    job_id: str,
    on_update: Callable[[dict[str, Any]], None],
    *,
    sleep: Callable[[float], None] = time.sleep,
) -> bool:
    """Follow the job's stream until its ``end`` event (True); False when there is no stream."""
    last_id: str | None = None
    failures = 0
    connected = False  # a first try that fails is no stream: the caller's polling rides it out
    while failures <= MAX_RECONNECTS:
        headers = {"Accept": "text/event-stream"}
        if last_id is not None:
            headers["Last-Event-ID"] = last_id
        try:
            with http.stream(
                "GET",
                f"/v1/jobs/{job_id}/stream",
                headers=headers,
                timeout=httpx.Timeout(30.0, read=READ_TIMEOUT_S),
            ) as resp:
                kind = resp.headers.get("content-type", "")
                if resp.status_code != 200 or not kind.startswith("text/event-stream"):
                    if resp.status_code in (404, 405, 406, 501) or resp.status_code < 400:
                        return False  # no stream here (404 also for an unknown job: polling says so)
                    raise httpx.TransportError(f"HTTP {resp.status_code}")
                connected = True
                for event, data, ident in parse_events(resp.iter_lines()):
                    if ident is not None:
                        last_id = ident
                    if event == "progress":
                        failures = 0
                        on_update(json.loads(data))
                    elif event == "end":
                        return True
                    elif event == "reconnect":
                        failures = 0  # the server's time limit, not a failure
        except httpx.TransportError:
            if not connected:
                return False
            # a dropped connection or a restart: reconnect below
        failures += 1
        sleep(RECONNECT_DELAY_S)
    return False
