"""``LoritaClient`` against a real local HTTP server: a service that is down when the client
starts waiting, answers 503 for a while, then comes back; errors it must not retry; checksums."""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from cli.client import ClientError, LoritaClient, RetryPolicy
from cli.demo import free_port

FAST = RetryPolicy(first_delay_s=0.01, max_delay_s=0.05, give_up_after_s=60.0)


@dataclass
class Reply:
    status: int
    body: bytes | dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class Script:
    """Replies per (method, path), given in order; the last one repeats. Requests are recorded."""

    replies: dict[tuple[str, str], list[Reply]]
    seen: list[tuple[str, str, dict[str, str]]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def next(self, method: str, path: str, headers: dict[str, str]) -> Reply:
        with self.lock:
            self.seen.append((method, path, headers))
            queue = self.replies.get((method, path))
            if not queue:
                return Reply(404, {"detail": f"no route {method} {path}"})
            return queue.pop(0) if len(queue) > 1 else queue[0]

    def count(self, method: str, path: str) -> int:
        return sum(1 for m, p, _ in self.seen if (m, p) == (method, path))


def serve(port: int, script: Script) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def _answer(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            if length:
                self.rfile.read(length)
            reply = script.next(self.command, self.path, dict(self.headers))
            body = reply.body if isinstance(reply.body, bytes) else json.dumps(reply.body).encode()
            self.send_response(reply.status)
            kind = "application/octet-stream" if isinstance(reply.body, bytes) else "application/json"
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            for name, value in reply.headers.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = _answer

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.fixture
def port() -> int:
    return free_port()


@pytest.fixture
def servers() -> Iterator[list[ThreadingHTTPServer]]:
    started: list[ThreadingHTTPServer] = []
    yield started
    for s in started:
        s.shutdown()
        s.server_close()


def job(status: str, stage: str | None = None) -> dict[str, Any]:
    return {"id": "j1", "status": status, "stage": stage, "progress": 0.5, "error": None}


def test_waiting_rides_out_a_service_that_is_down_then_answers_503(
    port: int, servers: list[ThreadingHTTPServer]
) -> None:
    messages: list[str] = []
    refused = threading.Event()

    def on_retry(message: str) -> None:
        messages.append(message)
        if "connection refused" in message:
            refused.set()

    unavailable = Reply(503, {"detail": "the database is unreachable; retry shortly"}, {"Retry-After": "0"})
    script = Script(
        {
            ("GET", "/v1/jobs/j1"): [
                unavailable,
                unavailable,
                Reply(200, job("running", "train")),
                Reply(200, job("succeeded", "done")),
            ]
        }
    )
    updates: list[str] = []
    outcome: list[dict[str, Any]] = []
    with LoritaClient(f"http://127.0.0.1:{port}", "lrt_key", retry=FAST, on_retry=on_retry) as client:
        waiter = threading.Thread(
            target=lambda: outcome.append(
                client.wait("j1", interval_s=0.01, on_update=lambda j: updates.append(j["status"]))
            )
        )
        waiter.start()
        assert refused.wait(30), messages  # the client is polling a port nobody listens on
        servers.append(serve(port, script))  # the service comes up
        waiter.join(30)

    assert [j["status"] for j in outcome] == ["succeeded"]
    assert updates == ["running", "succeeded"]
    assert script.count("GET", "/v1/jobs/j1") == 4
    assert all(h["Authorization"] == "Bearer lrt_key" for _, _, h in script.seen)
    assert any(m.startswith("reading job j1: connection refused; retrying in ") for m in messages)
    retried_503 = [
        m for m in messages if "HTTP 503: the database is unreachable; retry shortly; retrying" in m
    ]
    assert len(retried_503) == 2
    assert messages[-1] == f"reading job j1: the service at http://127.0.0.1:{port} answers again"


def test_a_service_down_for_too_long_ends_the_wait_saying_so(port: int) -> None:
    policy = RetryPolicy(first_delay_s=0.01, max_delay_s=0.02, give_up_after_s=0.2)
    messages: list[str] = []
    expected = rf"reading job j1: the service at http://127.0.0.1:{port} has not answered for"
    client = LoritaClient(f"http://127.0.0.1:{port}", "k", retry=policy, on_retry=messages.append)
    with client, pytest.raises(ClientError, match=expected):
        client.wait("j1")
    assert messages and all("connection refused" in m for m in messages)


def test_client_errors_are_not_retried_and_carry_the_apis_message(
    port: int, servers: list[ThreadingHTTPServer]
) -> None:
    script = Script(
        {
            ("GET", "/v1/jobs/nope"): [Reply(404, {"detail": "job nope not found"})],
            ("GET", "/v1/jobs/proxy"): [Reply(400, b"<html>bad request</html>")],
        }
    )
    servers.append(serve(port, script))
    with LoritaClient(f"http://127.0.0.1:{port}", "k", retry=FAST, on_retry=pytest.fail) as client:
        with pytest.raises(ClientError, match=r"^reading job nope: HTTP 404: job nope not found$"):
            client.job("nope")
        with pytest.raises(ClientError, match=r"HTTP 400: Bad Request \(not a lorita API response\)"):
            client.job("proxy")
    assert script.count("GET", "/v1/jobs/nope") == 1


def test_a_retried_submission_carries_one_idempotency_key(
    port: int, servers: list[ThreadingHTTPServer]
) -> None:
    script = Script({("POST", "/v1/jobs"): [Reply(502, b"bad gateway"), Reply(202, job("queued"))]})
    servers.append(serve(port, script))
    messages: list[str] = []
    with LoritaClient(f"http://127.0.0.1:{port}", "k", retry=FAST, on_retry=messages.append) as client:
        assert client.submit({"model": {"arch": "fcn"}})["status"] == "queued"
    keys = [h["Idempotency-Key"] for m, _, h in script.seen if m == "POST"]
    assert len(keys) == 2 and keys[0] == keys[1] and keys[0].startswith("lorita-")
    assert "HTTP 502: Bad Gateway (not a lorita API response); retrying" in messages[0]


def test_downloads_are_checked_against_the_listing_and_the_header(
    port: int, servers: list[ThreadingHTTPServer], tmp_path: Path
) -> None:
    payload = bytes(range(256)) * 64
    digest = hashlib.sha256(payload).hexdigest()
    script = Script(
        {
            ("GET", "/v1/jobs/j1/artifacts"): [
                Reply(
                    200,
                    {
                        "data": [
                            {"name": "model.onnx", "sha256": digest},
                            {"name": "bad.bin", "sha256": digest},
                        ],
                        "count": 2,
                    },
                )
            ],
            ("GET", "/v1/jobs/j1/artifacts/model.onnx"): [
                Reply(503, {"detail": "artifact store unreachable"}, {"Retry-After": "0"}),
                Reply(200, payload, {"X-Checksum-SHA256": digest}),
            ],
            ("GET", "/v1/jobs/j1/artifacts/bad.bin"): [
                Reply(200, payload[:-1], {"X-Checksum-SHA256": digest})
            ],
        }
    )
    servers.append(serve(port, script))
    messages: list[str] = []
    client = LoritaClient(f"http://127.0.0.1:{port}", "k", retry=FAST, on_retry=messages.append)
    with (
        client,
        pytest.raises(ClientError, match=r"bad\.bin: sha256 \w+ does not match the response header's"),
    ):
        client.download_artifacts("j1", tmp_path)
    assert (tmp_path / "model.onnx").read_bytes() == payload
    assert not (tmp_path / "bad.bin").exists() and not list(tmp_path.glob(".*.part"))
    assert any(
        "downloading model.onnx: HTTP 503: artifact store unreachable; retrying" in m for m in messages
    )
