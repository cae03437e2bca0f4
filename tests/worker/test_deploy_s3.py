"""Static checks of the deployment files' artifact store, logging and metrics settings (no Docker
engine needed): every app service reads the same store setting, the `s3` profile brings an
S3-compatible server with its bucket, and the values are ones the settings model accepts."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from store.artifacts import LocalArtifactStore, open_artifact_store
from store.s3 import S3ArtifactStore
from store.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
APP_SERVICES = ("api", "worker", "worker-cpu")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def expand(value: str, env: dict[str, str]) -> str:
    """Compose's ${NAME:-default} substitution."""
    return re.sub(r"\$\{(\w+):-([^}]*)\}", lambda m: env.get(m.group(1)) or m.group(2), value)


def test_app_services_share_the_store_setting_and_log_json(compose: dict[str, Any]) -> None:
    for name in APP_SERVICES:
        env = compose["services"][name]["environment"]
        assert env["LORITA_ARTIFACTS_URL"] == "${LORITA_ARTIFACTS_URL:-/data/artifacts}"
        assert env["LORITA_LOG_FORMAT"] == "json" and env["LORITA_WORK_DIR"] == "/data/work"
        for var in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            assert var in env
        # the s3 profile's bucket is waited for when the profile is on, ignored otherwise
        bucket = compose["services"][name]["depends_on"]["minio-bucket"]
        assert bucket == {"condition": "service_completed_successfully", "required": False}
    for name in ("worker", "worker-cpu"):
        port = compose["services"][name]["environment"]["LORITA_WORKER_METRICS_PORT"]
        assert Settings(worker_metrics_port=int(port)).worker_metrics_port == 9100


def test_the_store_setting_resolves_to_the_volume_by_default_and_to_s3_with_the_profile(
    compose: dict[str, Any], tmp_path: Path
) -> None:
    raw = compose["services"]["api"]["environment"]["LORITA_ARTIFACTS_URL"]
    default = open_artifact_store(expand(raw, {}), tmp_path)
    with_s3 = open_artifact_store(expand(raw, {"LORITA_ARTIFACTS_URL": "s3://lorita/artifacts"}), tmp_path)
    assert isinstance(default, LocalArtifactStore) and str(default.root) == "/data/artifacts"
    assert "artifacts:/data/artifacts" in compose["services"]["api"]["volumes"]
    assert isinstance(with_s3, S3ArtifactStore) and (with_s3.bucket, with_s3.prefix) == (
        "lorita",
        "artifacts",
    )


def test_the_s3_profile_runs_minio_and_creates_the_bucket(compose: dict[str, Any]) -> None:
    services = compose["services"]
    minio, bucket = services["minio"], services["minio-bucket"]
    assert minio["profiles"] == ["s3"] and bucket["profiles"] == ["s3"]
    assert minio["environment"]["MINIO_ROOT_USER"] == "${AWS_ACCESS_KEY_ID:-lorita}"
    assert minio["environment"]["MINIO_ROOT_PASSWORD"] == "${AWS_SECRET_ACCESS_KEY:-lorita-secret}"
    assert "miniodata:/data" in minio["volumes"] and "miniodata" in compose["volumes"]
    assert bucket["depends_on"]["minio"]["condition"] == "service_healthy"
    assert "mc mb --ignore-existing store/lorita" in " ".join(bucket["command"])
    # the profile's default credentials are the ones the app services send
    app_env = services["api"]["environment"]
    assert app_env["AWS_ACCESS_KEY_ID"] == minio["environment"]["MINIO_ROOT_USER"]


def test_dockerfile_sets_the_work_dir_and_json_logs() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert "LORITA_WORK_DIR=/data/work" in text and "LORITA_LOG_FORMAT=json" in text
    assert re.search(r"mkdir -p [^\n]*/data/work", text)
