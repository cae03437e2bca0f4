"""The service as real processes: ``lorita serve`` + ``lorita worker`` on PostgreSQL and Redis,
and ``lorita serve`` alone in the embedded mode (SQLite + the local broker)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import redis
import torch
from sqlalchemy import create_engine, func, select

from cli.demo import (
    create_key,
    free_port,
    lorita,
    reloaded_test_accuracy,
    running_service,
    service_env,
    start,
    stop,
    wait_healthy,
)
from store.models import Artifact, Result
from tests.worker.conftest import create_pg_database, drop_pg_database

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.postgres, pytest.mark.redis]

REDIS_URL = "redis://127.0.0.1:6379/5"
FCN = {"depth": 2, "width": 32}
FAST = {"measure": {"latency": False}, "export": ["safetensors", "onnx"], "device": "cpu"}


def synthetic(epochs: int, n_train: int) -> dict[str, Any]:
    return {
        "model": {"arch": "fcn", "options": {"depth": 2, "width": 64}},
        "dataset": {
            "name": "synthetic",
            "num_classes": 4,
            "input_shape": [32],
            "n_train": n_train,
            "n_test": 200,
        },
        "train": {"factors": 2, "epochs": epochs, "batch_size": 32},
        "compress": {"policy": "global", "keep": 0.5},
        **FAST,
    }


@dataclass
class Service:
    url: str
    key: str
    db_url: str
    workdir: Path
    env: dict[str, str]
    workers: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {self.key}"}, timeout=30)

    def start_worker(self) -> subprocess.Popen[bytes]:
        log = (self.workdir / f"worker{len(self.workers)}.log").open("ab")
        proc = start(lorita("worker", "--queue", "cpu"), self.env, self.workdir, log)
        self.workers.append(proc)
        return proc


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    workdir = tmp_path_factory.mktemp("service")
    name = f"lorita_e2e_{uuid.uuid4().hex[:8]}"
    db_url = create_pg_database(name)
    redis.Redis.from_url(REDIS_URL).flushdb()
    env = service_env(
        workdir,
        LORITA_DATABASE_URL=db_url,
        LORITA_BROKER_URL=REDIS_URL,
        LORITA_QUEUE="cpu",
        LORITA_LEASE_SECONDS="6",
        LORITA_SWEEP_INTERVAL="2",
        OMP_NUM_THREADS="1",
    )
    try:
        with running_service(workdir, env) as url:
            svc = Service(url, create_key(env, workdir, "e2e"), db_url, workdir, env)
            svc.start_worker()
            try:
                yield svc
            finally:
                for proc in svc.workers:
                    stop(proc)
    finally:
        drop_pg_database(name)
        redis.Redis.from_url(REDIS_URL).flushdb()


def submit(client: httpx.Client, config: dict[str, Any]) -> str:
    resp = client.post("/v1/jobs", json=config)
    assert resp.status_code == 202, resp.text
    return str(resp.json()["id"])


def wait_for(client: httpx.Client, job_id: str, done: Any, timeout: float = 180.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job: dict[str, Any] = client.get(f"/v1/jobs/{job_id}").json()
        if done(job):
            return job
        assert job["status"] not in ("failed", "canceled") or done(job), job
        time.sleep(0.25)
    raise AssertionError(f"job {job_id} did not get there in {timeout:.0f} s: {job}")


def finished(job: dict[str, Any]) -> bool:
    return job["status"] in ("succeeded", "failed", "canceled")


def download_all(client: httpx.Client, job_id: str, out: Path) -> list[str]:
    out.mkdir(parents=True, exist_ok=True)
    listing = client.get(f"/v1/jobs/{job_id}/artifacts").json()["data"]
    for item in listing:
        resp = client.get(f"/v1/jobs/{job_id}/artifacts/{item['name']}")
        assert resp.status_code == 200
        digest = hashlib.sha256(resp.content).hexdigest()
        assert digest == item["sha256"] == resp.headers["x-checksum-sha256"]
        (out / item["name"]).write_bytes(resp.content)
    return sorted(item["name"] for item in listing)


def make_npz(path: Path, n_train: int = 600, n_test: int = 200, dim: int = 16, classes: int = 4) -> Path:
    rng = np.random.default_rng(0)
    centers = rng.uniform(0.2, 0.8, size=(classes, dim))  # the API wants features in [0, 1]

    def sample(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = rng.integers(0, classes, size=n)
        x = np.clip(centers[y] + 0.1 * rng.normal(size=(n, dim)), 0.0, 1.0)
        return x.astype(np.float32), y.astype(np.int64)

    x_train, y_train = sample(n_train)
    x_test, y_test = sample(n_test)
    np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    return path


def make_weights(path: Path, dim: int = 16, classes: int = 4) -> Path:
    from safetensors.torch import save_file

    from core.export import portable_state_dict
    from core.zoo import build_model

    torch.manual_seed(0)
    save_file(portable_state_dict(build_model("fcn", classes, (dim,), FCN)), str(path))
    return path


def count_rows(db_url: str, table: Any, job_id: str) -> int:
    engine = create_engine(db_url)
    try:
        with engine.connect() as conn:
            count = conn.execute(
                select(func.count()).select_from(table).where(table.job_id == job_id)
            ).scalar()
            return int(count or 0)
    finally:
        engine.dispose()


def test_upload_submit_download_and_reload(service: Service, tmp_path: Path) -> None:
    npz = make_npz(tmp_path / "blobs.npz")
    weights = make_weights(tmp_path / "fcn.safetensors")
    with service.client as client:
        with weights.open("rb") as f:
            resp = client.post(
                "/v1/models",
                data={"arch": "fcn", "num_classes": "4", "input_shape": "16", "options": json.dumps(FCN)},
                files={"file": ("fcn.safetensors", f)},
            )
        assert resp.status_code == 201, resp.text
        model_id = resp.json()["id"]
        with npz.open("rb") as f:
            resp = client.post("/v1/datasets", files={"file": ("blobs.npz", f)})
        assert resp.status_code == 201, resp.text
        dataset_id = resp.json()["id"]
        config = {
            "model": {"arch": "fcn", "weights": model_id},
            "dataset": {"id": dataset_id},
            "train": {"factors": 2, "epochs": 3, "batch_size": 64},
            "compress": {"policy": "global", "keep": 0.5},
            **FAST,
        }
        job_id = submit(client, config)
        job = wait_for(client, job_id, finished)
        assert job["status"] == "succeeded", job
        names = download_all(client, job_id, tmp_path / "out")
        report = client.get(f"/v1/jobs/{job_id}/report").json()
    assert {"model.safetensors", "model.json", "model.onnx", "report.json"} <= set(names)
    assert json.loads((tmp_path / "out" / "report.json").read_text()) == report
    local = tmp_path / "local.json"
    local.write_text(
        json.dumps({**config, "model": {"arch": "fcn", "options": FCN}, "dataset": {"path": str(npz)}})
    )
    accuracy = reloaded_test_accuracy(tmp_path / "out", local)
    assert accuracy == pytest.approx(report["accuracy"]["test"]["after"], abs=1e-6)
    assert job["result"]["test_accuracy_after"] == pytest.approx(accuracy, abs=1e-6)


def test_killed_worker_job_resumes_from_checkpoint_and_succeeds_once(service: Service) -> None:
    with service.client as client:
        job_id = submit(client, synthetic(epochs=8, n_train=6000))
        wait_for(client, job_id, lambda j: j["status"] == "running" and (j["epoch"] or 0) >= 3, timeout=240)
        stop(service.workers[-1], sig=signal.SIGKILL)
        service.start_worker()
        job = wait_for(client, job_id, finished, timeout=240)
        assert job["status"] == "succeeded", job
        assert job["attempt"] == 2
        events = client.get(f"/v1/jobs/{job_id}/events", params={"limit": 500}).json()["data"]
        # every row, the dense model's files included (hidden from the default listing)
        artifacts = client.get(f"/v1/jobs/{job_id}/artifacts", params={"include": "dense"}).json()["data"]
    epochs_by_attempt: dict[int, list[int]] = {}
    for e in events:
        if e["stage"] == "train" and e["epoch"] is not None:
            epochs_by_attempt.setdefault(e["attempt"], []).append(e["epoch"])
    assert max(epochs_by_attempt[1]) >= 3
    # resumed: the second attempt starts after the last checkpointed epoch, not at epoch 1
    assert min(epochs_by_attempt[2]) > 1
    assert count_rows(service.db_url, Result, job_id) == 1
    assert (
        count_rows(service.db_url, Artifact, job_id) == len(artifacts) == len({a["name"] for a in artifacts})
    )
    assert all(f"/a2/{a['name']}" in a.get("location", f"/a2/{a['name']}") for a in artifacts)


def test_cancel_running_job_then_worker_takes_the_next(service: Service) -> None:
    with service.client as client:
        long_id = submit(client, synthetic(epochs=200, n_train=4000))
        wait_for(client, long_id, lambda j: j["status"] == "running" and (j["epoch"] or 0) >= 1)
        assert client.post(f"/v1/jobs/{long_id}/cancel").status_code in (200, 202)
        next_id = submit(client, synthetic(epochs=2, n_train=500))
        job = wait_for(client, long_id, finished, timeout=60)
        assert job["status"] == "canceled" and job["result"] is None
        job = wait_for(client, next_id, finished)
        assert job["status"] == "succeeded", job
    assert count_rows(service.db_url, Result, long_id) == 0


def digits_job_file(folder: Path, epochs: int) -> Path:
    """A small LoRITa job on the built-in digits, written to ``folder/job.json`` for ``lorita submit``."""
    config = folder / "job.json"
    job = {
        "model": {"arch": "fcn", "options": FCN},
        "dataset": {"name": "digits"},
        "train": {"factors": 2, "epochs": epochs, "batch_size": 64},
        "compress": {"policy": "global", "keep": 0.5},
        **FAST,
    }
    config.write_text(json.dumps(job))
    return config


def submit_and_download(
    config: Path, url: str, key: str, env: dict[str, str], folder: Path
) -> subprocess.CompletedProcess[str]:
    """``lorita submit CONFIG --out folder/out``, which must succeed."""
    done = subprocess.run(
        lorita("submit", str(config), "--url", url, "--key", key, "--out", str(folder / "out"), "--quiet"),
        env=env,
        cwd=folder,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr
    return done


def test_embedded_mode_runs_a_job_with_nothing_but_lorita_serve(tmp_path: Path) -> None:
    env = service_env(tmp_path, OMP_NUM_THREADS="1")
    config = digits_job_file(tmp_path, epochs=2)
    with running_service(tmp_path, env) as url:
        key = create_key(env, tmp_path)
        done = submit_and_download(config, url, key, env, tmp_path)
    assert "test accuracy" in done.stdout
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    accuracy = reloaded_test_accuracy(tmp_path / "out", config)
    assert accuracy == pytest.approx(report["accuracy"]["test"]["after"], abs=1e-6)
    assert (tmp_path / "var" / "lorita.db").exists() and (tmp_path / "var" / "broker").is_dir()


def _worker_group_leaders(workdir: Path) -> list[int]:
    """Pids of ``lorita worker`` processes started in ``workdir`` that lead their own process group
    (the child ``lorita serve`` starts; its Celery pool processes share its group)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
            cwd = (proc / "cwd").resolve()
        except OSError:
            continue
        pid = int(proc.name)
        if b"cli.main" in cmdline and b"worker" in cmdline and cwd == workdir.resolve():
            with contextlib.suppress(OSError):
                if os.getpgid(pid) == pid:
                    found.append(pid)
    return found


def test_serve_restarts_its_worker_when_it_dies_and_jobs_still_run(tmp_path: Path) -> None:
    env = service_env(tmp_path, OMP_NUM_THREADS="1")
    config = digits_job_file(tmp_path, epochs=1)
    with running_service(tmp_path, env) as url:
        key = create_key(env, tmp_path)
        deadline = time.monotonic() + 60
        while not (first := _worker_group_leaders(tmp_path)) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert len(first) == 1, first
        os.killpg(first[0], signal.SIGKILL)  # the worker and its pool, as the OOM killer would
        while (
            not (second := [p for p in _worker_group_leaders(tmp_path) if p != first[0]])
            and time.monotonic() < deadline
        ):
            time.sleep(0.2)
        assert len(second) == 1, second
        submit_and_download(config, url, key, env, tmp_path)
    assert (tmp_path / "out" / "model.safetensors").is_file()
    assert "the worker exited with code -9; starting another" in (tmp_path / "serve.log").read_text()


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def test_the_worker_child_stops_when_serve_is_killed(tmp_path: Path) -> None:
    env = service_env(tmp_path, OMP_NUM_THREADS="1")
    port = free_port()
    with (tmp_path / "serve.log").open("ab") as log:
        serve = start(lorita("serve", "--port", str(port)), env, tmp_path, log)
    try:
        wait_healthy(f"http://127.0.0.1:{port}", serve)
        deadline = time.monotonic() + 60
        while not (workers := _worker_group_leaders(tmp_path)) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert len(workers) == 1, workers
        serve.kill()  # SIGKILL: no shutdown code runs in serve
        serve.wait()
        deadline = time.monotonic() + 60
        while _alive(workers[0]) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _alive(workers[0]), "the worker outlived lorita serve"
    finally:
        stop(serve)
        for pid in _worker_group_leaders(tmp_path):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
