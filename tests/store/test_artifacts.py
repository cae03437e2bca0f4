"""The local artifact store: keys cannot escape the root; files land atomically with their sha256."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from store.artifacts import ArtifactKeyError, LocalArtifactStore, job_key, sha256_file


@pytest.mark.parametrize(
    "key", ["", "/etc/passwd", "../x", "a/../../x", "a//b", "a/./b", "a\\b", ".tmp/x", "a/b/"]
)
def test_unsafe_keys_are_refused(tmp_path: Path, key: str) -> None:
    store = LocalArtifactStore(tmp_path)

    with pytest.raises(ArtifactKeyError):
        store.path_for(key)


def test_put_file_copies_and_hashes(tmp_path: Path) -> None:
    src = tmp_path / "src.bin"
    src.write_bytes(b"lorita" * 1000)
    store = LocalArtifactStore(tmp_path / "root")
    key = job_key("t1", "j1", "model.onnx")

    size, digest = store.put_file(key, src)

    assert (size, digest) == (6000, hashlib.sha256(src.read_bytes()).hexdigest())
    assert store.exists(key) and sha256_file(store.path_for(key)) == (size, digest)
    with store.open_read(key) as f:
        assert f.read() == src.read_bytes()
    assert [p.name for p in store.path_for(job_key("t1", "j1")).iterdir()] == ["model.onnx"]


def test_symlink_inside_the_store_cannot_lead_out(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    store = LocalArtifactStore(tmp_path / "root")
    (tmp_path / "root" / "tenants").mkdir(parents=True)
    (tmp_path / "root" / "tenants" / "link").symlink_to(outside)

    with pytest.raises(ArtifactKeyError):
        store.path_for("tenants/link/secret")


def test_put_dir_and_delete_prefix(tmp_path: Path) -> None:
    store = LocalArtifactStore(tmp_path / "root")
    scratch = store.temp_dir()
    (scratch / "cls").mkdir()
    (scratch / "cls" / "a.png").write_bytes(b"x")

    store.put_dir("tenants/t/datasets/d/imagefolder", scratch)
    assert store.exists("tenants/t/datasets/d/imagefolder/cls/a.png") and not scratch.exists()
    store.delete_prefix("tenants/t/datasets/d")
    assert not store.exists("tenants/t/datasets/d")
