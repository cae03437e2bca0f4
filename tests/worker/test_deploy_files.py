"""Static checks of the Dockerfile and docker-compose.yml (no Docker engine is needed)."""

from __future__ import annotations

import re
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_compose_has_the_services_with_healthchecks(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert {"postgres", "redis", "migrate", "api", "worker"} <= set(services)
    assert "pg_isready" in " ".join(services["postgres"]["healthcheck"]["test"])
    assert services["redis"]["healthcheck"]["test"][-2:] == ["redis-cli", "ping"]
    assert "/healthz" in " ".join(services["api"]["healthcheck"]["test"])
    assert services["migrate"]["command"] == ["lorita", "db", "upgrade"]
    assert services["api"]["ports"] == ["8000:8000"]


@pytest.mark.parametrize("name", ["api", "worker", "worker-cpu"])
def test_app_services_wait_for_migration_and_healthy_servers(compose: dict[str, Any], name: str) -> None:
    depends = compose["services"][name]["depends_on"]
    assert depends["migrate"]["condition"] == "service_completed_successfully"
    assert depends["postgres"]["condition"] == "service_healthy"
    assert depends["redis"]["condition"] == "service_healthy"


def test_services_share_settings_and_the_artifact_volume(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name in ("api", "worker", "worker-cpu"):
        env = services[name]["environment"]
        assert env["LORITA_DATABASE_URL"].startswith("postgresql+psycopg://")
        assert env["LORITA_BROKER_URL"] == "redis://redis:6379/0"
        assert "artifacts:/data/artifacts" in services[name]["volumes"]
    assert {"pgdata", "redisdata", "artifacts"} <= set(compose["volumes"])
    assert "pgdata:/var/lib/postgresql/data" in services["postgres"]["volumes"]


def test_worker_reserves_one_gpu_and_consumes_the_gpu_queue(compose: dict[str, Any]) -> None:
    worker = compose["services"]["worker"]
    (device,) = worker["deploy"]["resources"]["reservations"]["devices"]
    assert (device["driver"], device["count"], device["capabilities"]) == ("nvidia", 1, ["gpu"])
    assert worker["environment"]["LORITA_WORKER_QUEUE"] == "gpu"
    assert compose["services"]["worker-cpu"]["environment"]["LORITA_WORKER_QUEUE"] == "cpu"


def test_dockerfile_pins_torch_runs_as_non_root_and_installs_the_project() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11-slim\b", text, re.M)
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    for pin in ("torch==2.14.1", "torchvision==0.29.1"):
        assert pin in deps and pin in text
    users = re.findall(r"^USER (\S+)", text, re.M)
    assert users and users[-1] not in ("root", "0")
    assert re.search(r"^RUN pip install \.", text, re.M)
    entry = ROOT / "docker" / "entrypoint.sh"
    assert entry.stat().st_mode & 0o111
    assert "exec lorita serve" in entry.read_text() and "exec lorita worker" in entry.read_text()
    for copied in re.findall(r"^COPY (?:--\S+ )*(\S+) ", text, re.M):
        if "*" not in copied:
            assert (ROOT / copied).exists(), f"Dockerfile copies {copied}, which does not exist"


def test_dockerignore_keeps_the_context_small() -> None:
    ignored = set((ROOT / ".dockerignore").read_text().split())
    assert {".git", ".venv", "var", "tests"} <= ignored


@pytest.mark.skipif(shutil.which("docker") is None, reason="no docker client")
def test_docker_compose_config_when_the_plugin_exists() -> None:
    probe = subprocess.run(["docker", "compose", "version"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip("the docker compose plugin is not installed")
    done = subprocess.run(["docker", "compose", "config", "-q"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
