"""The artifact store: uploads and job outputs under keys like ``tenants/<tid>/jobs/<jid>/model.onnx``.

Keys are relative POSIX paths; ``..``, absolute paths, backslashes and empty parts are refused,
so a key can never name a file outside the store.

Two stores implement :class:`ArtifactStore`, chosen by one setting, ``LORITA_ARTIFACTS_URL``
(see :func:`get_artifact_store`):

* :class:`LocalArtifactStore`: files under a root directory (a path, the default
  ``LORITA_ARTIFACT_DIR``); the API and the workers must share that filesystem.
* :class:`store.s3.S3ArtifactStore`: ``s3://bucket/prefix`` on any S3-compatible server; the
  API and the workers then share nothing but PostgreSQL, Redis and the bucket. Each process
  keeps local scratch and a read cache under ``LORITA_WORK_DIR``.

Readers that need a local file (the worker's training data and weights) call
:meth:`ArtifactStore.local_path`; writers produce a local file and call ``put_file`` / ``put_dir``.
A store that runs out of space raises :class:`ArtifactStoreFull` with partial files removed; one
that cannot be reached raises :class:`ArtifactStoreUnavailable`.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Protocol, cast

from store.settings import Settings, get_settings

CHUNK_BYTES = 1024 * 1024
TMP_DIR = ".tmp"
NO_SPACE_MESSAGE = "no space left on the artifact store"
_NO_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


class ArtifactKeyError(ValueError):
    """A key that could escape the store."""


class ArtifactStoreError(Exception):
    """The store failed in a way the caller cannot fix by changing its input."""


class ArtifactStoreFull(ArtifactStoreError):
    """No space left; the message is safe to show to a person (no paths)."""

    def __init__(self, message: str = NO_SPACE_MESSAGE) -> None:
        super().__init__(message)


class ArtifactStoreUnavailable(ArtifactStoreError):
    """The store cannot be reached right now (an S3 endpoint down, a timeout); try again later."""


def is_no_space(err: BaseException) -> bool:
    """True when ``err`` (or anything in its cause/context chain) says the disk is full.

    torch.save reports ENOSPC as ``RuntimeError: [enforce fail at inline_container.cc:...]
    ... file write failed``, without an errno, so the text is checked too.
    """
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, ArtifactStoreFull):
            return True
        if isinstance(current, OSError) and current.errno in _NO_SPACE_ERRNOS:
            return True
        text = str(current)
        if "No space left on device" in text or "Disk quota exceeded" in text:
            return True
        if "inline_container.cc" in text and ("write" in text or "PytorchStreamWriter" in text):
            return True
        current = current.__cause__ or current.__context__
    return False


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


@contextmanager
def no_space_as_store_full(*partial: Path) -> Iterator[None]:
    """Turn a full disk into :class:`ArtifactStoreFull`, removing ``partial`` files first."""
    try:
        yield
    except ArtifactStoreFull:
        for p in partial:
            p.unlink(missing_ok=True)
        raise
    except OSError as err:
        if err.errno not in _NO_SPACE_ERRNOS:
            raise
        for p in partial:
            p.unlink(missing_ok=True)
        raise ArtifactStoreFull() from None


class ArtifactStore(Protocol):
    @property
    def description(self) -> str:
        """Where the store is, for operators' logs (never shown to API clients)."""
        ...

    def put_file(self, key: str, src: str | os.PathLike[str]) -> tuple[int, str]:
        """Copy ``src`` to ``key`` atomically; returns (size_bytes, sha256 hex)."""
        ...

    def put_dir(self, key: str, src: str | os.PathLike[str]) -> None:
        """Publish the directory ``src`` (made by ``temp_dir``) under ``key``; ``src`` is consumed."""
        ...

    def open_read(self, key: str, start: int = 0, end: int | None = None) -> BinaryIO:
        """A stream of the bytes ``start..end`` (inclusive; None: to the end) of the file at ``key``."""
        ...

    def size(self, key: str) -> int | None:
        """The size of the file at ``key``, or None when there is none."""
        ...

    def local_file(self, key: str) -> Path | None:
        """The file's own path when the store is a local filesystem (served as is), else None."""
        ...

    def local_path(self, key: str) -> Path:
        """A local path holding the file or folder at ``key``, for reading (S3: a cached download)."""
        ...

    def exists(self, key: str) -> bool: ...

    def delete_prefix(self, prefix: str) -> None:
        """Remove the file ``prefix`` or every file under the folder ``prefix``."""
        ...

    def list_prefix(self, prefix: str) -> list[str]:
        """The keys of the files under the folder ``prefix`` (sorted)."""
        ...

    def list_children(self, prefix: str) -> list[str]:
        """The names of the files and folders directly under the folder ``prefix`` (sorted)."""
        ...

    def temp_dir(self) -> Path:
        """A fresh local scratch directory; the caller removes it (``put_dir`` consumes it)."""
        ...

    def workspace(self, key: str) -> Path:
        """The local folder where a job writes the files that end up under ``key``.

        Local store: the store's own folder (nothing is copied). S3: a folder under the work
        dir, whose files are uploaded by ``put_file``.
        """
        ...


class LocalArtifactStore:
    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).resolve()

    @property
    def description(self) -> str:
        return str(self.root)

    def path_for(self, key: str) -> Path:
        path = (self.root / validate_key(key)).resolve()
        if not path.is_relative_to(self.root):  # a symlink inside the store pointing out
            raise ArtifactKeyError(f"artifact key {key!r} resolves outside the store")
        return path

    def temp_dir(self) -> Path:
        base = self.root / TMP_DIR
        with no_space_as_store_full():
            base.mkdir(parents=True, exist_ok=True)
            return Path(tempfile.mkdtemp(dir=base))

    def put_file(self, key: str, src: str | os.PathLike[str]) -> tuple[int, str]:
        dest = self.path_for(key)
        digest = hashlib.sha256()
        size = 0
        with no_space_as_store_full():
            dest.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
        tmp = Path(tmp_name)
        try:
            with no_space_as_store_full(tmp), open(src, "rb") as fin, os.fdopen(fd, "wb") as fout:
                while chunk := fin.read(CHUNK_BYTES):
                    size += len(chunk)
                    digest.update(chunk)
                    fout.write(chunk)
                fout.flush()
                os.fsync(fout.fileno())
            os.replace(tmp, dest)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return size, digest.hexdigest()

    def put_dir(self, key: str, src: str | os.PathLike[str]) -> None:
        dest = self.path_for(key)
        if dest.exists():
            raise FileExistsError(f"artifact {key} already exists")
        with no_space_as_store_full():
            dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(src, dest)

    def open_read(self, key: str, start: int = 0, end: int | None = None) -> BinaryIO:
        f = open(self.path_for(key), "rb")  # noqa: SIM115 - the caller closes the stream
        if start:
            f.seek(start)
        if end is None:
            return f
        return cast(BinaryIO, _Bounded(f, end - start + 1))

    def size(self, key: str) -> int | None:
        path = self.path_for(key)
        return path.stat().st_size if path.is_file() else None

    def local_file(self, key: str) -> Path | None:
        return self.path_for(key)

    def local_path(self, key: str) -> Path:
        return self.path_for(key)

    def workspace(self, key: str) -> Path:
        return self.path_for(key)

    def exists(self, key: str) -> bool:
        return self.path_for(key).exists()

    def delete_prefix(self, prefix: str) -> None:
        path = self.path_for(prefix.rstrip("/"))
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()

    def list_children(self, prefix: str) -> list[str]:
        path = self.path_for(prefix.rstrip("/"))
        return sorted(p.name for p in path.iterdir()) if path.is_dir() else []

    def list_prefix(self, prefix: str) -> list[str]:
        path = self.path_for(prefix.rstrip("/"))
        if not path.is_dir():
            return []
        return sorted(str(p.relative_to(self.root).as_posix()) for p in path.rglob("*") if p.is_file())


class _Bounded:
    """A read-only view of the next ``remaining`` bytes of a file (a Range of it)."""

    def __init__(self, f: BinaryIO, remaining: int) -> None:
        self._f = f
        self._remaining = max(0, remaining)

    def read(self, n: int = -1) -> bytes:
        if self._remaining <= 0:
            return b""
        n = self._remaining if n < 0 else min(n, self._remaining)
        data = self._f.read(n)
        self._remaining -= len(data)
        return data

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> _Bounded:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def artifacts_location(settings: Settings) -> str:
    """``LORITA_ARTIFACTS_URL`` if set, else ``LORITA_ARTIFACT_DIR`` (the older, local-only name)."""
    url = getattr(settings, "artifacts_url", None)
    return url or settings.artifact_dir


def open_artifact_store(location: str, work_dir: str | os.PathLike[str] = "./var/work") -> ArtifactStore:
    """The store for ``location``: ``s3://bucket/prefix``, ``file:///path`` or a plain path.

    S3 endpoint, region and credentials come from boto3's own configuration (``AWS_ENDPOINT_URL``,
    ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, ``AWS_PROFILE``, ``~/.aws/config``, an
    instance role...): never from LORITA settings, so secrets stay where AWS tools expect them.
    """
    if location.startswith("s3://"):
        from store.s3 import S3ArtifactStore

        return S3ArtifactStore.from_url(location, work_dir)
    if location.startswith("file://"):
        location = location[len("file://") :]
    elif "://" in location:
        raise ValueError(
            f"LORITA_ARTIFACTS_URL {location.split('://', 1)[0]}://... is not supported: "
            "give a local directory or s3://bucket/prefix"
        )
    return LocalArtifactStore(location)


def get_artifact_store(settings: Settings | None = None) -> ArtifactStore:
    settings = settings or get_settings()
    return open_artifact_store(artifacts_location(settings), getattr(settings, "work_dir", "./var/work"))
