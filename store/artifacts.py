"""The artifact store: uploads and job outputs under keys like ``tenants/<tid>/jobs/<jid>/model.onnx``.

Keys are relative POSIX paths; ``..``, absolute paths, backslashes and empty parts are refused,
so a key can never name a file outside the store. ``LocalArtifactStore`` keeps files under a
root directory; an S3-style store can implement the same protocol later.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import BinaryIO, Protocol

from store.settings import Settings, get_settings

CHUNK_BYTES = 1024 * 1024
TMP_DIR = ".tmp"


class ArtifactKeyError(ValueError):
    """A key that could escape the store."""


def validate_key(key: str) -> str:
    if not key or key.startswith("/") or "\\" in key or "\x00" in key:
        raise ArtifactKeyError(f"invalid artifact key {key!r}: use a relative path like tenants/<id>/...")
    parts = key.split("/")
    if any(p in ("", ".", "..") for p in parts) or parts[0] == TMP_DIR:
        raise ArtifactKeyError(f"invalid artifact key {key!r}: empty, '.' or '..' parts are not allowed")
    return key


def sha256_file(path: str | os.PathLike[str]) -> tuple[int, str]:
    """(size in bytes, sha256 hex) of a file, read in chunks."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            size += len(chunk)
            digest.update(chunk)
    return size, digest.hexdigest()


def model_key(tenant_id: str, model_id: str, filename: str) -> str:
    return f"tenants/{tenant_id}/models/{model_id}/{filename}"


def dataset_key(tenant_id: str, dataset_id: str, name: str) -> str:
    return f"tenants/{tenant_id}/datasets/{dataset_id}/{name}"


def job_key(tenant_id: str, job_id: str, name: str = "") -> str:
    base = f"tenants/{tenant_id}/jobs/{job_id}"
    return f"{base}/{name}" if name else base


class ArtifactStore(Protocol):
    def put_file(self, key: str, src: str | os.PathLike[str]) -> tuple[int, str]:
        """Copy ``src`` to ``key`` atomically; returns (size_bytes, sha256 hex)."""
        ...

    def put_dir(self, key: str, src: str | os.PathLike[str]) -> None:
        """Move the directory ``src`` (made by ``temp_dir``) to ``key`` in one rename."""
        ...

    def open_read(self, key: str) -> BinaryIO: ...

    def path_for(self, key: str) -> Path:
        """A local filesystem path for ``key`` (for FileResponse and the worker)."""
        ...

    def exists(self, key: str) -> bool: ...

    def delete_prefix(self, prefix: str) -> None: ...

    def temp_dir(self) -> Path:
        """A fresh scratch directory on the store's filesystem; the caller removes it."""
        ...


class LocalArtifactStore:
    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).resolve()

    def path_for(self, key: str) -> Path:
        path = (self.root / validate_key(key)).resolve()
        if not path.is_relative_to(self.root):  # a symlink inside the store pointing out
            raise ArtifactKeyError(f"artifact key {key!r} resolves outside the store")
        return path

    def temp_dir(self) -> Path:
        base = self.root / TMP_DIR
        base.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(dir=base))

    def put_file(self, key: str, src: str | os.PathLike[str]) -> tuple[int, str]:
        dest = self.path_for(key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256()
        size = 0
        fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
        try:
            with open(src, "rb") as fin, os.fdopen(fd, "wb") as fout:
                while chunk := fin.read(CHUNK_BYTES):
                    size += len(chunk)
                    digest.update(chunk)
                    fout.write(chunk)
                fout.flush()
                os.fsync(fout.fileno())
            os.replace(tmp_name, dest)
        except BaseException:
            Path(tmp_name).unlink(missing_ok=True)
            raise
        return size, digest.hexdigest()

    def put_dir(self, key: str, src: str | os.PathLike[str]) -> None:
        dest = self.path_for(key)
        if dest.exists():
            raise FileExistsError(f"artifact {key} already exists")
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(src, dest)

    def open_read(self, key: str) -> BinaryIO:
        return open(self.path_for(key), "rb")

    def exists(self, key: str) -> bool:
        return self.path_for(key).exists()

    def delete_prefix(self, prefix: str) -> None:
        path = self.path_for(prefix.rstrip("/"))
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def get_artifact_store(settings: Settings | None = None) -> ArtifactStore:
    return LocalArtifactStore((settings or get_settings()).artifact_dir)
