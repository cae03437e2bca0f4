"""The API on the S3 artifact store: uploads land in the bucket, downloads stream with checksums
and Range, and a store that cannot be reached is 503 with Retry-After (not 500)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from safetensors.torch import save_file
from sqlalchemy.orm import Session

from core.zoo import build_model
from store.artifacts import job_key, open_artifact_store
from store.models import Artifact, Job, ModelRecord
from store.settings import Settings
from tests.api.conftest import Caller
from tests.store.s3_server import S3Server, free_port

pytestmark = pytest.mark.postgres

PAYLOAD = bytes(range(256)) * 4096  # 1 MiB


@pytest.fixture
def s3_client(
    make_client: Callable[[Settings], TestClient], pg_url: str, tmp_path: Path, s3: S3Server
) -> TestClient:
    settings = Settings(database_url=pg_url, artifacts_url=s3.url(), work_dir=str(tmp_path / "api-work"))
    return make_client(settings)


def stored_job_artifact(session: Session, s3: S3Server, tmp_path: Path, caller: Caller) -> str:
    job = Job(tenant_id=caller.tenant.id, config={"model": {"arch": "fcn"}}, status="succeeded")
    session.add(job)
    session.flush()
    src = tmp_path / "model.onnx"
    src.write_bytes(PAYLOAD)
    key = job_key(caller.tenant.id, job.id, "a1/model.onnx")
    size, digest = open_artifact_store(s3.url(), tmp_path / "worker-work").put_file(key, src)
    session.add(Artifact(job_id=job.id, name="model.onnx", size_bytes=size, sha256=digest, location=key))
    session.flush()
    return job.id


def test_a_model_upload_lands_in_the_bucket_not_on_local_disk(
    s3_client: TestClient, alice: Caller, session: Session, s3: S3Server, tmp_path: Path
) -> None:
    path = tmp_path / "fcn.safetensors"
    model = build_model("fcn", 10, (64,), {"depth": 2, "width": 16})
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    form = {
        "arch": "fcn",
        "num_classes": "10",
        "input_shape": "64",
        "options": json.dumps({"depth": 2, "width": 16}),
    }

    with path.open("rb") as f:
        resp = s3_client.post("/v1/models", headers=alice.headers, data=form, files={"file": (path.name, f)})

    assert resp.status_code == 201, resp.text
    row = session.get(ModelRecord, resp.json()["id"])
    assert row is not None
    assert s3.keys() == [f"lorita/{row.location}"]
    body = s3.client().get_object(Bucket=s3.bucket, Key=f"lorita/{row.location}")["Body"].read()
    assert hashlib.sha256(body).hexdigest() == row.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    # the scratch copy of the upload is gone; nothing else was written locally
    assert [p for p in (tmp_path / "api-work").rglob("*") if p.is_file()] == []


def test_download_streams_from_the_bucket_with_checksum_and_range(
    s3_client: TestClient, alice: Caller, session: Session, s3: S3Server, tmp_path: Path
) -> None:
    job_id = stored_job_artifact(session, s3, tmp_path, alice)
    url = f"/v1/jobs/{job_id}/artifacts/model.onnx"
    digest = hashlib.sha256(PAYLOAD).hexdigest()

    whole = s3_client.get(url, headers=alice.headers)
    part = s3_client.get(url, headers=alice.headers | {"Range": "bytes=1000-1999"})
    tail = s3_client.get(url, headers=alice.headers | {"Range": "bytes=-10"})
    beyond = s3_client.get(url, headers=alice.headers | {"Range": f"bytes={len(PAYLOAD)}-"})

    assert whole.status_code == 200 and whole.content == PAYLOAD
    assert whole.headers["X-Checksum-SHA256"] == digest == hashlib.sha256(whole.content).hexdigest()
    assert whole.headers["accept-ranges"] == "bytes"
    assert int(whole.headers["content-length"]) == len(PAYLOAD)
    assert part.status_code == 206 and part.content == PAYLOAD[1000:2000]
    assert part.headers["content-range"] == f"bytes 1000-1999/{len(PAYLOAD)}"
    assert part.headers["X-Checksum-SHA256"] == digest  # of the whole file, to check once reassembled
    assert tail.status_code == 206 and tail.content == PAYLOAD[-10:]
    assert beyond.status_code == 416 and beyond.headers["content-range"] == f"bytes */{len(PAYLOAD)}"


def test_another_tenant_cannot_download_and_a_missing_object_is_404(
    s3_client: TestClient, alice: Caller, bob: Caller, session: Session, s3: S3Server, tmp_path: Path
) -> None:
    job_id = stored_job_artifact(session, s3, tmp_path, alice)
    url = f"/v1/jobs/{job_id}/artifacts/model.onnx"

    assert s3_client.get(url, headers=bob.headers).status_code == 404
    s3.client().delete_object(
        Bucket=s3.bucket, Key=f"lorita/{job_key(alice.tenant.id, job_id, 'a1/model.onnx')}"
    )
    missing = s3_client.get(url, headers=alice.headers)
    assert missing.status_code == 404 and "missing from the artifact store" in missing.json()["detail"]


def test_an_unreachable_store_is_503_with_retry_after(
    make_client: Callable[[Settings], TestClient],
    pg_url: str,
    alice: Caller,
    session: Session,
    s3: S3Server,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    job_id = stored_job_artifact(session, s3, tmp_path, alice)
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")  # nothing listens
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    client = make_client(Settings(database_url=pg_url, artifacts_url=s3.url(), work_dir=str(tmp_path / "w")))

    resp = client.get(f"/v1/jobs/{job_id}/artifacts/model.onnx", headers=alice.headers)

    assert resp.status_code == 503 and resp.headers["Retry-After"]
    assert "try again" in resp.json()["detail"] and "127.0.0.1" not in resp.text
