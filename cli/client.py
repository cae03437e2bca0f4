"""``LoritaClient``: the HTTP client of the service, used by ``lorita submit``, the demo and the
benchmarks.

It reads the responses the API sends (JSON bodies, errors as ``{"detail": "..."}``, artifacts
with ``X-Checksum-SHA256``) and nothing else. Reads (``GET``) and job submission (``POST
/v1/jobs`` with an ``Idempotency-Key``, so a retry never makes a second job) are retried when the
service cannot be reached or answers 5xx, with exponential backoff (honouring ``Retry-After``),
saying so through ``on_retry``; uploads are not retried. A service down for longer than
``RetryPolicy.give_up_after_s`` ends the wait with a :class:`ClientError`.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from store.status import JobStatus

RETRYABLE_STATUS = frozenset({500, 502, 503, 504})
CHECKSUM_HEADER = "X-Checksum-SHA256"


class ClientError(Exception):
    """A failure to report to the person at the terminal."""


class _Retryable(Exception):
    """One failed try that may succeed later: the service is unreachable or answered 5xx."""

    def __init__(self, reason: str, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after


@dataclass(frozen=True)
class RetryPolicy:
    """Backoff while the service is unreachable: ``first_delay_s``, doubled up to ``max_delay_s``,
    for at most ``give_up_after_s`` of continuous failure."""

    first_delay_s: float = 0.5
    max_delay_s: float = 10.0
    give_up_after_s: float = 600.0


def _say(message: str) -> None:
    print(f"lorita: {message}", file=sys.stderr)


def _retry_after(resp: httpx.Response) -> float | None:
    value = resp.headers.get("Retry-After")
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


def _detail(resp: httpx.Response) -> str:
    """The API's error message; a response that is not the API's JSON says what it was."""
    try:
        body = resp.json()
    except ValueError:
        body = None
    if isinstance(body, dict) and isinstance(body.get("detail"), str):
        return str(body["detail"])
    return f"{resp.reason_phrase} (not a lorita API response)"


def _transport_reason(err: httpx.TransportError) -> str:
    if isinstance(err, httpx.ConnectError):
        return "connection refused" if "refused" in str(err).lower() else f"cannot connect ({err})"
    if isinstance(err, httpx.TimeoutException):
        return "no answer in time"
    return f"connection lost ({type(err).__name__})"


class LoritaClient:
    """The service at ``url`` as ``key``'s tenant (``key`` may be None for the probes)."""

    def __init__(
        self,
        url: str,
        key: str | None = None,
        *,
        timeout_s: float = 60.0,
        retry: RetryPolicy | None = None,
        on_retry: Callable[[str], None] = _say,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        self.retry = retry or RetryPolicy()
        self.on_retry = on_retry
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self._http = httpx.Client(
            base_url=self.url, headers=headers, timeout=httpx.Timeout(timeout_s), transport=transport
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> LoritaClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ----------------------------------------------------------------------------------------
    # requests

    def _retrying(self, what: str, attempt: Callable[[], Any]) -> Any:
        """``attempt()`` until it does not raise :class:`_Retryable`, backing off meanwhile."""
        delay = self.retry.first_delay_s
        failing_since: float | None = None
        while True:
            try:
                result = attempt()
            except _Retryable as failure:
                now = time.monotonic()
                failing_since = now if failing_since is None else failing_since
                if now - failing_since >= self.retry.give_up_after_s:
                    raise ClientError(
                        f"{what}: the service at {self.url} has not answered for "
                        f"{now - failing_since:.0f} s ({failure.reason}); giving up"
                    ) from None
                wait = min(self.retry.max_delay_s, max(delay, failure.retry_after or 0.0))
                self.on_retry(f"{what}: {failure.reason}; retrying in {wait:.1f} s")
                time.sleep(wait)
                delay = min(self.retry.max_delay_s, delay * 2)
                continue
            if failing_since is not None:
                self.on_retry(f"{what}: the service at {self.url} answers again")
            return result

    def _send(self, method: str, path: str, what: str, **kwargs: Any) -> httpx.Response:
        """One try; a 4xx is a :class:`ClientError`, a refused connection or a 5xx retryable."""
        try:
            resp = self._http.request(method, path, **kwargs)
        except httpx.TransportError as err:
            raise _Retryable(_transport_reason(err)) from None
        if resp.status_code in RETRYABLE_STATUS:
            raise _Retryable(f"HTTP {resp.status_code}: {_detail(resp)}", _retry_after(resp))
        if resp.status_code >= 400:
            raise ClientError(f"{what}: HTTP {resp.status_code}: {_detail(resp)}")
        return resp

    def _call(self, method: str, path: str, what: str, *, retry: bool = True, **kwargs: Any) -> Any:
        """The JSON body of ``method path``; retried while the service is down when ``retry``."""

        def attempt() -> Any:
            return self._send(method, path, what, **kwargs).json()

        if retry:
            return self._retrying(what, attempt)
        try:
            return attempt()
        except _Retryable as failure:
            raise ClientError(f"{what}: {failure.reason} from the service at {self.url}") from None

    # ----------------------------------------------------------------------------------------
    # endpoints

    def ready(self) -> bool:
        """True when ``/readyz`` answers 200 (database and broker reachable); never retried."""
        try:
            return self._http.get("/readyz", timeout=2.0).status_code == 200
        except httpx.TransportError:
            return False

    def upload_model(
        self,
        path: Path,
        *,
        arch: str,
        num_classes: int,
        input_shape: list[int],
        options: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        data = {
            "arch": arch,
            "name": path.name,
            "num_classes": str(num_classes),
            "input_shape": ",".join(str(d) for d in input_shape),
        }
        if options:
            data["options"] = json.dumps(dict(options))
        return self._upload("/v1/models", path, data)

    def upload_program(self, path: Path) -> dict[str, Any]:
        """A torch.export program (.pt2): a model of kind ``program`` (no arch, shape or classes)."""
        return self._upload("/v1/models", path, {"name": path.name})

    def upload_dataset(self, path: Path) -> dict[str, Any]:
        return self._upload("/v1/datasets", path, {"name": path.name})

    def _upload(self, route: str, path: Path, data: dict[str, str]) -> dict[str, Any]:
        """``POST route`` with the file as the form's ``file`` and ``data`` beside it; never retried."""
        with path.open("rb") as f:
            files = {"file": (path.name, f, "application/octet-stream")}
            return dict(self._call("POST", route, f"uploading {path}", retry=False, data=data, files=files))

    def submit(self, config: Mapping[str, Any], idempotency_key: str | None = None) -> dict[str, Any]:
        """``POST /v1/jobs``; retried safely: every try carries the same ``Idempotency-Key``."""
        headers = {"Idempotency-Key": idempotency_key or f"lorita-{uuid.uuid4().hex}"}
        return dict(self._call("POST", "/v1/jobs", "submitting the job", json=dict(config), headers=headers))

    def job(self, job_id: str) -> dict[str, Any]:
        return dict(self._call("GET", f"/v1/jobs/{job_id}", f"reading job {job_id}"))

    def cancel(self, job_id: str) -> dict[str, Any]:
        return dict(self._call("POST", f"/v1/jobs/{job_id}/cancel", f"canceling job {job_id}", retry=False))

    def report(self, job_id: str) -> dict[str, Any]:
        return dict(self._call("GET", f"/v1/jobs/{job_id}/report", "reading the report"))

    def artifacts(self, job_id: str) -> list[dict[str, Any]]:
        return list(self._call("GET", f"/v1/jobs/{job_id}/artifacts", "listing artifacts")["data"])

    def select(
        self, job_id: str, body: Mapping[str, Any], idempotency_key: str | None = None
    ) -> dict[str, Any]:
        """``POST /v1/jobs/{id}/select``: a derived job (another operating point, no training);
        retried safely: every try carries the same ``Idempotency-Key``."""
        headers = {"Idempotency-Key": idempotency_key or f"lorita-{uuid.uuid4().hex}"}
        what = f"choosing another operating point of job {job_id}"
        return dict(self._call("POST", f"/v1/jobs/{job_id}/select", what, json=dict(body), headers=headers))

    def wait(
        self,
        job_id: str,
        *,
        interval_s: float = 1.0,
        on_update: Callable[[dict[str, Any]], None] | None = None,
        stream: bool = True,
    ) -> dict[str, Any]:
        """Follow the job until it has finished: through its event stream where the service
        offers one (``cli.events``), else by polling; ``on_update`` sees every state read."""
        if stream:
            from cli.events import follow_stream

            if follow_stream(self._http, job_id, on_update or (lambda _: None)):
                job = self.job(job_id)
                if on_update is not None:
                    on_update(job)
                if JobStatus(job["status"]).finished:
                    return job
        while True:
            job = self.job(job_id)
            if on_update is not None:
                on_update(job)
            if JobStatus(job["status"]).finished:
                return job
            time.sleep(interval_s)

    @contextmanager
    def _stream(self, path: str, what: str) -> Iterator[httpx.Response]:
        try:
            with self._http.stream("GET", path) as resp:
                if resp.status_code >= 400:
                    resp.read()
                    if resp.status_code in RETRYABLE_STATUS:
                        raise _Retryable(f"HTTP {resp.status_code}: {_detail(resp)}", _retry_after(resp))
                    raise ClientError(f"{what}: HTTP {resp.status_code}: {_detail(resp)}")
                yield resp
        except httpx.TransportError as err:
            raise _Retryable(_transport_reason(err)) from None

    def download(self, job_id: str, artifact: Mapping[str, Any], out: Path) -> Path:
        """One artifact (an item of :meth:`artifacts`) into ``out``, its sha256 checked against
        the listing and the response header; a broken transfer starts over."""
        name = str(artifact["name"])
        if "/" in name or "\\" in name or name in ("", ".", ".."):
            raise ClientError(f"refusing artifact name {name!r}")
        dest = out / name
        tmp = dest.with_name(f".{name}.part")
        what = f"downloading {name}"

        def attempt() -> Path:
            digest = hashlib.sha256()
            with self._stream(f"/v1/jobs/{job_id}/artifacts/{name}", what) as resp, tmp.open("wb") as f:
                header = resp.headers[CHECKSUM_HEADER]
                try:
                    for chunk in resp.iter_bytes():
                        digest.update(chunk)
                        f.write(chunk)
                except httpx.TransportError as err:
                    raise _Retryable(_transport_reason(err)) from None
            got = digest.hexdigest()
            for expected, source in ((header, "response header"), (artifact["sha256"], "listing")):
                if expected != got:
                    tmp.unlink(missing_ok=True)
                    raise ClientError(f"{name}: sha256 {got} does not match the {source}'s {expected}")
            tmp.replace(dest)
            return dest

        out.mkdir(parents=True, exist_ok=True)
        return Path(self._retrying(what, attempt))

    def download_artifacts(self, job_id: str, out: Path) -> list[Path]:
        """Every artifact of the job into ``out``, each sha256 checked."""
        return [self.download(job_id, item, out) for item in self.artifacts(job_id)]
