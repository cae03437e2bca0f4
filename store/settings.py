"""Service settings, read from ``LORITA_*`` environment variables (and a ``.env`` file)."""

from __future__ import annotations

from functools import lru_cache
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

MIB = 1024 * 1024


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LORITA_", env_file=".env", extra="ignore")

    env: Literal["development", "production"] = "development"
    database_url: str = Field(
        default="sqlite:///./var/lorita.db",
        description="SQLAlchemy URL; Postgres as postgresql+psycopg://user:pass@host/db.",
    )
    broker_url: str | None = Field(
        default=None, description="Celery broker (redis://...); None means the embedded local broker."
    )
    artifact_dir: str = Field(default="./var/artifacts", description="Root of the local artifact store.")
    max_upload_bytes: int = Field(default=512 * MIB, ge=1, description="Largest accepted upload.")
    max_archive_files: int = Field(default=200_000, ge=1, description="Most entries in a dataset archive.")
    max_archive_bytes: int = Field(
        default=4096 * MIB, ge=1, description="Most bytes a dataset archive may extract to."
    )
    lease_seconds: int = Field(default=60, ge=5, description="A running job's lease, renewed by heartbeats.")
    max_attempts: int = Field(default=3, ge=1, le=100, description="Runs of a job before it fails.")
    db_pool_size: int = Field(
        default=10, ge=1, description="Database connections each process keeps open (per API worker)."
    )
    db_max_overflow: int = Field(
        default=10, ge=0, description="Extra connections a process may open under load, closed when idle."
    )
    auth_cache_seconds: float = Field(
        default=5.0,
        ge=0,
        description="How long the API trusts a checked API key without asking the database again; "
        "a revoked key stops working within this time. 0 checks every request.",
    )
    data_dir: str | None = Field(
        default=None,
        description="Directory holding the torchvision datasets (mnist, fashion-mnist, cifar10, cifar100) "
        "that jobs over HTTP may name; clients cannot give a path themselves.",
    )
    allow_download: bool = Field(
        default=False, description="Let workers download a missing torchvision dataset into data_dir."
    )
    torch_threads: int | None = Field(
        default=None,
        ge=1,
        description="Threads torch may use in a worker's job (None: torch's default, all cores).",
    )

    @model_validator(mode="after")
    def _production_needs_real_servers(self) -> Settings:
        # The embedded defaults are for one machine; refuse them where a deployment is declared.
        if self.env == "production" and self.database_url.startswith("sqlite"):
            raise ValueError("LORITA_ENV=production needs LORITA_DATABASE_URL to point at PostgreSQL")
        return self

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")


@lru_cache
def get_settings() -> Settings:
    return Settings()
