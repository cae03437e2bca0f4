"""Settings come from LORITA_* variables; production refuses the embedded SQLite default."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import pytest
from pydantic import ValidationError

from store.settings import (
    Settings,
    SettingsError,
    child_env,
    get_settings,
    load_settings,
    settings_markdown,
    settings_reference,
)


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


def test_every_setting_has_a_description_and_the_readme_lists_them_all() -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    for name, field in Settings.model_fields.items():
        assert field.description, f"setting {name} has no description"
    # the README carries the generated table (python -m store.settings) verbatim
    assert settings_markdown() in readme
    assert [r[0] for r in settings_reference()] == [f"LORITA_{n.upper()}" for n in Settings.model_fields]


def test_serve_help_lists_every_setting_with_its_default() -> None:
    from cli.main import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    text = sub.choices["serve"].format_help()
    for name, default, _ in settings_reference():
        assert f"{name} (default: {default})" in text


def test_worker_settings_are_validated(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LORITA_QUEUE", " GPU ")
    monkeypatch.setenv("LORITA_SWEEPER", "0")
    monkeypatch.setenv("LORITA_SWEEP_INTERVAL", "2.5")
    settings = Settings()
    assert (settings.queue, settings.sweeper, settings.sweep_interval) == ("gpu", False, 2.5)

    monkeypatch.setenv("LORITA_QUEUE", "tpu")
    monkeypatch.setenv("LORITA_REQUEUE_QUEUED_AFTER", "-1")
    get_settings.cache_clear()
    try:
        with pytest.raises(SettingsError) as info:
            load_settings()
    finally:
        get_settings.cache_clear()
    message = str(info.value)
    assert "LORITA_QUEUE: Input should be 'gpu' or 'cpu'" in message
    assert "LORITA_REQUEUE_QUEUED_AFTER: Input should be greater than 0" in message


def test_child_env_replaces_this_process_settings_and_refuses_unknown_ones(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("LORITA_API_KEY", "lrt_parent")
    monkeypatch.setenv("PYTHONPATH", "/elsewhere")
    env = child_env(
        {"database_url": "sqlite:///x.db", "sweeper": False, "data_dir": None},
        prepend_paths={"PYTHONPATH": "/repo"},
        LORITA_QUEUE="cpu",
        OMP_NUM_THREADS="1",
    )
    lorita = {k: v for k, v in env.items() if k.startswith("LORITA_")}
    assert lorita == {
        "LORITA_DATABASE_URL": "sqlite:///x.db",
        "LORITA_SWEEPER": "false",
        "LORITA_QUEUE": "cpu",
    }
    assert (env["OMP_NUM_THREADS"], env["PYTHONPATH"]) == ("1", f"/repo{os.pathsep}/elsewhere")
    with pytest.raises(KeyError, match="databse_url"):
        child_env({"databse_url": "x"})
    with pytest.raises(KeyError, match="LORITA_QEUE"):
        child_env(LORITA_QEUE="cpu")


def test_only_the_settings_module_reads_the_environment() -> None:
    root = Path(__file__).resolve().parents[2]
    readers = sorted(
        str(path.relative_to(root))
        for package in ("api", "worker", "store", "cli")
        for path in (root / package).rglob("*.py")
        if "os.environ" in (text := path.read_text()) or "getenv(" in text
    )
    assert readers == ["store/settings.py"]
