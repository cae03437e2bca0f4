"""A cap on request bodies, enforced while they stream in (before anything is spooled to disk)."""

from __future__ import annotations

from typing import Annotated

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
