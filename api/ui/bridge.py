"""``/ui/api/...``: the page's scripts reach the JSON API with the sign-in cookie.

The page cannot send ``Authorization`` (its key sits in an HttpOnly cookie), so this ASGI app
checks the cookie and, for anything but GET/HEAD, the CSRF token and the origin; then it hands
the request, body streaming untouched, to the very same ``/v1`` route with the key as a bearer
token. Every check, limit and tenant rule of the API applies unchanged.
"""

from __future__ import annotations

import json

from starlette.requests import Request
from starlette.types import Receive, Scope, Send

from api.ui.security import CSRF_HEADER, csrf_token, same_origin, session_key, tokens_match

PREFIX = "/ui/api"
# The API resources the page uses; anything else under /ui/api is 404.
ALLOWED = ("/jobs", "/datasets", "/models", "/plan")
SAFE_METHODS = ("GET", "HEAD")


async def _answer(send: Send, status: int, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


class UiApiBridge:
    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        request = Request(scope)
        path: str = scope["path"]
        rest = path[len(PREFIX) :] if path.startswith(PREFIX) else path
        if not any(rest == a or rest.startswith(a + "/") for a in ALLOWED):
            await _answer(send, 404, "not found")
            return
        key = session_key(request)
        if key is None:
            await _answer(send, 401, "not signed in: sign in at /ui/login")
            return
        if scope["method"] not in SAFE_METHODS:
            if not same_origin(request):
                await _answer(send, 403, "cross-site request refused")
                return
            if not tokens_match(request.headers.get(CSRF_HEADER), csrf_token(key)):
                await _answer(send, 403, "missing or wrong CSRF token: reload the page and try again")
                return
        headers = [(k, v) for k, v in scope["headers"] if k not in (b"authorization", b"cookie")]
        headers.append((b"authorization", f"Bearer {key}".encode()))
        target = "/v1" + rest
        inner = {
            **{k: v for k, v in scope.items() if k not in ("path_params", "endpoint", "route", "router")},
            "path": target,
            "raw_path": target.encode(),
            "root_path": "",
            "headers": headers,
        }
        await scope["app"](inner, receive, send)
