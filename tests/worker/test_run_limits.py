"""A run's limits and leftovers: the wall-time limit, superseded attempt folders, a full disk, and
a job whose files live in S3 (the worker's own folder keeps nothing)."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select, update

from store.artifacts import NO_SPACE_MESSAGE, job_key, open_artifact_store
from store.db import session_scope
from store.models import Artifact, Job
from store.settings import get_settings
from tests.store.s3_server import S3Server
from tests.worker.conftest import job_row, submit, tiny_config
from worker.tasks import execute_job

pytestmark = pytest.mark.slow


def job_folder(store_root: Path, job_id: str) -> Path:
    """Where the local artifact store under ``store_root`` keeps the job's attempts."""
    return store_root / job_key(job_row(job_id).tenant_id, job_id)


def files_under(root: Path) -> list[str]:
    return (
        sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
        if root.exists()
        else []
    )


def test_past_the_wall_time_limit_the_job_fails_with_a_message_and_leaves_nothing(
    env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    env.setenv("LORITA_JOB_WALL_SECONDS", "1.5")
    get_settings.cache_clear()
    job_id = submit(tiny_config(epochs=500))

    assert execute_job(job_id, "w1") == "failed"

    job = job_row(job_id)
    assert job.status == "failed" and job.lease_expires_at is None  # the slot is free
    assert "longer than this server's limit of 2 s" in (job.error or "") and "LORITA_JOB_WALL_SECONDS" in (
        job.error or ""
    )
    assert files_under(tmp_path / "artifacts" / "tenants") == []


def test_a_success_removes_the_folders_of_superseded_attempts(
    env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    job_id = submit(tiny_config())
    job_dir = job_folder(tmp_path / "artifacts", job_id)
    (job_dir / "a1").mkdir(parents=True)
    (job_dir / "a1" / "model.safetensors").write_bytes(b"from the attempt whose worker died")
    with session_scope() as session:  # attempt 1 ran and was requeued
        session.execute(update(Job).where(Job.id == job_id).values(attempt=1))

    assert execute_job(job_id, "w2") == "succeeded"

    assert sorted(p.name for p in job_dir.iterdir()) == ["a2"]


def _mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True
    )
    return done.returncode == 0


def test_a_full_artifact_store_fails_the_job_with_a_plain_message_and_no_partial_files(
    env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    small = tmp_path / "small"
    if not _mount_tmpfs(small, "1m"):
        pytest.skip("needs a size-limited filesystem: mounting a tmpfs is not permitted here")
    try:
        env.setenv("LORITA_ARTIFACT_DIR", str(small))
        get_settings.cache_clear()
        # several MB of checkpoint (factors and Adam's moments): more than the 1 MB there
        job_id = submit(tiny_config(epochs=2, width=1024))

        assert execute_job(job_id, "w1") == "failed"

        job = job_row(job_id)
        assert job.error == NO_SPACE_MESSAGE
        assert files_under(small) == []  # no checkpoint.pt.tmp keeps the disk full
    finally:
        subprocess.run(["umount", str(small)], check=False)


def test_a_job_on_the_s3_store_uploads_its_outputs_and_keeps_nothing_locally(
    env: pytest.MonkeyPatch, tmp_path: Path, s3: S3Server
) -> None:
    env.setenv("LORITA_ARTIFACTS_URL", s3.url())
    get_settings.cache_clear()
    job_id = submit(tiny_config())

    assert execute_job(job_id, "w1") == "succeeded"

    with session_scope() as session:
        artifacts = session.scalars(select(Artifact).where(Artifact.job_id == job_id)).all()
        rows = [(a.name, a.location, a.sha256) for a in artifacts]
    assert {"model.safetensors", "report.json"} <= {name for name, _, _ in rows}
    assert sorted(s3.keys()) == sorted(f"lorita/{loc}" for _, loc, _ in rows)
    reader = open_artifact_store(s3.url(), tmp_path / "elsewhere")
    for _, location, sha256 in rows:
        with reader.open_read(location) as f:
            assert hashlib.sha256(f.read()).hexdigest() == sha256
    assert files_under(tmp_path / "work" / "jobs") == []
    assert not (tmp_path / "artifacts").exists()


def test_a_superseded_run_that_fails_leaves_the_newer_attempts_files_alone(
    env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from store import references

    job_id = submit(tiny_config())
    job_dir = job_folder(tmp_path / "artifacts", job_id)

    def taken_over_then_failing(*args: Any, **kwargs: Any) -> Any:
        # meanwhile the lease expired and attempt 2 started on another worker, with its own files
        with session_scope() as session:
            session.execute(update(Job).where(Job.id == job_id).values(attempt=2))
        for name in ("a2/model.safetensors", "work/checkpoint.pt"):
            (job_dir / name).parent.mkdir(parents=True, exist_ok=True)
            (job_dir / name).write_bytes(b"attempt 2")
        raise references.UnresolvedReference("model 'x' not found")

    env.setattr(references, "resolve_for_run", taken_over_then_failing)

    assert execute_job(job_id, "w1") == "stale"

    assert job_row(job_id).status == "running"  # attempt 2's, untouched
    assert files_under(job_dir) == ["a2/model.safetensors", "work/checkpoint.pt"]
