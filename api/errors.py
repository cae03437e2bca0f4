"""One application error type and the handlers that render every error as ``{"detail": "..."}``."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy import exc as sa_exc
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Send

log = logging.getLogger("lorita.api")

# Seconds a client is told to wait when a dependency (the database) is unreachable.
RETRY_AFTER_SECONDS = 5
DATABASE_UNAVAILABLE = (
    "the service's database is unreachable right now; nothing was changed, retry in a few seconds"
)
# Errors that mean "the database cannot be reached" (refused, reset, timed out, pool exhausted), as
# opposed to a query the database refused: the first are a 503 to retry, the second a bug (500).
DATABASE_DOWN_ERRORS: tuple[type[Exception], ...] = (
    sa_exc.OperationalError,
    sa_exc.InterfaceError,
    sa_exc.DisconnectionError,
    sa_exc.TimeoutError,
)


class AppError(StarletteHTTPException):
    """An error a client can act on; ``message`` says what went wrong and how to fix it."""

    def __init__(self, status_code: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(status_code=status_code, detail=message, headers=headers)

    @property
    def message(self) -> str:
        return str(self.detail)


async def send_app_error(send: Send, err: AppError) -> None:
    """Answer ``err`` as ``{"detail": "..."}`` from an ASGI middleware (outside the handlers)."""
    body = json.dumps({"detail": err.detail}).encode()
    headers = [(k.lower().encode(), v.encode()) for k, v in (err.headers or {}).items()]
    headers += [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": err.status_code, "headers": headers})
    await send({"type": "http.response.body", "body": body})


SHOWN_ID_CHARS = 64


def not_found(kind: str, object_id: str) -> AppError:
    """404 naming the id the client sent, cut short when it is too long to be one of ours."""
    shown = (
        object_id
        if len(object_id) <= SHOWN_ID_CHARS
        else f"{object_id[:16]}... ({len(object_id)} characters)"
    )
    return AppError(404, f"{kind} {shown} not found")


def format_request_errors(errors: Sequence[Any]) -> str:
    """Readable one-line text for FastAPI validation errors (same style as core.config)."""
    from core.config import POLICIES, type_error_text

    lines = []
    for e in errors:
        loc = [str(p) for p in e.get("loc", ())]
        if loc and loc[0] == "body":
            loc = loc[1:]
        # a discriminated union adds the tag to the path (compress.global.keep); keep it readable
        where = ".".join(loc) or "body"
        msg = type_error_text(e) or str(e.get("msg", "invalid value"))
        kind = e.get("type")
        if kind == "extra_forbidden":
            msg = "unknown field; remove it (see the schema at /docs for valid fields)"
        elif kind == "union_tag_invalid":
            msg = f"unknown policy; choose one of {', '.join(POLICIES)}"
        elif kind == "json_invalid":
            msg = f"the body is not valid JSON ({e.get('ctx', {}).get('error', msg)})"
        elif msg.startswith("Value error, "):
            msg = msg[len("Value error, ") :]
        lines.append(f"{where}: {msg}")
    return "; ".join(lines)


# FastAPI's own 400 for a body it cannot decode (not UTF-8, a broken multipart stream)
_UNPARSABLE_BODY = "There was an error parsing the body"


def _unreadable_why(cause: BaseException | None) -> str:
    """Why the JSON decoder gave up (FastAPI chains its exception to the 400 it raises)."""
    if isinstance(cause, RecursionError):
        return "it is nested too deeply"
    if isinstance(cause, UnicodeDecodeError):
        return "it is not UTF-8"
    if isinstance(cause, ValueError) and "digits" in str(cause):
        return "it holds a number too long"
    return "not UTF-8, nested too deeply, or a number too long"


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    if exc.status_code == 400 and request.headers.get("content-type", "").startswith("multipart/"):
        # Starlette's own 400s for a form it cannot parse ("Invalid multipart data.", "Missing
        # boundary in multipart."): no route answers 400, so this is the body, and it says how
        reason = str(exc.detail).rstrip(".")
        if request.url.path.startswith("/ui/") and not request.url.path.startswith("/ui/api/"):
            fix = "sign in again from the page (/ui/login) and submit its form as it is"
            return JSONResponse({"detail": f"invalid form body ({reason}); {fix}"}, status_code=422)
        return JSONResponse(
            {
                "detail": f"invalid multipart/form-data body ({reason}); send the file "
                "as a form field named 'file' with a complete multipart body, e.g. curl -F file=@data.npz"
            },
            status_code=422,
        )
    if exc.status_code == 400 and exc.detail == _UNPARSABLE_BODY:
        # bad input like any other: a 422 that says what to send, and why it could not be read
        return JSONResponse(
            {
                "detail": f"invalid request: the body cannot be read as JSON ({_unreadable_why(exc.__cause__)}); "
                "send UTF-8 JSON for job configs, or multipart/form-data for uploads"
            },
            status_code=422,
        )
    return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers)


async def _validation_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    return JSONResponse(
        {"detail": f"invalid request: {format_request_errors(exc.errors())}"}, status_code=422
    )


def _is_database_down(exc: BaseException) -> bool:
    if isinstance(exc, DATABASE_DOWN_ERRORS):
        return True
    # a DBAPI error SQLAlchemy saw invalidate the connection (the server went away mid-query)
    if isinstance(exc, sa_exc.DBAPIError) and exc.connection_invalidated:
        return True
    try:
        import psycopg
    except ImportError:  # pragma: no cover - psycopg is a dependency
        return False
    return isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError)


def database_unavailable_response() -> JSONResponse:
    return JSONResponse(
        {"detail": DATABASE_UNAVAILABLE},
        status_code=503,
        headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
    )


async def _database_error(request: Request, exc: Exception) -> JSONResponse:
    if _is_database_down(exc):
        # one line, not a traceback per request: an outage is a state, not a bug
        log.warning("database unreachable on %s %s: %s", request.method, request.url.path, type(exc).__name__)
        return database_unavailable_response()
    return await _unexpected_error(request, exc)


async def _unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    # Should never happen: every expected failure is an AppError. Log it, never leak a traceback.
    if _is_database_down(exc):  # a driver error SQLAlchemy did not wrap
        return await _database_error(request, exc)
    log.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return JSONResponse(
        {"detail": "internal error: the server failed unexpectedly; try again, and report it if it persists"},
        status_code=500,
    )


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(sa_exc.DBAPIError, _database_error)
    app.add_exception_handler(sa_exc.DisconnectionError, _database_error)
    app.add_exception_handler(sa_exc.TimeoutError, _database_error)
    app.add_exception_handler(Exception, _unexpected_error)
