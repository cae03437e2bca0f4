"""Serving stored files, and the HTTP answer to a failing artifact store.

Downloads from a local store are ``FileResponse`` (sendfile, ETag, Range). Downloads from an S3
store stream through the API: the client needs to reach only the API (the bucket may sit on a
private network, as it does in docker-compose), the API key stays the only credential, and a
``Range`` request is passed on to S3 as a ranged GET, so resuming a large download reads only
the rest. Either way the response carries the file's sha256 in ``X-Checksum-SHA256``.
"""

from __future__ import annotations

import logging
import mimetypes
import re
from collections.abc import Iterator

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse

from api.errors import AppError
from store.artifacts import ArtifactStore, ArtifactStoreFull, ArtifactStoreUnavailable, is_no_space

log = logging.getLogger("lorita.api")

STREAM_CHUNK = 256 * 1024
RETRY_AFTER_S = "5"
_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


def _parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """(first, last) byte of a single ``bytes=`` range, None for the whole file; 416 if unsatisfiable."""
    if not header:
        return None
    match = _RANGE.match(header.strip())
    if match is None:  # several ranges or another unit: RFC 9110 lets a server send the whole file
        return None
    first, last = match.groups()
    if first == "" and last == "":
        return None
    if first == "":  # the last N bytes
        n = int(last)
        if n == 0:
            raise _unsatisfiable(size)
        return max(0, size - n), size - 1
    start = int(first)
    end = size - 1 if last == "" else min(int(last), size - 1)
    if start >= size or end < start:
        raise _unsatisfiable(size)
    return start, end


def _unsatisfiable(size: int) -> AppError:
    return AppError(
        416,
        f"the requested range is outside the file ({size} bytes)",
        headers={"Content-Range": f"bytes */{size}"},
    )


def artifact_response(
    store: ArtifactStore, location: str, filename: str, sha256: str, range_header: str | None
) -> Response:
    """The stored file at ``location`` as a download named ``filename``."""
    media_type = mimetypes.guess_type(filename)[0] or "application/octet-stream"
    base = filename.rsplit("/", 1)[-1]
    headers = {"X-Checksum-SHA256": sha256}
    local = store.local_file(location)
    missing = AppError(
        404, f"the file of artifact {base!r} is missing from the artifact store; contact the operator"
    )
    if local is not None:
        if not local.is_file():
            raise missing
        return FileResponse(local, media_type=media_type, filename=base, headers=headers)
    size = store.size(location)
    if size is None:
        raise missing
    span = _parse_range(range_header, size)
    start, end = span if span is not None else (0, size - 1)
    body = store.open_read(location, start, end) if size else None
    headers |= {
        "Accept-Ranges": "bytes",
        "Content-Length": str(end - start + 1 if size else 0),
        "Content-Disposition": f'attachment; filename="{base}"',
        "ETag": f'"{sha256}"',
    }
    status = 200
    if span is not None:
        status = 206
        headers["Content-Range"] = f"bytes {start}-{end}/{size}"

    def chunks() -> Iterator[bytes]:
        if body is None:
            return
        try:
            while chunk := body.read(STREAM_CHUNK):
                yield chunk
        finally:
            body.close()

    return StreamingResponse(chunks(), status_code=status, media_type=media_type, headers=headers)


async def _store_unavailable(request: Request, exc: Exception) -> JSONResponse:
    log.warning("artifact store unavailable on %s %s: %s", request.method, request.url.path, exc)
    return JSONResponse(
        {"detail": "the artifact store is unavailable right now; try again shortly"},
        status_code=503,
        headers={"Retry-After": RETRY_AFTER_S},
    )


async def _store_full(request: Request, exc: Exception) -> JSONResponse:
    log.error("artifact store full on %s %s", request.method, request.url.path)
    return JSONResponse(
        {"detail": "no space left on the artifact store; try again later or ask the operator to free space"},
        status_code=507,
    )


async def _os_error(request: Request, exc: Exception) -> Response:
    """A full disk while a request writes (an upload's scratch copy) is 507 like a full store;
    any other OSError goes to the app's generic handler."""
    if is_no_space(exc):
        return await _store_full(request, exc)
    fallback = request.app.exception_handlers.get(Exception)
    if fallback is None:
        raise exc
    response: Response = await fallback(request, exc)
    return response


def install_store_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ArtifactStoreUnavailable, _store_unavailable)
    app.add_exception_handler(ArtifactStoreFull, _store_full)
    app.add_exception_handler(OSError, _os_error)
