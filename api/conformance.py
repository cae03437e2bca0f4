"""HTTP method conformance and the error responses the OpenAPI schema declares.

- ``HEAD`` is answered wherever ``GET`` is (RFC 9110 9.3.2): the GET route runs, the body is dropped.
- ``OPTIONS`` answers 204 with ``Allow`` listing every method of the path (all its routes together).
- A method a path does not have is a 405 whose ``Allow`` lists the path's methods (Starlette's own
  405 names only the first route that matched the path, e.g. GET where GET and POST both exist).
- The schema: every error body is ``{"detail": "..."}`` (422 included, as the handlers render it),
  and each operation declares the errors it can answer: 401 where a key is needed, 404 where a
  path names an object, 409 on writes, 413 where a body is sent, 429/503 with ``Retry-After``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from fastapi.routing import iter_route_contexts
from pydantic import BaseModel, Field
from starlette.types import ASGIApp, Message, Receive, Scope, Send

ALWAYS = ("OPTIONS",)


class ErrorBody(BaseModel):
    """Every error the service answers: a message a person can act on."""

    detail: str = Field(description="What is wrong and how to fix it.")


def _route_table(app: Any) -> list[tuple[re.Pattern[str], frozenset[str]]]:
    """(path regex, methods) of every route, built once per app (again if routes are added)."""
    routes = getattr(app, "routes", [])
    state = getattr(app, "state", None)
    cached = getattr(state, "route_methods", None) if state is not None else None
    if cached is not None and cached[0] == len(routes):
        return cached[1]
    table = []
    for route in iter_route_contexts(routes):
        regex = getattr(route, "path_regex", None)
        route_methods: Iterable[str] | None = getattr(route, "methods", None)
        if regex is not None and route_methods is not None:
            table.append((regex, frozenset(m.upper() for m in route_methods)))
    if state is not None:
        state.route_methods = (len(routes), table)
    return table


def allowed_methods(app: Any, path: str) -> set[str]:
    """Methods of every route of ``app`` matching ``path`` (HEAD with GET, OPTIONS always); empty
    when no route matches."""
    methods: set[str] = set()
    for regex, route_methods in _route_table(app):
        if regex.match(path):
            methods.update(route_methods)
    if methods:
        methods.update(ALWAYS)
        if "GET" in methods:
            methods.add("HEAD")
    return methods


def _allow_header(methods: set[str]) -> bytes:
    return ", ".join(sorted(methods)).encode()


async def _send_plain(send: Send, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class MethodConformance:
    """ASGI middleware giving HEAD, OPTIONS and 405 their standard meaning on every route."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        method = scope["method"].upper()
        if method not in ("HEAD", "OPTIONS"):
            # the common case costs nothing: only a 405 on its way out is rewritten
            await self.app(scope, receive, _full_allow_on_405(scope, send))
            return
        methods = allowed_methods(scope.get("app"), scope["path"])
        if not methods:
            await self.app(scope, receive, send)  # no such path: the router's 404
            return
        if method == "OPTIONS":
            await _send_plain(send, 204, [(b"allow", _allow_header(methods)), (b"content-length", b"0")], b"")
            return
        if "GET" not in methods:
            await _send_405(send, scope, methods)
            return
        try:
            await self.app({**scope, "method": "GET"}, receive, _headers_only(send))
        except* _HeadersSent:  # plain, or inside a streaming response's task group
            pass


async def _send_405(send: Send, scope: Scope, methods: set[str]) -> None:
    allow = _allow_header(methods)
    body = json.dumps(
        {"detail": f"{scope['method']} is not allowed on {scope['path']}; allowed: {allow.decode()}"}
    ).encode()
    headers = [
        (b"allow", allow),
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
    ]
    await _send_plain(send, 405, headers, body)


def _full_allow_on_405(scope: Scope, send: Send) -> Send:
    """Starlette's 405 lists the methods of the first route that matched the path only; this one
    lists all the path's methods, with a message saying so."""
    replaced = False

    async def send_or_replace(message: Message) -> None:
        nonlocal replaced
        if message["type"] == "http.response.start" and message["status"] == 405:
            methods = allowed_methods(scope.get("app"), scope["path"])
            if methods:
                replaced = True
                await _send_405(send, scope, methods)
                return
        if replaced:
            return  # the original 405's body
        await send(message)

    return send_or_replace


class _HeadersSent(Exception):
    """Raised into the GET route once a HEAD answer's headers are out: the route stops there
    (a stream, e.g. server-sent events, would otherwise run until the job ends)."""


def _headers_only(send: Send) -> Send:
    async def send_headers(message: Message) -> None:
        if message["type"] == "http.response.start":
            await send(message)
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            raise _HeadersSent
        if message["type"] != "http.response.body":
            await send(message)

    return send_headers


# ---------------------------------------------------------------- the schema

_ERROR_REF = {"$ref": "#/components/schemas/ErrorBody"}
_RETRY_AFTER = {
    "Retry-After": {"description": "Seconds to wait before retrying.", "schema": {"type": "integer"}}
}
_DESCRIPTIONS = {
    "401": "Missing, invalid or revoked API key.",
    "404": "Not found, or another tenant's.",
    "409": "Conflicts with the object's state (e.g. a finished job, an Idempotency-Key reused).",
    "413": "The body is larger than the service accepts.",
    "422": "Invalid input; the message names the field and what to change.",
    "429": "A quota or rate limit is reached; retry after Retry-After seconds.",
    "503": "A dependency (the database) is unreachable or the service is busy; retry after Retry-After seconds.",
    "507": "No space left on the artifact store.",
}
_WRITES = ("post", "put", "patch", "delete")
# reads that answer 409 too: a job's report exists only once the job has succeeded
_READ_CONFLICTS = {("get", "/v1/jobs/{job_id}/report")}


def _error_response(code: str) -> dict[str, Any]:
    response: dict[str, Any] = {
        "description": _DESCRIPTIONS[code],
        "content": {"application/json": {"schema": _ERROR_REF}},
    }
    if code in ("429", "503"):
        response["headers"] = _RETRY_AFTER
    return response


def _errors_of(path: str, method: str, operation: dict[str, Any]) -> list[str]:
    codes = []
    secured = bool(operation.get("security"))
    if secured:
        codes += ["401", "503"]
    if "{" in path:
        codes.append("404")
    if method in _WRITES and secured:
        codes += ["409", "429"]
    if (method, path) in _READ_CONFLICTS:
        codes.append("409")
    if "requestBody" in operation:
        codes += ["413", "422"]
        content = operation["requestBody"].get("content", {})
        if "multipart/form-data" in content:
            codes.append("507")
    if operation.get("parameters") or "{" in path:
        codes.append("422")
    return codes


def declare_errors(schema: dict[str, Any]) -> dict[str, Any]:
    """Add the error responses each operation can answer, all as ``ErrorBody``; in place."""
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    components["ErrorBody"] = ErrorBody.model_json_schema()
    for name in ("HTTPValidationError", "ValidationError"):
        components.pop(name, None)
    for path, item in schema.get("paths", {}).items():
        for method, operation in item.items():
            if method not in ("get", "post", "put", "patch", "delete"):
                continue
            responses = operation.setdefault("responses", {})
            for code in _errors_of(path, method, operation):
                declared = responses.get(code)
                if declared is None or code == "422":
                    responses[code] = _error_response(code)
                else:
                    declared.setdefault("content", {"application/json": {"schema": _ERROR_REF}})
                    if code in ("429", "503"):
                        declared.setdefault("headers", _RETRY_AFTER)
    text = json.dumps(schema)
    if "HTTPValidationError" in text:  # a route that referenced it directly
        text = re.sub(r"#/components/schemas/HTTPValidationError", "#/components/schemas/ErrorBody", text)
        schema.clear()
        schema.update(json.loads(text))
    return schema


def install(app: FastAPI) -> None:
    """The method middleware, and a schema that declares the errors the handlers really send."""
    app.add_middleware(MethodConformance)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(
                title=app.title,
                version=app.version,
                openapi_version=app.openapi_version,
                description=app.description,
                routes=app.routes,
                tags=app.openapi_tags,
                servers=app.servers,
            )
            app.openapi_schema = declare_errors(schema)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
