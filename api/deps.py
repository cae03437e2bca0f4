"""``Annotated`` dependency aliases shared by the routes.

Note: connections, threads and the deadlock this layout avoids.
    Sync routes and dependencies run in anyio's thread pool (40 threads). A request's session
    holds its pooled connection from its first query until the session closes, across several
    thread hops (auth, the route, the response validation). With a connection pool smaller than
    the thread pool, 40 threads can all block in the pool's checkout while the requests that hold
    the connections wait for a free thread to finish: nothing moves until the 30 s pool timeout.
    So a request takes a *database slot* on the event loop, before it holds or waits for anything
    in a thread; there are as many slots as the pool keeps connections (``LORITA_DB_POOL_SIZE``),
    so checkout never waits, no overflow connection is opened and closed per request, and a
    thread is only ever used by a request that can finish. Requests beyond that wait
    on the event loop, where waiting costs nothing.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Annotated

import anyio
from fastapi import Depends, FastAPI, Header, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from api.dispatch import Dispatcher, get_broker_ping, get_dispatcher
from api.errors import AppError
from store.artifacts import ArtifactStore, LocalArtifactStore
from store.db import get_engine, get_sessionmaker, steady_pool_size
from store.repositories import api_keys
from store.settings import Settings

# when the engine's pool does not limit checkouts (SQLite in memory, NullPool)
UNPOOLED_DB_SLOTS = 40


async def get_app_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


SettingsDep = Annotated[Settings, Depends(get_app_settings)]


def _db_slots(app: FastAPI, settings: Settings) -> anyio.Semaphore:
    """The app's slot semaphore, one per event loop (a test client runs its own loop)."""
    loop = asyncio.get_running_loop()
    current: tuple[asyncio.AbstractEventLoop, anyio.Semaphore] | None = getattr(app.state, "db_slots", None)
    if current is None or current[0] is not loop:
        capacity = steady_pool_size(get_engine(settings.database_url)) or UNPOOLED_DB_SLOTS
        current = (loop, anyio.Semaphore(capacity))
        app.state.db_slots = current
    return current[1]


async def get_session(request: Request, settings: SettingsDep) -> AsyncIterator[Session]:
    """One session per request, shared by the auth dependency and the route (FastAPI caches a
    dependency within a request). Write routes commit once at their end; the session closes (and
    so rolls back whatever was not committed) on the way out. See the note at the top."""
    async with _db_slots(request.app, settings):
        session = get_sessionmaker(settings.database_url)()
        try:
            yield session
        finally:
            if session.get_transaction() is None:
                session.close()  # no connection was taken: nothing blocks
            else:
                # the rollback is a round trip: off the event loop, shielded so that a client
                # that went away cannot leak the connection, and not behind the capacity limit
                # of the default thread pool
                with anyio.CancelScope(shield=True):
                    await anyio.to_thread.run_sync(session.close, limiter=anyio.CapacityLimiter(1))


SessionDep = Annotated[Session, Depends(get_session)]
# Retry-safe creation (jobs and derived jobs): the same key returns the same job, not a new one.
IdempotencyKey = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        min_length=1,  # an empty key (an unset variable) would make every later submission a replay
        max_length=200,
        description="Retry-safe submission: the same key returns the same job instead of a new one.",
    ),
]


def get_artifact_store(request: Request) -> ArtifactStore:
    store: LocalArtifactStore = request.app.state.artifact_store
    return store


StoreDep = Annotated[ArtifactStore, Depends(get_artifact_store)]

_bearer = HTTPBearer(auto_error=False, description="An API key: `lorita keys create --tenant NAME`.")
_AUTH_HINT = "send 'Authorization: Bearer <api key>'; create a key with `lorita keys create --tenant NAME`"


@dataclass(frozen=True)
class TenantRef:
    """The caller's tenant as the routes need it: plain values, safe to cache across requests
    (an ORM ``Tenant`` belongs to one session and expires when that session rolls back)."""

    id: str
    name: str


class KeyCache:
    """Recently checked API keys (by their sha256) -> tenant, for ``ttl`` seconds.

    Only keys that were valid are kept, so a new or mistyped key always reaches the database; a
    revoked key keeps working for at most ``ttl`` seconds in each API process.
    """

    MAX_ENTRIES = 4096

    def __init__(self, ttl: float) -> None:
        self.ttl = ttl
        self._entries: dict[str, tuple[float, TenantRef]] = {}

    def get(self, key_hash: str) -> TenantRef | None:
        if self.ttl <= 0:
            return None
        entry = self._entries.get(key_hash)
        if entry is None:
            return None
        if entry[0] < time.monotonic():
            self._entries.pop(key_hash, None)
            return None
        return entry[1]

    def put(self, key_hash: str, tenant: TenantRef) -> None:
        if self.ttl <= 0:
            return
        if len(self._entries) >= self.MAX_ENTRIES:
            now = time.monotonic()
            self._entries = {k: v for k, v in self._entries.items() if v[0] >= now}
            if len(self._entries) >= self.MAX_ENTRIES:
                self._entries.clear()
        self._entries[key_hash] = (time.monotonic() + self.ttl, tenant)


def _key_cache(app: FastAPI, settings: Settings) -> KeyCache:
    cache: KeyCache | None = getattr(app.state, "key_cache", None)
    if cache is None:
        cache = app.state.key_cache = KeyCache(settings.auth_cache_seconds)
    return cache


def _lookup_tenant(session: Session, key: str) -> TenantRef | None:
    tenant = api_keys.tenant_for_key(session, key)
    return None if tenant is None else TenantRef(id=tenant.id, name=tenant.name)


async def get_current_tenant(
    request: Request,
    settings: SettingsDep,
    session: SessionDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> TenantRef:
    """The tenant of the bearer key: from the key cache, else one query on the request's session."""
    challenge = {"WWW-Authenticate": "Bearer"}
    if credentials is None or not credentials.credentials:
        raise AppError(401, f"missing API key: {_AUTH_HINT}", headers=challenge)
    cache = _key_cache(request.app, settings)
    key_hash = api_keys.hash_key(credentials.credentials)
    tenant = cache.get(key_hash)
    if tenant is None:
        tenant = await run_in_threadpool(_lookup_tenant, session, credentials.credentials)
        if tenant is None:
            raise AppError(401, f"invalid or revoked API key: {_AUTH_HINT}", headers=challenge)
        cache.put(key_hash, tenant)
    return tenant


CurrentTenant = Annotated[TenantRef, Depends(get_current_tenant)]
DispatcherDep = Annotated[Dispatcher, Depends(get_dispatcher)]
BrokerPingDep = Annotated[Callable[[], None], Depends(get_broker_ping)]
