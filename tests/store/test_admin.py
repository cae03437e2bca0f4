"""``lorita keys create|list|revoke`` in-process against a real SQLite file, and what they say
when the database is not where the settings point."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from cli.main import main
from store.admin import upgrade_db
from store.db import dispose_engines, session_scope
from store.models import ApiKey
from store.repositories import api_keys, tenants
from store.settings import get_settings


@pytest.fixture
def elsewhere(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A working directory with no database, and the default (relative) database URL."""
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    monkeypatch.delenv("LORITA_DATABASE_URL", raising=False)
    get_settings.cache_clear()
    yield cwd
    get_settings.cache_clear()
    dispose_engines()


@pytest.fixture
def db(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    url = f"sqlite:///{tmp_path / 'service' / 'var' / 'lorita.db'}"
    upgrade_db(url)
    monkeypatch.setenv("LORITA_DATABASE_URL", url)
    get_settings.cache_clear()
    yield url
    get_settings.cache_clear()
    dispose_engines()


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize(
    "argv", [["create", "--tenant", "a"], ["list", "--tenant", "a"], ["revoke", "lrt_abcd"]]
)
def test_keys_without_a_database_say_which_file_they_looked_for(
    elsewhere: Path, capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    code, out, err = run(capsys, "keys", *argv)

    assert (code, out) == (1, "")
    expected = elsewhere / "var" / "lorita.db"
    assert f"no lorita database at {expected}" in err and "LORITA_DATABASE_URL" in err
    assert "Traceback" not in err and "sqlalchemy" not in err.lower()
    assert not (elsewhere / "var").exists()  # looking created nothing


def test_keys_on_a_database_without_tables_say_to_upgrade(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    empty = tmp_path / "empty.db"
    empty.touch()
    monkeypatch.setenv("LORITA_DATABASE_URL", f"sqlite:///{empty}")
    get_settings.cache_clear()
    try:
        code, _, err = run(capsys, "keys", "create", "--tenant", "a")
    finally:
        get_settings.cache_clear()
        dispose_engines()
    assert code == 1 and "has no lorita tables; run `lorita db upgrade` first" in err


def _tenant_of(url: str, key: str) -> str | None:
    with session_scope(url) as session:
        tenant = api_keys.tenant_for_key(session, key)
        return None if tenant is None else tenant.name


def test_create_list_and_revoke(db: str, capsys: pytest.CaptureFixture[str]) -> None:
    keys = [run(capsys, "keys", "create", "--tenant", "acme")[1].strip() for _ in range(2)]
    other = run(capsys, "keys", "create", "--tenant", "bob")[1].strip()
    assert [_tenant_of(db, k) for k in (*keys, other)] == ["acme", "acme", "bob"]

    code, out, _ = run(capsys, "keys", "list", "--tenant", "acme")
    lines = out.splitlines()
    assert code == 0 and lines[0].split() == ["prefix", "created", "revoked"]
    assert [line.split()[0] for line in lines[1:]] == [k[:8] for k in keys]
    assert all(line.rstrip().endswith("-") for line in lines[1:])  # none revoked yet
    assert keys[0] not in out  # only prefixes are shown

    code, _, err = run(capsys, "keys", "revoke", keys[0][:8])
    assert code == 0 and f"revoked key {keys[0][:8]}... of tenant 'acme'" in err
    assert [_tenant_of(db, k) for k in (*keys, other)] == [None, "acme", "bob"]
    _, out, _ = run(capsys, "keys", "list", "--tenant", "acme")
    assert "UTC" in out.splitlines()[1].split("  ")[-1]  # the revoked one shows when

    code, _, err = run(capsys, "keys", "revoke", keys[0][:8])
    assert code == 1 and f"no active key starts with {keys[0][:8]!r}" in err
    code, _, err = run(capsys, "keys", "revoke", other, "--tenant", "acme")  # the whole key, wrong tenant
    assert code == 1 and "of tenant 'acme'" in err and _tenant_of(db, other) == "bob"
    assert run(capsys, "keys", "revoke", other)[0] == 0 and _tenant_of(db, other) is None
    code, _, err = run(capsys, "keys", "list", "--tenant", "nobody")
    assert code == 1 and "no tenant named 'nobody'" in err


def test_a_prefix_naming_several_keys_revokes_none(db: str, capsys: pytest.CaptureFixture[str]) -> None:
    with session_scope(db) as session:
        for name in ("acme", "bob"):
            tenant = tenants.get_or_create(session, name)
            session.add(ApiKey(tenant_id=tenant.id, prefix="lrt_same", key_hash=name * 8))

    code, _, err = run(capsys, "keys", "revoke", "lrt_sa")
    assert code == 1 and "2 active keys start with 'lrt_sa' (tenants: acme, bob)" in err
    code, _, err = run(capsys, "keys", "revoke", "lrt_")
    assert code == 1 and "give at least 5 characters" in err
    assert run(capsys, "keys", "revoke", "lrt_same", "--tenant", "bob")[0] == 0
    with session_scope(db) as session:
        assert [k.revoked_at is None for k in api_keys.matching(session, "lrt_same")] == [True]


def test_an_unreachable_database_is_named_without_its_password(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("LORITA_DATABASE_URL", "postgresql+psycopg://lorita:s3cret@127.0.0.1:1/lorita")
    get_settings.cache_clear()
    try:
        code, _, err = run(capsys, "keys", "list", "--tenant", "a")
    finally:
        get_settings.cache_clear()
        dispose_engines()
    assert code == 1 and "cannot open the database postgresql+psycopg://lorita:***@127.0.0.1:1/lorita" in err
    assert "s3cret" not in err and "Traceback" not in err
