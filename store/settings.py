"""Every setting of the service and the CLI, read from ``LORITA_*`` environment variables (and a
``.env`` file). This is the only module that reads the environment: the API, the workers, the
store and the CLI take their settings from :func:`get_settings`, and a child process gets its
environment from :func:`child_env`. ``python -m store.settings`` prints the table of settings
that the README carries; ``lorita serve --help`` shows the same list.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from functools import lru_cache
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

MIB = 1024 * 1024
ENV_PREFIX = "LORITA_"
QUEUES = ("gpu", "cpu")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, env_file=".env", extra="ignore")

    env: Literal["development", "production"] = Field(
        default="development",
        description="'production' refuses the embedded SQLite default (a deployment needs PostgreSQL).",
    )
    database_url: str = Field(
        default="sqlite:///./var/lorita.db",
        description="SQLAlchemy URL; Postgres as postgresql+psycopg://user:pass@host/db.",
    )
    broker_url: str | None = Field(
        default=None, description="Celery broker (redis://...); unset: the embedded file-system broker."
    )
    artifact_dir: str = Field(default="./var/artifacts", description="Root of the local artifact store.")
    artifacts_url: str | None = Field(
        default=None,
        description="Where artifacts live: a local directory, or s3://bucket/prefix on an S3-compatible "
        "server (endpoint and credentials the standard AWS way: AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, "
        "AWS_SECRET_ACCESS_KEY, AWS_PROFILE...). Unset: artifact_dir.",
    )
    work_dir: str = Field(
        default="./var/work",
        description="Local scratch of each process when artifacts are in S3: uploads in progress, "
        "a running job's files, cached inputs.",
    )
    max_upload_bytes: int = Field(default=512 * MIB, ge=1, description="Largest accepted upload.")
    max_archive_files: int = Field(default=200_000, ge=1, description="Most entries in a dataset archive.")
    max_archive_bytes: int = Field(
        default=4096 * MIB, ge=1, description="Most bytes a dataset archive may extract to."
    )
    max_image_bytes: int = Field(
        default=64 * MIB, ge=1, description="Largest single image file inside a dataset archive."
    )
    max_image_pixels: int = Field(
        default=4096 * 4096,
        ge=1,
        description="Most pixels (width x height) of one image in a dataset archive.",
    )
    max_dataset_values: int = Field(
        default=256_000_000,
        ge=1,
        description="Most numbers a dataset may hold (samples x values per sample, train and test "
        "together; a worker holds them as float32): 256M = 1 GiB.",
    )
    max_model_parameters: int = Field(
        default=200_000_000,
        ge=1,
        description="Most parameters of a model (an upload's architecture, a job's model), counted "
        "from its options before anything is built.",
    )
    max_json_bytes: int = Field(
        default=1 * MIB, ge=1024, description="Largest JSON request body (a job config), apart from uploads."
    )
    max_concurrent_validations: int = Field(
        default=2,
        ge=1,
        description="Uploads checked at once per API process; more answer 503 with Retry-After.",
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
        default=False, description="Let workers download a missing torchvision dataset into LORITA_DATA_DIR."
    )
    torch_threads: int | None = Field(
        default=None,
        ge=1,
        description="Threads torch may use in a worker's job (unset: torch's default, all cores).",
    )
    log_format: Literal["text", "json"] | None = Field(
        default=None,
        description="'json': one JSON object per log line (with request_id and job_id), 'text': plain "
        "lines with the ids appended; unset: leave logging as uvicorn and celery set it up.",
    )
    worker_metrics_port: int | None = Field(
        default=None,
        ge=1,
        le=65535,
        description="Port where a worker serves its Prometheus metrics (/metrics); unset: none.",
    )
    max_active_jobs: int = Field(
        default=100,
        ge=1,
        description="Queued plus running jobs one tenant may have; more is 429 with Retry-After.",
    )
    max_stored_bytes: int = Field(
        default=50 * 1024 * MIB,
        ge=1,
        description="Bytes of uploads and job outputs one tenant may keep; more is 413 (upload) or "
        "409 (job), until something is deleted.",
    )
    max_job_work: int = Field(
        default=10**15,
        gt=0,
        description="Largest job, as parameters x training samples x epochs (training and "
        "fine-tuning), checked at submit.",
    )
    job_wall_seconds: float = Field(
        default=24 * 3600,
        gt=0,
        description="Longest run of one attempt of a job; past it the worker stops it and the job "
        "fails with a message (the slot frees).",
    )
    artifact_retention_days: float | None = Field(
        default=None,
        gt=0,
        description="Job outputs older than this many days (since the job ended) are deleted by the "
        "workers' housekeeping; unset: kept until deleted.",
    )
    housekeeping_interval: float = Field(
        default=300.0,
        gt=0,
        description="Seconds between two housekeeping passes of a worker (leftover folders, retention).",
    )

    broker_dir: str = Field(
        default="./var/broker",
        description="Folder of the embedded file-system broker (used when LORITA_BROKER_URL is unset).",
    )
    var_dir: str = Field(
        default="./var", description="Folder for the worker's own state files (the celery beat schedule)."
    )
    queue: Literal["gpu", "cpu"] = Field(
        default="cpu",
        description="Queue of a job whose config says device 'auto' (gpu or cpu); 'cpu' and 'cuda' "
        "jobs always go to their own queue.",
    )
    sweeper: bool = Field(
        default=True,
        description="Run the sweeper (requeue expired leases, re-send lost job ids) in every worker.",
    )
    sweep_interval: float = Field(default=15.0, gt=0, description="Seconds between two sweeps of a worker.")
    requeue_queued_after: float = Field(
        default=120.0,
        gt=0,
        description="Seconds a job may stay queued and untouched before the sweeper re-sends its id "
        "(the broker may have lost the message; a duplicate is harmless).",
    )
    url: str = Field(
        default="http://127.0.0.1:8000", description="The service `lorita submit` talks to (its --url)."
    )
    api_key: str | None = Field(
        default=None,
        description="The API key `lorita submit` sends (its --key); create one with `lorita keys create`.",
    )

    @field_validator("queue", mode="before")
    @classmethod
    def _queue_name(cls, value: Any) -> Any:
        return value.strip().lower() if isinstance(value, str) else value

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


class SettingsError(ValueError):
    """Settings a person must fix; the message names each variable and what is wrong."""


def load_settings() -> Settings:
    """:func:`get_settings`, with invalid values reported by variable name (for the CLI at start)."""
    try:
        return get_settings()
    except ValidationError as err:
        problems = []
        for e in err.errors():
            name = ENV_PREFIX + str(e["loc"][0]).upper() if e["loc"] else "settings"
            problems.append(f"{name}: {e['msg']}")
        raise SettingsError("invalid settings: " + "; ".join(problems)) from None


def env_name(field: str) -> str:
    return ENV_PREFIX + field.upper()


def _shown(value: Any) -> str:
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def settings_reference() -> list[tuple[str, str, str]]:
    """(variable, default, description) of every setting, in the order of the model."""
    return [
        (env_name(name), _shown(field.default), field.description or "")
        for name, field in Settings.model_fields.items()
    ]


def settings_help() -> str:
    """The settings as plain text, for ``--help`` epilogs."""
    lines = ["settings (environment variables, or a .env file in the working directory):"]
    for name, default, description in settings_reference():
        lines.append(f"  {name} (default: {default})")
        lines.append(f"      {description}")
    return "\n".join(lines)


def settings_markdown() -> str:
    """The settings as a Markdown table, for the README."""
    rows = ["| variable | default | what it does |", "|---|---|---|"]
    for name, default, description in settings_reference():
        cell = description.replace("|", "\\|")
        rows.append(f"| `{name}` | `{default}` | {cell} |")
    return "\n".join(rows)


def export_to_libraries(name: str, value: str) -> None:
    """Set a variable that a library reads itself (not a lorita setting), in this process and
    its children: e.g. prometheus_client's documented ``PROMETHEUS_MULTIPROC_DIR``."""
    if name.startswith(ENV_PREFIX):
        raise KeyError(f"{name} is a lorita setting; pass settings to child processes with child_env()")
    os.environ[name] = value


def child_env(
    settings: Mapping[str, Any] | None = None,
    *,
    prepend_paths: Mapping[str, str] | None = None,
    **extra: str,
) -> dict[str, str]:
    """The environment of a child process: this one's, less its ``LORITA_*`` variables, plus
    ``settings`` (field name -> value; unknown names are refused) and ``extra`` variables.

    ``extra`` may name ``LORITA_*`` variables too; they must be settings as well.
    ``prepend_paths`` puts a folder in front of a search path (e.g. ``PYTHONPATH``).
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}
    for name, folder in (prepend_paths or {}).items():
        env[name] = os.pathsep.join(p for p in (folder, env.get(name, "")) if p)
    known = {env_name(name) for name in Settings.model_fields}
    for field, value in (settings or {}).items():
        if field not in Settings.model_fields:
            raise KeyError(f"{field!r} is not a setting; see store.settings.Settings")
        if value is not None:
            env[env_name(field)] = _shown(value)
    for name, value in extra.items():
        if name.startswith(ENV_PREFIX) and name not in known:
            raise KeyError(f"{name} is not a setting; see store.settings.Settings")
        env[name] = value
    return env


if __name__ == "__main__":
    print(settings_markdown())
