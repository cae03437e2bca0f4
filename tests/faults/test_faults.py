"""Faults, proven with real processes on our own PostgreSQL and Redis (see conftest.py).

Each scenario breaks one thing while jobs run and then checks the same invariants: every job ends
exactly once (one result row, one artifact row per name), its files are exactly one attempt folder
whose bytes match the recorded sha256 (downloaded through the API), and while a dependency is down
clients get answers (200/202, or 503 with Retry-After), never a 500.
"""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.faults.conftest import Rig

pytestmark = [pytest.mark.faults, pytest.mark.e2e, pytest.mark.slow]  # e2e: `-m "not e2e"` skips them too

DONE = ("succeeded", "failed", "canceled")


def job_config(epochs: int = 3, n_train: int = 1500, width: int = 32, dim: int = 32) -> dict[str, Any]:
    return {
        "model": {"arch": "fcn", "options": {"depth": 2, "width": width}},
        "dataset": {
            "name": "synthetic",
            "num_classes": 4,
            "input_shape": [dim],
            "n_train": n_train,
            "n_test": 200,
        },
        "train": {"factors": 2, "epochs": epochs, "batch_size": 32},
        "compress": {"policy": "global", "keep": 0.5},
        "measure": {"latency": False},
        "export": ["safetensors"],
        "device": "cpu",
    }


def call(fn: Callable[[], httpx.Response], timeout: float = 60.0) -> httpx.Response:
    """Retry through refused connections and 503s (a dependency or the API restarting)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            resp = fn()
            if resp.status_code != 503:
                return resp
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError("the service did not answer in time")
        time.sleep(0.3)


def submit(rig: Rig, config: dict[str, Any]) -> str:
    with rig.client() as client:
        resp = call(lambda: client.post("/v1/jobs", json=config))
    assert resp.status_code == 202, resp.text
    return str(resp.json()["id"])


def wait_for(
    rig: Rig, job_id: str, done: Callable[[dict[str, Any]], bool], timeout: float = 120.0
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    job: dict[str, Any] = {}
    with rig.client() as client:
        while time.monotonic() < deadline:
            resp = call(lambda: client.get(f"/v1/jobs/{job_id}"))
            job = resp.json()
            if done(job):
                return job
            time.sleep(0.3)
    raise AssertionError(f"job {job_id} did not get there in {timeout:.0f} s: {job}")


def ended(job: dict[str, Any]) -> bool:
    return job["status"] in DONE


def training(min_epoch: int) -> Callable[[dict[str, Any]], bool]:
    return lambda j: j["status"] == "running" and j["stage"] == "train" and (j["epoch"] or 0) >= min_epoch


def sql(rig: Rig, query: str, *args: Any) -> list[tuple[Any, ...]]:
    with psycopg.connect(f"postgresql://postgres@127.0.0.1:{rig.pg.port}/lorita") as conn:
        return list(conn.execute(query, args).fetchall())


def assert_ended_once_with_verified_files(rig: Rig, job_id: str) -> dict[str, Any]:
    job = wait_for(rig, job_id, ended)
    assert job["status"] == "succeeded", job
    assert sql(rig, "SELECT count(*) FROM results WHERE job_id = %s", job_id) == [(1,)]
    rows = sql(rig, "SELECT name, sha256, location, size_bytes FROM artifacts WHERE job_id = %s", job_id)
    assert rows and len({r[0] for r in rows}) == len(rows)
    folder = f"a{job['attempt']}"
    assert {r[2].split("/")[4] for r in rows} == {folder}
    with rig.client(timeout=30) as client:
        for name, sha256, _, size in rows:
            url = f"/v1/jobs/{job_id}/artifacts/{name}"
            got = call(lambda url=url: client.get(url))  # type: ignore[misc]
            assert got.status_code == 200 and len(got.content) == size
            assert hashlib.sha256(got.content).hexdigest() == sha256 == got.headers["x-checksum-sha256"]
    tenant = rows[0][2].split("/")[1]
    job_dir = rig.root / "var" / "artifacts" / "tenants" / tenant / "jobs" / job_id
    deadline = time.monotonic() + 20  # the worker's own clean-up, else the housekeeping pass
    while sorted(p.name for p in job_dir.iterdir()) != [folder] and time.monotonic() < deadline:
        time.sleep(0.5)
    assert sorted(p.name for p in job_dir.iterdir()) == [folder]  # no work/, no superseded a<N>/
    return job


def train_epochs(rig: Rig, job_id: str) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for attempt, epoch in sql(
        rig,
        "SELECT attempt, epoch FROM job_events WHERE job_id = %s AND stage = 'train' AND epoch IS NOT NULL",
        job_id,
    ):
        out.setdefault(attempt, []).append(epoch)
    return out


class Poller(threading.Thread):
    """Hits read and write routes until stopped; records every status code (None: no connection)."""

    def __init__(self, rig: Rig, job_id: str) -> None:
        super().__init__(daemon=True)
        self.rig, self.job_id = rig, job_id
        self.codes: list[int | None] = []
        self.retry_after: list[str] = []
        self.halt = threading.Event()

    def run(self) -> None:
        with self.rig.client(timeout=5) as client:
            while not self.halt.is_set():
                for method, url in (
                    ("GET", f"/v1/jobs/{self.job_id}"),
                    ("GET", "/v1/jobs"),
                    ("GET", "/v1/models"),
                ):
                    try:
                        resp = client.request(method, url)
                        self.codes.append(resp.status_code)
                        if resp.status_code == 503:
                            self.retry_after.append(resp.headers.get("retry-after", ""))
                    except httpx.TransportError:
                        self.codes.append(None)
                time.sleep(0.1)

    def stop(self) -> list[int | None]:
        self.halt.set()
        self.join(timeout=10)
        return self.codes


def test_worker_killed_mid_training_resumes_from_its_checkpoint_once(rig: Rig) -> None:
    rig.start_worker("a")
    job_id = submit(rig, job_config(epochs=8, n_train=6000))
    wait_for(rig, job_id, training(3))

    rig.stop_worker("a", sig=signal.SIGKILL)
    rig.start_worker("b", LORITA_WORKER_METRICS_PORT=str(rig.port + 1))
    job = assert_ended_once_with_verified_files(rig, job_id)

    assert job["attempt"] == 2
    epochs = train_epochs(rig, job_id)
    assert max(epochs[1]) >= 3 and min(epochs[2]) > 1  # resumed, not restarted


def test_redis_outage_loses_queued_messages_and_they_are_resent_when_it_is_back(rig: Rig) -> None:
    long_job = submit(rig, job_config(epochs=6, n_train=6000))
    wait_for(rig, long_job, training(1))
    waiting = submit(rig, job_config(epochs=2))  # its message waits in Redis behind the running job

    rig.redis.kill()
    with rig.client() as client:
        during_get = client.get(f"/v1/jobs/{long_job}")
        during_post = client.post("/v1/jobs", json=job_config(epochs=2))  # stored; not sent
        ready = client.get("/readyz")
    time.sleep(5)
    rig.redis.start()
    rig.start_worker("c")  # a free worker: it can only run what is re-sent

    assert during_get.status_code == 200 and during_post.status_code == 202
    assert ready.status_code == 503 and ready.headers["retry-after"]
    unsent = str(during_post.json()["id"])
    # both run although their messages are gone and a stuck job is re-sent only after an hour here
    for job_id in (waiting, unsent):
        wait_for(rig, job_id, lambda j: j["status"] != "queued")
    for job_id in (long_job, waiting, unsent):
        assert_ended_once_with_verified_files(rig, job_id)
    rig.stop_worker("c")


def test_postgresql_outage_is_503_for_clients_and_the_job_still_ends_once(rig: Rig) -> None:
    job_id = submit(rig, job_config(epochs=8, n_train=6000))
    wait_for(rig, job_id, training(2))
    poller = Poller(rig, job_id)
    poller.start()
    time.sleep(0.5)

    rig.pg.stop()
    time.sleep(3)
    rig.pg.start()
    time.sleep(2)
    codes = poller.stop()

    assert 500 not in codes, codes
    assert 503 in codes and all(v for v in poller.retry_after)
    assert set(codes) <= {200, 503}
    assert_ended_once_with_verified_files(rig, job_id)


def test_api_restart_loses_nothing_and_the_job_logs_carry_the_request_id(rig: Rig) -> None:
    with rig.client() as client:
        resp = call(
            lambda: client.post(
                "/v1/jobs", json=job_config(epochs=6, n_train=6000), headers={"X-Request-ID": "faults-req-42"}
            )
        )
    assert resp.status_code == 202 and resp.headers["x-request-id"] == "faults-req-42"
    job_id = str(resp.json()["id"])
    wait_for(rig, job_id, training(1))

    rig.stop_api()
    time.sleep(1)
    rig.start_api()

    assert_ended_once_with_verified_files(rig, job_id)
    lines = [
        json.loads(line)
        for line in (rig.root / "worker-b.log").read_text().splitlines()
        if line.startswith("{")
    ]
    mine = [line for line in lines if line.get("job_id") == job_id]
    assert mine and all(line["request_id"] == "faults-req-42" for line in mine)
    assert any("succeeded" in line["message"] for line in mine)


def test_metrics_of_the_api_and_of_a_worker(rig: Rig) -> None:
    with rig.client() as client:
        api = client.get("/metrics").text
    worker = httpx.get(f"http://127.0.0.1:{rig.port + 1}/metrics", timeout=10).text
    values = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for text in (api, worker)
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }

    assert values[("lorita_jobs", (("status", "succeeded"),))] >= 4
    assert values[("lorita_worker_jobs_total", (("outcome", "succeeded"),))] >= 1
    assert values[("lorita_queue_depth", (("queue", "all"),))] >= 0
    assert any(name == "lorita_worker_stage_duration_seconds_count" for name, _ in values)


def _mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True
    )
    return done.returncode == 0


def test_a_full_artifact_store_fails_the_job_with_a_message_and_frees_the_space(rig: Rig) -> None:
    small = rig.root / "small"
    if not _mount_tmpfs(small, "1m"):
        pytest.skip("needs a size-limited filesystem: mounting a tmpfs is not permitted here")
    try:
        for name in list(rig.workers):
            rig.stop_worker(name)
        rig.start_worker("full", LORITA_ARTIFACT_DIR=str(small))
        job_id = submit(rig, job_config(epochs=2, width=1024, dim=64))

        job = wait_for(rig, job_id, ended)

        assert job["status"] == "failed" and job["error"] == "no space left on the artifact store"
        assert [p for p in small.rglob("*") if p.is_file()] == []  # no checkpoint.pt.tmp left behind
        assert sql(rig, "SELECT count(*) FROM artifacts WHERE job_id = %s", job_id) == [(0,)]
    finally:
        rig.stop_worker("full")
        subprocess.run(["umount", str(small)], check=False)
