"""The page's sign-in and its defences against cross-site requests.

Note: what protects a form post.
    The API key a person signs in with is kept in an HttpOnly, SameSite=Strict cookie: scripts on
    the page cannot read it, and a browser does not send it with a request another site starts.
    On top of that every state-changing request must carry a CSRF token (a form field or the
    ``X-CSRF-Token`` header) and, when the browser says where it comes from (``Origin``, else
    ``Referer``), come from this very origin. The token is an HMAC of a fixed label keyed by the
    API key itself: tied to the session, unguessable without the key, and nothing to store on the
    server. The sign-in form, before any session exists, uses a random token that must match a
    short-lived cookie of its own (double submit).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from urllib.parse import urlsplit

from fastapi import Request, Response

SESSION_COOKIE = "lorita_session"
LOGIN_COOKIE = "lorita_login"
CSRF_FIELD = "csrf"
CSRF_HEADER = "x-csrf-token"
SESSION_MAX_AGE = 12 * 3600
_CSRF_LABEL = b"lorita-ui-csrf-v1"


def csrf_token(api_key: str) -> str:
    return hmac.new(api_key.encode("utf-8"), _CSRF_LABEL, hashlib.sha256).hexdigest()


def tokens_match(given: str | None, expected: str) -> bool:
    return bool(given) and hmac.compare_digest(str(given), expected)


def session_key(request: Request) -> str | None:
    key = request.cookies.get(SESSION_COOKIE)
    return key if key and len(key) <= 200 else None


def _origin_of(url: str) -> str | None:
    parts = urlsplit(url)
    if not parts.scheme or not parts.netloc:
        return None
    return f"{parts.scheme}://{parts.netloc}".lower()


def own_origin(request: Request) -> str:
    host = request.headers.get("host") or request.url.netloc
    return f"{request.url.scheme}://{host}".lower()


def same_origin(request: Request) -> bool:
    """True unless the browser says the request comes from another origin.

    ``Origin: null`` (a sandboxed frame, a ``data:`` page) is another origin. Without either
    header (an old browser, a command-line client) the CSRF token alone decides.
    """
    origin = request.headers.get("origin")
    if origin is not None:
        return origin.lower() == own_origin(request)
    referer = request.headers.get("referer")
    if referer:
        return _origin_of(referer) == own_origin(request)
    return True


def set_session_cookie(response: Response, request: Request, api_key: str) -> None:
    response.set_cookie(
        SESSION_COOKIE,
        api_key,
        max_age=SESSION_MAX_AGE,
        path="/",
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
    )


def clear_session_cookie(response: Response) -> None:
    response.delete_cookie(SESSION_COOKIE, path="/", httponly=True, samesite="strict")


def new_login_token() -> str:
    return secrets.token_urlsafe(24)


def set_login_cookie(response: Response, request: Request, token: str) -> None:
    response.set_cookie(
        LOGIN_COOKIE,
        token,
        max_age=3600,
        path="/ui/login",
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
    )
