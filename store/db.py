"""Engines and sessions. The request (or task) commits once, at the end of ``session_scope``."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import QueuePool

from store.settings import get_settings

SQLITE_BUSY_TIMEOUT_S = 30


def ensure_sqlite_dir(url: str) -> None:
    """Create the parent directory of a SQLite file so the first connect does not fail."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite" and parsed.database and parsed.database != ":memory:":
        Path(parsed.database).expanduser().parent.mkdir(parents=True, exist_ok=True)


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cursor = dbapi_conn.cursor()
    try:
        cursor.execute("PRAGMA foreign_keys=ON")
        # WAL lets the API read while a worker writes; busy_timeout waits instead of failing at once.
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_S * 1000}")
        cursor.execute("PRAGMA synchronous=NORMAL")
    finally:
        cursor.close()


def _pool_kwargs(url: str) -> dict[str, Any]:
    """Pool sizes from the settings, for the engines that use a QueuePool (not in-memory SQLite)."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite" and parsed.database in (None, "", ":memory:"):
        return {}
    settings = get_settings()
    return {"pool_size": settings.db_pool_size, "max_overflow": settings.db_max_overflow}


def make_engine(url: str, **kwargs: Any) -> Engine:
    """A new engine for ``url``; SQLite gets foreign keys, WAL and a lock timeout."""
    if "poolclass" not in kwargs and "pool" not in kwargs:
        for name, value in _pool_kwargs(url).items():
            kwargs.setdefault(name, value)
    backend = make_url(url).get_backend_name()
    if backend == "sqlite":
        ensure_sqlite_dir(url)
        connect_args = {"timeout": SQLITE_BUSY_TIMEOUT_S, "check_same_thread": False}
        engine = create_engine(url, connect_args=connect_args, **kwargs)
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    kwargs.setdefault("pool_pre_ping", True)
    return create_engine(url, **kwargs)


_engines: dict[str, Engine] = {}
_sessionmakers: dict[str, sessionmaker[Session]] = {}
_lock = threading.Lock()


def get_engine(url: str | None = None) -> Engine:
    """The process-wide engine for ``url`` (default: the settings' database_url)."""
    url = url or get_settings().database_url
    with _lock:
        if url not in _engines:
            _engines[url] = make_engine(url)
        return _engines[url]


def get_sessionmaker(url: str | None = None) -> sessionmaker[Session]:
    url = url or get_settings().database_url
    engine = get_engine(url)
    with _lock:
        if url not in _sessionmakers:
            _sessionmakers[url] = sessionmaker(bind=engine, expire_on_commit=False)
        return _sessionmakers[url]


@contextmanager
def session_scope(url: str | None = None) -> Iterator[Session]:
    """A session that commits once when the block ends and rolls back if it raises."""
    session = get_sessionmaker(url)()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def steady_pool_size(engine: Engine) -> int | None:
    """The connections ``engine``'s pool keeps open, or None where checkout never waits.

    More than that in use at once is served by overflow connections, which are opened for one
    checkout and closed when returned: a new server process per request on PostgreSQL. Callers
    that bound their concurrency (the API's database slots) bound it by this number.
    """
    pool = engine.pool
    if not isinstance(pool, QueuePool):
        return None  # NullPool / StaticPool / SingletonThreadPool: no shared limit to wait on
    return pool.size()


def dispose_engines(close: bool = True) -> None:
    """Forget every engine of this process, so the next use connects afresh.

    ``close=True`` (end of tests, shutdown) closes the pooled connections. After a fork pass
    ``close=False``: the child must neither use nor close the sockets it inherited, which the
    parent still owns; they are dropped, and the parent's connections stay intact.
    """
    with _lock:
        for engine in _engines.values():
            engine.dispose(close=close)
        _engines.clear()
        _sessionmakers.clear()
