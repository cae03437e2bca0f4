"""The S3-compatible artifact store (AWS S3, MinIO, Ceph RGW, ...): ``s3://bucket/prefix``.

Objects are ``<prefix>/<key>``; each file's sha256 rides along as object metadata
(``x-amz-meta-sha256``) so a reader can check what it got. The bucket must exist (the operator
creates it; a service never creates buckets with its own credentials).

boto3 reads the endpoint, region and credentials itself: ``AWS_ENDPOINT_URL`` (or
``AWS_ENDPOINT_URL_S3``) for a non-AWS server, ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY``,
``AWS_PROFILE``, ``AWS_DEFAULT_REGION``, an instance role... Nothing here reads the environment itself.

Local files: uploads are written to a scratch folder first (``temp_dir``); readers that need a
file on disk (a worker's dataset and weights) get a cached download under
``<work_dir>/cache/<key>``. Keys of uploads never change (a new upload gets a new id), so the
cache needs no invalidation; a download lands in a temporary folder and is renamed into place.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, BinaryIO

from store.artifacts import (
    TMP_DIR,
    ArtifactStoreUnavailable,
    no_space_as_store_full,
    sha256_file,
    validate_key,
)

# parallel uploads of a folder (an ImageFolder dataset); boto3 clients are thread-safe
UPLOAD_THREADS = 8
DELETE_BATCH = 1000


def _client_errors() -> tuple[type[BaseException], ...]:
    from botocore.exceptions import BotoCoreError, ClientError

    return (BotoCoreError, ClientError)


def _is_not_found(err: BaseException) -> bool:
    from botocore.exceptions import ClientError

    if not isinstance(err, ClientError):
        return False
    code = str(err.response.get("Error", {}).get("Code", ""))
    return code in ("404", "NoSuchKey", "NotFound")


def _unavailable(err: BaseException) -> ArtifactStoreUnavailable:
    # the text says which operation failed and why, for the operator's log; the API shows a
    # generic 503 message
    return ArtifactStoreUnavailable(f"S3 artifact store unavailable: {type(err).__name__}: {err}")


class S3ArtifactStore:
    def __init__(
        self, bucket: str, prefix: str, work_dir: str | os.PathLike[str], client: Any = None
    ) -> None:
        if not bucket:
            raise ValueError("LORITA_ARTIFACTS_URL=s3://... needs a bucket: s3://bucket/prefix")
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.work_dir = Path(work_dir).resolve()
        self._client = client
        self._client_lock = threading.Lock()

    @classmethod
    def from_url(cls, url: str, work_dir: str | os.PathLike[str]) -> S3ArtifactStore:
        rest = url[len("s3://") :]
        bucket, _, prefix = rest.partition("/")
        return cls(bucket, prefix, work_dir)

    @property
    def description(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"

    @property
    def client(self) -> Any:
        with self._client_lock:
            if self._client is None:
                import boto3
                from botocore.config import Config

                # timeouts keep a dead endpoint from hanging a request thread for minutes; retries
                # are boto3's own (AWS_RETRY_MODE, AWS_MAX_ATTEMPTS), which ride out a brief restart
                config = Config(connect_timeout=5, read_timeout=60, s3={"addressing_style": "path"})
                self._client = boto3.session.Session().client("s3", config=config)
            return self._client

    def _object(self, key: str) -> str:
        validate_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _folder(self, prefix: str) -> str:
        return self._object(prefix.rstrip("/")) + "/"

    # writing

    def temp_dir(self) -> Path:
        base = self.work_dir / TMP_DIR
        with no_space_as_store_full():
            base.mkdir(parents=True, exist_ok=True)
            return Path(tempfile.mkdtemp(dir=base))

    def workspace(self, key: str) -> Path:
        return self.work_dir / "jobs" / validate_key(key)

    def put_file(self, key: str, src: str | os.PathLike[str]) -> tuple[int, str]:
        size, sha256 = sha256_file(src)
        try:
            self.client.upload_file(
                str(src), self.bucket, self._object(key), ExtraArgs={"Metadata": {"sha256": sha256}}
            )
        except _client_errors() as err:
            raise _unavailable(err) from None
        return size, sha256

    def put_dir(self, key: str, src: str | os.PathLike[str]) -> None:
        root = Path(src)
        if self.list_prefix(key):
            raise FileExistsError(f"artifact {key} already exists")
        files = [p for p in sorted(root.rglob("*")) if p.is_file()]
        try:
            with ThreadPoolExecutor(UPLOAD_THREADS) as pool:
                for future in [
                    pool.submit(self.put_file, f"{key}/{p.relative_to(root).as_posix()}", p) for p in files
                ]:
                    future.result()
        except BaseException:
            self.delete_prefix(key)  # no half-published folder
            raise
        shutil.rmtree(root, ignore_errors=True)

    # reading

    def open_read(self, key: str, start: int = 0, end: int | None = None) -> BinaryIO:
        args: dict[str, Any] = {"Bucket": self.bucket, "Key": self._object(key)}
        if start or end is not None:
            args["Range"] = f"bytes={start}-{'' if end is None else end}"
        try:
            body: BinaryIO = self.client.get_object(**args)["Body"]
        except _client_errors() as err:
            if _is_not_found(err):
                raise FileNotFoundError(key) from None
            raise _unavailable(err) from None
        return body

    def head(self, key: str) -> dict[str, Any] | None:
        try:
            head: dict[str, Any] = self.client.head_object(Bucket=self.bucket, Key=self._object(key))
        except _client_errors() as err:
            if _is_not_found(err):
                return None
            raise _unavailable(err) from None
        return head

    def size(self, key: str) -> int | None:
        head = self.head(key)
        return None if head is None else int(head["ContentLength"])

    def local_file(self, key: str) -> Path | None:
        return None

    def exists(self, key: str) -> bool:
        return self.head(key) is not None or bool(self._list(key, limit=1))

    def _list(self, prefix: str, limit: int | None = None) -> list[dict[str, Any]]:
        folder = self._folder(prefix)
        found: list[dict[str, Any]] = []
        try:
            pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=folder)
            for page in pages:
                found.extend(page.get("Contents", []))
                if limit is not None and len(found) >= limit:
                    return found[:limit]
        except _client_errors() as err:
            raise _unavailable(err) from None
        return found

    def list_prefix(self, prefix: str) -> list[str]:
        strip = len(self.prefix) + 1 if self.prefix else 0
        return sorted(str(o["Key"])[strip:] for o in self._list(prefix))

    def list_children(self, prefix: str) -> list[str]:
        folder = self._folder(prefix)
        names: set[str] = set()
        try:
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=folder, Delimiter="/"
            )
            for page in pages:
                names.update(
                    str(p["Prefix"])[len(folder) :].rstrip("/") for p in page.get("CommonPrefixes", [])
                )
                names.update(str(o["Key"])[len(folder) :] for o in page.get("Contents", []))
        except _client_errors() as err:
            raise _unavailable(err) from None
        return sorted(n for n in names if n)

    def local_path(self, key: str) -> Path:
        """A cached local copy of the file or folder at ``key`` (downloaded once)."""
        dest = self.work_dir / "cache" / validate_key(key)
        if dest.exists():
            return dest
        with no_space_as_store_full():
            dest.parent.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}."))
        try:
            if self.head(key) is not None:
                got = staging / "file"
                self._download(key, got)
            else:
                keys = self.list_prefix(key)
                if not keys:
                    raise FileNotFoundError(f"artifact {key} is not in the store")
                got = staging / "dir"
                for k in keys:
                    target = got / k[len(key) + 1 :]
                    target.parent.mkdir(parents=True, exist_ok=True)
                    self._download(k, target)
            try:
                os.replace(got, dest)
            except OSError:
                if not dest.exists():  # another process won the race: use its copy
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return dest

    def _download(self, key: str, target: Path) -> None:
        with no_space_as_store_full(target):
            try:
                self.client.download_file(self.bucket, self._object(key), str(target))
            except _client_errors() as err:
                if _is_not_found(err):
                    raise FileNotFoundError(key) from None
                raise _unavailable(err) from None

    # deleting

    def delete_prefix(self, prefix: str) -> None:
        prefix = prefix.rstrip("/")
        keys = [self._object(prefix), *(str(o["Key"]) for o in self._list(prefix))]
        try:
            for i in range(0, len(keys), DELETE_BATCH):
                batch = [{"Key": k} for k in keys[i : i + DELETE_BATCH]]
                self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})
        except _client_errors() as err:
            raise _unavailable(err) from None
        shutil.rmtree(self.work_dir / "cache" / prefix, ignore_errors=True)
