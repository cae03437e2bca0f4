"""Settings come from LORITA_* variables; production refuses the embedded SQLite default."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from store.settings import Settings


def test_environment_variables_are_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LORITA_DATABASE_URL", "postgresql+psycopg://u@h/db")
    monkeypatch.setenv("LORITA_MAX_UPLOAD_BYTES", "123")

    settings = Settings()

    assert (settings.database_url, settings.max_upload_bytes, settings.is_sqlite) == (
        "postgresql+psycopg://u@h/db",
        123,
        False,
    )


def test_production_with_sqlite_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LORITA_ENV", "production")
    monkeypatch.delenv("LORITA_DATABASE_URL", raising=False)

    with pytest.raises(ValidationError, match="PostgreSQL"):
        Settings()
