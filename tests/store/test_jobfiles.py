"""A run's files on both stores: where they go, the checkpoint that follows a rerun to another
machine, and what each end of a run leaves behind."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from store.artifacts import ArtifactStore, LocalArtifactStore, job_key, open_artifact_store
from store.jobfiles import JobFiles
from tests.store.s3_server import S3Server


def run_outputs(files: JobFiles, text: str) -> None:
    out, work = files.prepare()
    (work / "checkpoint.pt").write_bytes(b"ckpt-" + text.encode())
    (out / "model.json").write_text(text)
    (out / "report.json").write_text("{}")


def stored(store: ArtifactStore, tenant: str = "t", job: str = "j") -> list[str]:
    return store.list_prefix(job_key(tenant, job))


def test_local_run_writes_into_the_store_and_success_keeps_only_its_attempt(tmp_path: Path) -> None:
    store = LocalArtifactStore(tmp_path / "store")
    first = JobFiles(store, "t", "j", 1)
    run_outputs(first, "attempt 1")  # then its worker died
    second = JobFiles(store, "t", "j", 2)
    run_outputs(second, "attempt 2")

    artifacts = second.collect()
    second.finish("succeeded")

    assert second.out_dir == store.path_for("tenants/t/jobs/j/a2")
    assert [(a[0], a[3]) for a in artifacts] == [
        ("model.json", "tenants/t/jobs/j/a2/model.json"),
        ("report.json", "tenants/t/jobs/j/a2/report.json"),
    ]
    assert artifacts[0][2] == hashlib.sha256(b"attempt 2").hexdigest()
    assert stored(store) == ["tenants/t/jobs/j/a2/model.json", "tenants/t/jobs/j/a2/report.json"]


@pytest.mark.parametrize("outcome", ["failed", "canceled"])
def test_a_failed_or_canceled_run_leaves_nothing(tmp_path: Path, outcome: str) -> None:
    store = LocalArtifactStore(tmp_path / "store")
    files = JobFiles(store, "t", "j", 1)
    run_outputs(files, "x")

    files.finish(outcome)

    assert stored(store) == [] and not store.exists(job_key("t", "j"))


def test_a_superseded_run_removes_only_its_own_outputs(tmp_path: Path) -> None:
    store = LocalArtifactStore(tmp_path / "store")
    stale = JobFiles(store, "t", "j", 1)
    run_outputs(stale, "old")

    stale.finish("stale")

    assert stored(store) == ["tenants/t/jobs/j/work/checkpoint.pt"]


def test_partial_files_of_a_full_disk_are_removed(tmp_path: Path) -> None:
    files = JobFiles(LocalArtifactStore(tmp_path / "store"), "t", "j", 1)
    out, work = files.prepare()
    (work / "checkpoint.pt").write_bytes(b"good")
    (work / "checkpoint.pt.tmp").write_bytes(b"half")
    (out / ".model.abc.tmp.onnx").write_bytes(b"half")

    files.remove_partials()

    assert sorted(p.name for p in work.iterdir()) == ["checkpoint.pt"] and list(out.iterdir()) == []


def test_s3_checkpoint_follows_the_job_to_another_machine(s3: S3Server, tmp_path: Path) -> None:
    machine_a = open_artifact_store(s3.url(), tmp_path / "a")
    machine_b = open_artifact_store(s3.url(), tmp_path / "b")
    first = JobFiles(machine_a, "t", "j", 1)
    run_outputs(first, "a")
    assert first.sync_checkpoint() and not first.sync_checkpoint()  # once per change
    assert first.out_dir.is_relative_to(tmp_path / "a")  # a local workspace

    second = JobFiles(machine_b, "t", "j", 2)
    _, work = second.prepare()

    assert (work / "checkpoint.pt").read_bytes() == b"ckpt-a"
    (second.out_dir / "model.json").write_text("b")
    artifacts = second.collect()
    second.finish("succeeded")
    assert [a[3] for a in artifacts] == ["tenants/t/jobs/j/a2/model.json"]
    assert s3.keys() == ["lorita/tenants/t/jobs/j/a2/model.json"]
    assert not second.out_dir.exists() and not second.work_dir.exists()
    assert machine_b.local_path("tenants/t/jobs/j/a2/model.json").read_text() == "b"


def test_s3_failed_run_leaves_nothing_in_the_bucket_or_the_workspace(s3: S3Server, tmp_path: Path) -> None:
    store = open_artifact_store(s3.url(), tmp_path / "w")
    files = JobFiles(store, "t", "j", 1)
    run_outputs(files, "x")
    files.sync_checkpoint()
    files.collect()

    files.finish("failed")

    assert s3.keys() == [] and [p for p in (tmp_path / "w").rglob("*") if p.is_file()] == []
