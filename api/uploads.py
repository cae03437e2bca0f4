"""Uploads: copy to a scratch file with a size cap, hashing as the bytes go by."""

from __future__ import annotations

import hashlib
import re
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Annotated

from fastapi import Depends, Request
from sqlalchemy.orm import Session

from api.errors import RETRY_AFTER_SECONDS, AppError
from store.artifacts import ArtifactStore

CHUNK_BYTES = 1024 * 1024


def human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{n} bytes" if unit == "bytes" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} bytes"


class ValidationSlots:
    """At most ``capacity`` uploads are checked at once in this process (reading archives, arrays
    and weights costs memory and CPU); one more waits ``wait_seconds`` for a slot, then is told
    to retry (503 with Retry-After) instead of piling up."""

    def __init__(self, capacity: int, wait_seconds: float = 2.0) -> None:
        self.capacity = capacity
        self.wait_seconds = wait_seconds
        self._free = threading.BoundedSemaphore(capacity)

    @contextmanager
    def hold(self) -> Iterator[None]:
        if not self._free.acquire(timeout=self.wait_seconds):
            raise AppError(
                503,
                f"the server is checking {self.capacity} other uploads; retry in a few seconds "
                "(the operator sets LORITA_MAX_CONCURRENT_VALIDATIONS)",
                headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
            )
        try:
            yield
        finally:
            self._free.release()


_slots_lock = threading.Lock()


def get_validation_slots(request: Request) -> ValidationSlots:
    state = request.app.state
    with _slots_lock:
        slots: ValidationSlots | None = getattr(state, "validation_slots", None)
        if slots is None:
            slots = state.validation_slots = ValidationSlots(state.settings.max_concurrent_validations)
    return slots


ValidationSlotsDep = Annotated[ValidationSlots, Depends(get_validation_slots)]


def too_large(limit: int) -> AppError:
    return AppError(
        413,
        f"the upload is larger than the limit of {human_bytes(limit)} ({limit} bytes); "
        "send a smaller file or ask the operator to raise LORITA_MAX_UPLOAD_BYTES",
    )


def save_upload(src: IO[bytes], dest: Path, max_bytes: int) -> tuple[int, str]:
    """Copy ``src`` to ``dest``; returns (size, sha256 hex). Past ``max_bytes``: 413, dest removed."""
    digest = hashlib.sha256()
    size = 0
    try:
        with dest.open("wb") as out:
            while chunk := src.read(CHUNK_BYTES):
                size += len(chunk)
                if size > max_bytes:
                    raise too_large(max_bytes)
                digest.update(chunk)
                out.write(chunk)
    except BaseException:
        dest.unlink(missing_ok=True)
        raise
    if size == 0:
        dest.unlink(missing_ok=True)
        raise AppError(422, "the uploaded file is empty")
    return size, digest.hexdigest()


MAX_FILENAME_CHARS = 200


def clean_filename(filename: str | None, default: str) -> str:
    """The client's file name reduced to a safe base name (for display only; never a path).

    Its extension survives: the routes choose the file's kind by it. So characters outside
    ``[A-Za-z0-9._-]`` become ``_`` rather than vanish (``データ.npz`` is ``_.npz``, not ``npz``),
    and a name past the length cap loses the middle, not the end."""
    base = (filename or "").replace("\\", "/").rsplit("/", 1)[-1]
    base = re.sub(r"[^A-Za-z0-9._-]+", "_", base).lstrip(".").rstrip("._")
    if len(base) > MAX_FILENAME_CHARS:
        half = MAX_FILENAME_CHARS // 2
        base = base[:half] + base[-half:]
    return base or default


def commit_record(
    session: Session, insert: Callable[[], object], store: ArtifactStore, files_prefix: str
) -> None:
    """Run ``insert`` (a repository call) and commit; if that fails, delete the files already
    stored under ``files_prefix`` so that a failed upload leaves neither a row nor an orphan file."""
    try:
        insert()
        session.commit()
    except BaseException:
        store.delete_prefix(files_prefix.rstrip("/"))
        raise
