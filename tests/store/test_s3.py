"""The S3 artifact store against a real S3 protocol server (moto's server mode, on loopback)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from store.artifacts import (
    ArtifactKeyError,
    ArtifactStoreUnavailable,
    LocalArtifactStore,
    get_artifact_store,
    job_key,
    open_artifact_store,
)
from store.s3 import S3ArtifactStore
from store.settings import Settings
from tests.store.s3_server import S3Server, free_port

PAYLOAD = bytes(range(256)) * 40_000  # 10 MB: past boto3's 8 MB multipart threshold


def make_store(s3: S3Server, tmp_path: Path, prefix: str = "lorita") -> S3ArtifactStore:
    store = open_artifact_store(s3.url(prefix), tmp_path / "work")
    assert isinstance(store, S3ArtifactStore)
    return store


def test_the_setting_chooses_the_store(tmp_path: Path, s3: S3Server) -> None:
    assert isinstance(get_artifact_store(Settings(artifact_dir=str(tmp_path))), LocalArtifactStore)
    local = get_artifact_store(Settings(artifacts_url=str(tmp_path / "a")))
    assert isinstance(local, LocalArtifactStore) and local.root == (tmp_path / "a").resolve()
    remote = get_artifact_store(Settings(artifacts_url=s3.url("p/q"), work_dir=str(tmp_path / "w")))
    assert isinstance(remote, S3ArtifactStore)
    assert (remote.bucket, remote.prefix, remote.description) == (s3.bucket, "p/q", s3.url("p/q"))
    with pytest.raises(ValueError, match="not supported"):
        open_artifact_store("ftp://host/x")


def test_put_file_uploads_with_its_sha256_and_reads_back_whole_and_in_ranges(
    s3: S3Server, tmp_path: Path
) -> None:
    src = tmp_path / "model.onnx"
    src.write_bytes(PAYLOAD)
    store = make_store(s3, tmp_path)
    key = job_key("t1", "j1", "a1/model.onnx")

    size, digest = store.put_file(key, src)

    assert (size, digest) == (len(PAYLOAD), hashlib.sha256(PAYLOAD).hexdigest())
    assert s3.keys() == [f"lorita/{key}"]
    head = s3.client().head_object(Bucket=s3.bucket, Key=f"lorita/{key}")
    assert head["Metadata"]["sha256"] == digest
    assert store.size(key) == len(PAYLOAD) and store.exists(key) and store.local_file(key) is None
    with store.open_read(key) as f:
        assert hashlib.sha256(f.read()).hexdigest() == digest
    with store.open_read(key, 1000, 1999) as f:
        assert f.read() == PAYLOAD[1000:2000]
    with store.open_read(key, len(PAYLOAD) - 10) as f:
        assert f.read() == PAYLOAD[-10:]
    assert store.size(job_key("t1", "j1", "a1/missing")) is None
    with pytest.raises(FileNotFoundError):
        store.open_read(job_key("t1", "j1", "a1/missing"))


def test_put_dir_publishes_a_folder_that_reads_back_as_a_local_tree(s3: S3Server, tmp_path: Path) -> None:
    store = make_store(s3, tmp_path)
    scratch = store.temp_dir()
    for cls, n in (("cat", 3), ("dog", 2)):
        (scratch / "train" / cls).mkdir(parents=True)
        for i in range(n):
            (scratch / "train" / cls / f"{i}.png").write_bytes(f"{cls}{i}".encode())
    key = "tenants/t/datasets/d/imagefolder"

    store.put_dir(key, scratch)

    assert not scratch.exists()
    assert len(store.list_prefix(key)) == 5 and store.exists(key)
    local = store.local_path(key)
    assert local.is_dir() and local.is_relative_to(tmp_path / "work" / "cache")
    assert sorted(p.relative_to(local).as_posix() for p in local.rglob("*.png")) == [
        "train/cat/0.png",
        "train/cat/1.png",
        "train/cat/2.png",
        "train/dog/0.png",
        "train/dog/1.png",
    ]
    assert (local / "train" / "dog" / "1.png").read_bytes() == b"dog1"
    with pytest.raises(FileExistsError):
        store.put_dir(key, store.temp_dir())

    store.delete_prefix("tenants/t/datasets/d")
    assert s3.keys() == [] and not store.exists(key) and not local.exists()


def test_local_path_caches_a_file_and_a_second_store_sees_the_same_bytes(
    s3: S3Server, tmp_path: Path
) -> None:
    src = tmp_path / "w.safetensors"
    src.write_bytes(b"weights" * 100)
    api_side = make_store(s3, tmp_path / "api")
    worker_side = make_store(s3, tmp_path / "worker")  # another machine: its own local folder
    key = "tenants/t/models/m/weights.safetensors"
    api_side.put_file(key, src)

    local = worker_side.local_path(key)

    assert local.read_bytes() == src.read_bytes()
    assert local.is_relative_to(tmp_path / "worker")
    assert worker_side.local_path(key) == local  # cached, not downloaded again
    with pytest.raises(FileNotFoundError):
        worker_side.local_path("tenants/t/models/other/weights.safetensors")


def test_workspace_is_local_and_delete_prefix_removes_only_its_folder(s3: S3Server, tmp_path: Path) -> None:
    store = make_store(s3, tmp_path)
    src = tmp_path / "f"
    src.write_bytes(b"x")
    for key in (
        "tenants/t/jobs/j1/a1/model.json",
        "tenants/t/jobs/j1/a2/model.json",
        "tenants/t/jobs/j10/a1/x",
    ):
        store.put_file(key, src)

    assert store.workspace("tenants/t/jobs/j1/a2") == tmp_path / "work" / "jobs" / "tenants/t/jobs/j1/a2"
    store.delete_prefix("tenants/t/jobs/j1/a1")
    assert store.list_prefix("tenants/t/jobs/j1") == ["tenants/t/jobs/j1/a2/model.json"]
    store.delete_prefix("tenants/t/jobs/j1")
    assert s3.keys() == ["lorita/tenants/t/jobs/j10/a1/x"]  # a longer id with the same start stays


@pytest.mark.parametrize("key", ["", "/etc/passwd", "../x", "a/../../x", "a//b", ".tmp/x"])
def test_unsafe_keys_are_refused(s3: S3Server, tmp_path: Path, key: str) -> None:
    with pytest.raises(ArtifactKeyError):
        make_store(s3, tmp_path).size(key)


def test_an_unreachable_endpoint_is_unavailable_not_a_crash(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    store = open_artifact_store("s3://nowhere/p", tmp_path)
    src = tmp_path / "f"
    src.write_bytes(b"x")

    with pytest.raises(ArtifactStoreUnavailable):
        store.put_file("tenants/t/x", src)
    with pytest.raises(ArtifactStoreUnavailable):
        store.size("tenants/t/x")
