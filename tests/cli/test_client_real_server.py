"""``LoritaClient`` against the real API served by uvicorn, started only after the client began
waiting: the refused connections are ridden out, and everything the client reads (job, listing,
download with its checksum header, report) is what the API really sends."""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvicorn

from api.app import create_app
from cli.client import LoritaClient, RetryPolicy
from cli.demo import free_port
from core.config import JobConfig
from core.report import JobReport
from store import lifecycle
from store.admin import upgrade_db
from store.artifacts import job_key
from store.db import dispose_engines, session_scope
from store.models import Job
from store.repositories import api_keys, tenants
from store.settings import Settings


@pytest.fixture
def settings(tmp_path: Path) -> Iterator[Settings]:
    settings = Settings(
        database_url=f"sqlite:///{tmp_path / 'lorita.db'}", artifact_dir=str(tmp_path / "art")
    )
    upgrade_db(settings.database_url)
    yield settings
    dispose_engines()


def succeeded_job(settings: Settings, report: JobReport, payload: bytes) -> tuple[str, str]:
    """(API key, job id) of a job that ran the way a worker runs one: claimed, then completed."""
    with session_scope(settings.database_url) as session:
        tenant = tenants.create(session, "acme")
        key, _ = api_keys.create(session, tenant)
        config = JobConfig.model_validate({"model": {"arch": "fcn"}, "dataset": {"name": "digits"}})
        job = Job(tenant_id=tenant.id, config=config.model_dump(mode="json"), max_attempts=3)
        session.add(job)
        session.flush()
        location = job_key(tenant.id, job.id, "a1/model.bin")
        path = Path(settings.artifact_dir) / location
        path.parent.mkdir(parents=True)
        path.write_bytes(payload)
        attempt = lifecycle.claim(session, job.id, "w1", lease_seconds=60)
        assert attempt == 1
        files = [("model.bin", len(payload), hashlib.sha256(payload).hexdigest(), location)]
        assert lifecycle.complete(session, job.id, attempt, report, files)
        return key, job.id


def test_the_client_waits_for_a_late_server_and_reads_what_it_sends(
    settings: Settings, real_report: JobReport, tmp_path: Path
) -> None:
    payload = b"weights" * 10_000
    key, job_id = succeeded_job(settings, real_report, payload)
    port = free_port()
    messages: list[str] = []
    refused = threading.Event()

    def on_retry(message: str) -> None:
        messages.append(message)
        refused.set()

    policy = RetryPolicy(first_delay_s=0.05, max_delay_s=0.2, give_up_after_s=120)
    client = LoritaClient(f"http://127.0.0.1:{port}", key, retry=policy, on_retry=on_retry)
    outcome: list[dict[str, object]] = []
    waiter = threading.Thread(target=lambda: outcome.append(client.wait(job_id, interval_s=0.05)))
    waiter.start()
    assert refused.wait(30)  # polling a port nobody listens on yet

    config = uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="warning")
    server = uvicorn.Server(config)
    serving = threading.Thread(target=server.run, daemon=True)
    serving.start()
    try:
        waiter.join(60)
        with client:
            paths = client.download_artifacts(job_id, tmp_path / "out")
            report = JobReport.model_validate(client.report(job_id))
    finally:
        server.should_exit = True
        serving.join(30)

    assert [j["status"] for j in outcome] == ["succeeded"] and outcome[0]["stage"] == "done"
    assert messages[0].startswith(f"reading job {job_id}: connection refused; retrying in")
    assert messages[-1] == f"reading job {job_id}: the service at http://127.0.0.1:{port} answers again"
    assert [p.name for p in paths] == ["model.bin"] and paths[0].read_bytes() == payload
    assert report == real_report
