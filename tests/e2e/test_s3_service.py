"""The distributed deployment on an S3 artifact store, as real processes: ``lorita serve`` and two
``lorita worker`` processes that share nothing but PostgreSQL, Redis and the bucket (each has its
own local folders). A worker is killed mid-training; the other resumes from the checkpoint it
finds in the bucket, and the client downloads verified files streamed from S3 through the API."""

from __future__ import annotations

import contextlib
import hashlib
import json
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis

from cli.demo import create_key, lorita, running_service, service_env, start, stop
from tests.e2e.test_service import FCN, make_npz, make_weights, wait_for
from tests.store.gate import Gate
from tests.store.s3_server import S3Server
from tests.worker.conftest import create_pg_database, drop_pg_database

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.postgres, pytest.mark.redis]

REDIS_URL = "redis://127.0.0.1:6379/5"


def files_under(root: Path) -> list[str]:
    return (
        sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
        if root.exists()
        else []
    )


@contextlib.contextmanager
def _service(
    tmp_path: Path, s3: S3Server, endpoint: str, **extra: str
) -> Iterator[tuple[str, str, dict[str, str], Path]]:
    """``lorita serve`` (API only) on its own PostgreSQL database, Redis and the bucket at ``endpoint``."""
    name = f"lorita_s3e2e_{uuid.uuid4().hex[:8]}"
    db_url = create_pg_database(name)
    redis.Redis.from_url(REDIS_URL).flushdb()
    env = service_env(
        tmp_path / "api",
        LORITA_DATABASE_URL=db_url,
        LORITA_BROKER_URL=REDIS_URL,
        LORITA_ARTIFACTS_URL=s3.url(),
        LORITA_WORK_DIR=str(tmp_path / "api" / "work"),
        LORITA_QUEUE="cpu",
        LORITA_LEASE_SECONDS="6",
        LORITA_SWEEP_INTERVAL="2",
        OMP_NUM_THREADS="1",
        **(s3.env | {"AWS_ENDPOINT_URL": endpoint} | extra),
    )
    (tmp_path / "api").mkdir()
    try:
        with running_service(tmp_path / "api", env) as url:
            yield url, create_key(env, tmp_path / "api", "s3"), env, tmp_path
    finally:
        drop_pg_database(name)
        redis.Redis.from_url(REDIS_URL).flushdb()


@pytest.fixture
def s3_service(tmp_path: Path, s3: S3Server) -> Iterator[tuple[str, str, dict[str, str], Path]]:
    with _service(tmp_path, s3, s3.endpoint) as service:
        yield service


@pytest.fixture
def gate(s3: S3Server) -> Iterator[Gate]:
    gate = Gate(int(s3.endpoint.rsplit(":", 1)[1]))
    try:
        yield gate
    finally:
        gate.close()


def start_worker(env: dict[str, str], home: Path) -> subprocess.Popen[bytes]:
    """A worker on "another machine": its own working, artifact and var folders."""
    home.mkdir(parents=True, exist_ok=True)
    own = env | {
        "LORITA_WORK_DIR": str(home / "work"),
        "LORITA_ARTIFACT_DIR": str(home / "never-used"),
        "LORITA_VAR_DIR": str(home / "var"),
    }
    log = (home / "worker.log").open("ab")
    return start(lorita("worker", "--queue", "cpu"), own, home, log)


def upload_and_config(client: httpx.Client, root: Path, epochs: int) -> dict[str, object]:
    """Upload an FCN's weights and a 6,000-sample .npz; the config of a job that trains on them
    (N=2) for ``epochs`` epochs."""
    npz = make_npz(root / "blobs.npz", n_train=6000)
    weights = make_weights(root / "fcn.safetensors")
    with weights.open("rb") as f:
        model = client.post(
            "/v1/models",
            data={"arch": "fcn", "num_classes": "4", "input_shape": "16", "options": json.dumps(FCN)},
            files={"file": ("fcn.safetensors", f)},
        )
    with npz.open("rb") as f:
        dataset = client.post("/v1/datasets", files={"file": ("blobs.npz", f)})
    assert model.status_code == 201 and dataset.status_code == 201, (model.text, dataset.text)
    return {
        "model": {"arch": "fcn", "weights": model.json()["id"]},
        "dataset": {"id": dataset.json()["id"]},
        "train": {"factors": 2, "epochs": epochs, "batch_size": 32},
        "compress": {"policy": "global", "keep": 0.5},
        "measure": {"latency": False},
        "export": ["safetensors", "onnx"],
        "device": "cpu",
    }


def test_two_workers_with_separate_folders_share_a_job_through_the_bucket(
    s3_service: tuple[str, str, dict[str, str], Path], s3: S3Server
) -> None:
    url, key, env, root = s3_service
    client = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=30)
    config = upload_and_config(client, root, epochs=20)  # ~0.1 s an epoch: time to be killed mid-way
    first = start_worker(env, root / "machine-a")
    second = None
    try:
        resp = client.post("/v1/jobs", json=config)
        assert resp.status_code == 202, resp.text
        job_id = resp.json()["id"]
        wait_for(client, job_id, lambda j: j["status"] == "running" and (j["epoch"] or 0) >= 3, timeout=240)
        stop(first, sig=signal.SIGKILL)
        second = start_worker(env, root / "machine-b")
        job = wait_for(
            client, job_id, lambda j: j["status"] in ("succeeded", "failed", "canceled"), timeout=240
        )
        assert job["status"] == "succeeded" and job["attempt"] == 2, (job["error"], job["attempt"])
        events = client.get(f"/v1/jobs/{job_id}/events", params={"limit": 1000}).json()["data"]
        listing = client.get(f"/v1/jobs/{job_id}/artifacts").json()["data"]
        downloads = {}
        for item in listing:
            got = client.get(f"/v1/jobs/{job_id}/artifacts/{item['name']}")
            assert got.status_code == 200
            assert (
                hashlib.sha256(got.content).hexdigest() == item["sha256"] == got.headers["x-checksum-sha256"]
            )
            downloads[item["name"]] = got.content
        part = client.get(f"/v1/jobs/{job_id}/artifacts/model.onnx", headers={"Range": "bytes=10-19"})
    finally:
        stop(first)
        if second is not None:
            stop(second)
        client.close()

    assert part.status_code == 206 and part.content == downloads["model.onnx"][10:20]
    assert any(e["attempt"] == 1 and (e["epoch"] or 0) >= 3 for e in events)
    # machine b found machine a's checkpoint in the bucket (whether training resumes from it also
    # depends on core's checkpoint tag, which today includes the local paths of the inputs)
    assert "restored the checkpoint" in (root / "machine-b" / "worker.log").read_text()
    job_keys = [k for k in s3.keys() if "/jobs/" in k]  # noqa: SIM118 - a method, not a dict
    assert job_keys and all(f"/jobs/{job_id}/a2/" in k for k in job_keys)  # no a1/, no work/
    assert {"model.safetensors", "model.onnx", "report.json"} <= set(downloads)
    assert files_under(root / "machine-b" / "work" / "jobs") == []
    for home in ("machine-a", "machine-b"):
        assert not (root / home / "never-used").exists()


def test_an_s3_outage_mid_training_is_ridden_out_and_the_job_succeeds_once(
    tmp_path: Path, s3: S3Server, gate: Gate
) -> None:
    """The bucket becomes unreachable while a job trains (its checkpoints go there), for longer than
    a lease. Meanwhile an upload is a 503 that keeps nothing and the job's status still answers;
    the worker gives its attempts back instead of failing the job. When the bucket is back, the
    job succeeds exactly once and its files download intact."""
    with _service(tmp_path, s3, gate.endpoint, AWS_MAX_ATTEMPTS="2") as (url, key, env, root):
        client = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=60)
        # an epoch takes about 0.1 s here: 60 of them outlast the poll that sees the first one
        config = upload_and_config(client, root, epochs=60)
        worker = start_worker(env, root / "machine-a")
        try:
            resp = client.post("/v1/jobs", json=config)
            assert resp.status_code == 202, resp.text
            job_id = resp.json()["id"]
            wait_for(
                client, job_id, lambda j: j["status"] == "running" and (j["epoch"] or 0) >= 1, timeout=240
            )

            gate.down()
            down_at = time.monotonic()
            with (root / "blobs.npz").open("rb") as f:
                refused = client.post("/v1/datasets", files={"file": ("again.npz", f)})
            assert refused.status_code == 503 and refused.headers.get("Retry-After"), refused.text
            assert (
                refused.json()["detail"] == "the artifact store is unavailable right now; try again shortly"
            )
            assert client.get("/v1/datasets").json()["count"] == 1  # nothing kept
            during = client.get(f"/v1/jobs/{job_id}").json()
            assert during["status"] in ("running", "queued"), during
            # the bucket stays gone until the attempt has met the outage (its results could not be
            # stored), and for longer than a lease (6 s): the sweeper gets involved meanwhile. Training
            # alone never notices (a failed checkpoint upload is retried at the next epoch)
            worker_log = root / "machine-a" / "worker.log"
            deadline = time.monotonic() + 240
            while "it will be retried" not in worker_log.read_text(errors="replace"):
                assert time.monotonic() < deadline, "the job never needed the bucket during the outage"
                time.sleep(0.5)
            time.sleep(max(0.0, 15 - (time.monotonic() - down_at)))
            still = client.get(f"/v1/jobs/{job_id}").json()
            assert still["status"] in ("running", "queued"), still  # not failed for the store's outage
            gate.up()

            job = wait_for(
                client, job_id, lambda j: j["status"] in ("succeeded", "failed", "canceled"), timeout=300
            )
            assert job["status"] == "succeeded" and job["attempt"] >= 2, (job["error"], job["attempt"])
            listing = client.get(f"/v1/jobs/{job_id}/artifacts").json()["data"]
            for item in listing:
                got = client.get(f"/v1/jobs/{job_id}/artifacts/{item['name']}")
                assert got.status_code == 200
                assert hashlib.sha256(got.content).hexdigest() == item["sha256"]
        finally:
            stop(worker)
            client.close()
    assert {"model.safetensors", "model.onnx", "report.json"} <= {i["name"] for i in listing}
    log = (root / "machine-a" / "worker.log").read_text()
    assert "S3 artifact store unavailable" in log and "it will be retried" in log
    job_keys = [k for k in s3.keys() if "/jobs/" in k]  # noqa: SIM118 - a method, not a dict
    attempt = job["attempt"]
    assert job_keys and all(f"/jobs/{job_id}/a{attempt}/" in k for k in job_keys)  # one attempt's files
