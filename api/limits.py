"""Bounds on what a request may hold: a cap on bodies, enforced while they stream in (before
anything is spooled to disk); query integers the database can hold; text the database can store."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any

from fastapi import Query
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.errors import AppError, send_app_error
from api.uploads import too_large

# The largest value of a PostgreSQL INTEGER (event ids, counts): a query integer past it would
# overflow in the database driver (a 500), so the schema refuses it (a 422 naming the parameter).
MAX_QUERY_INT = 2**31 - 1

Offset = Annotated[
    int, Query(ge=0, le=MAX_QUERY_INT, description="Items to skip (for paging), 0..2147483647.")
]


# Text PostgreSQL cannot store: a NUL character (in a text column or in JSONB) and, in JSON, an
# unpaired UTF-16 surrogate such as "\ud800" (Python decodes it; the driver cannot encode it).
# Either reaching a query was a 500; they are refused first, naming the field.
def _unstorable(text: str) -> str | None:
    if "\x00" in text:
        return "holds a NUL character (\\u0000)"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return "holds an unpaired surrogate (e.g. \\ud800), which is not Unicode text"
    return None


def _first_unstorable(value: Any, where: str) -> tuple[str, str] | None:
    if isinstance(value, str):
        why = _unstorable(value)
        return (where, f"the text {why}") if why is not None else None
    if isinstance(value, Mapping):
        for key, item in value.items():
            key_text = str(key)
            path = f"{where}.{key_text}" if where else key_text
            why = _unstorable(key_text)
            if why is not None:
                return (where or "body", f"a key {why}")
            found = _first_unstorable(item, path)
            if found is not None:
                return found
    elif isinstance(value, list | tuple):
        for index, item in enumerate(value):
            found = _first_unstorable(item, f"{where}.{index}" if where else str(index))
            if found is not None:
                return found
    return None


def check_text(value: Any, where: str = "") -> None:
    """422 naming the first string of ``value`` (nested dicts and lists included, keys too) that
    cannot be stored; ``where`` is the field's name, the prefix of the path in the message."""
    found = _first_unstorable(value, where)
    if found is not None:
        path, why = found
        raise AppError(422, f"{path or 'body'}: {why}; remove it")


def json_too_large(limit: int) -> AppError:
    return AppError(
        413,
        f"the request body is larger than {limit} bytes, the limit for JSON requests "
        "(LORITA_MAX_JSON_BYTES); a job config is a few kilobytes: send a smaller one",
    )


class BodySizeLimit:
    """Refuse bodies past their cap: at once by Content-Length, or mid-stream by counting.

    Uploads (multipart) may reach ``max_bytes``; every other body (JSON: job configs) only
    ``json_max_bytes``, so a 25 MB config is refused before it is parsed. Mid-stream the overflow
    raises an ``AppError(413)`` out of ``receive``; FastAPI passes HTTP errors raised while
    reading the body through to the error handler unchanged.
    """

    def __init__(
        self, app: ASGIApp, max_bytes: int, file_limit: int | None = None, json_max_bytes: int | None = None
    ) -> None:
        self.app = app
        self.max_bytes = max_bytes
        # the limit people configure (LORITA_MAX_UPLOAD_BYTES), named in the message
        self.file_limit = file_limit or max_bytes
        self.json_max_bytes = json_max_bytes

    def _limit(self, headers: dict[bytes, bytes]) -> tuple[int, AppError]:
        if self.json_max_bytes is None or headers.get(b"content-type", b"").startswith(b"multipart/"):
            return self.max_bytes, too_large(self.file_limit)
        return self.json_max_bytes, json_too_large(self.json_max_bytes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        limit, err = self._limit(headers)
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await send_app_error(send, err)
            return
        received = 0

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise err
            return message

        await self.app(scope, receive if scope["method"] in ("GET", "HEAD") else counting_receive, send)


NUL_IN_PATH = AppError(
    404, "the URL holds a NUL character (%00), which no id or file name contains; check the URL"
)


class RefuseNulPath:
    """404 for a URL path holding NUL: no object's id or name contains one, and PostgreSQL cannot
    even compare text with it (every id route answered 500)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and "\x00" in scope["path"]:
            await send_app_error(send, NUL_IN_PATH)
            return
        await self.app(scope, receive, send)
