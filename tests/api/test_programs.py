"""Programs over HTTP: ``POST /v1/models`` with a .pt2 and no arch, validated at upload (422 with the
reason, nothing of the upload left on disk), named in a job as ``model.program``; one end-to-end
run through the API and a worker."""

from __future__ import annotations

import json
import pickle
import uuid
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session
from torch import nn

from store.settings import Settings
from tests.api.conftest import Caller, RecordingDispatcher
from tests.api.test_models import model_rows, stored_files

pytestmark = pytest.mark.postgres


class DigitsNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, 32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # digits are (1, 8, 8)
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


@pytest.fixture(scope="module")
def program(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("program") / "digits_net.pt2"
    ep = torch.export.export(
        DigitsNet().eval(), (torch.rand(4, 1, 8, 8),), dynamic_shapes={"x": {0: torch.export.Dim("batch")}}
    )
    torch.export.save(ep, str(path))
    return path


def post_program(client: TestClient, caller: Caller, path: Path, form: dict[str, str] | None = None) -> Any:
    with path.open("rb") as f:
        return client.post(
            "/v1/models", headers=caller.headers, data=form or {}, files={"file": (path.name, f)}
        )


def job_config(program_id: str, **model: Any) -> dict[str, Any]:
    return {
        "model": {"program": program_id, **model},
        "dataset": {"name": "digits"},
        "train": {"factors": 2, "epochs": 1, "batch_size": 64},
        "compress": {"policy": "global", "keep": 0.5},
        "measure": {"latency": False},
        "export": ["safetensors", "pt2"],
        "device": "cpu",
    }


def test_program_upload_is_a_model_of_kind_program(client: TestClient, alice: Caller, program: Path) -> None:
    resp = post_program(client, alice, program)
    assert resp.status_code == 201, resp.text
    body = resp.json()
    assert (body["kind"], body["arch"], body["num_classes"], body["input_shape"]) == (
        "program",
        "program",
        10,
        [1, 8, 8],
    )
    assert body["filename"] == "digits_net.pt2"


def test_hostile_program_is_422_and_nothing_stays(
    client: TestClient, alice: Caller, session: Session, settings: Settings, program: Path, tmp_path: Path
) -> None:
    marker = tmp_path / "PAYLOAD_RAN"

    class Payload:
        def __reduce__(self) -> tuple[object, tuple[str, str]]:
            return (open, (str(marker), "w"))

    hostile = tmp_path / "model.pt2"
    with zipfile.ZipFile(program) as src, zipfile.ZipFile(hostile, "w") as out:
        for info in src.infolist():
            data = src.read(info)
            if info.filename.endswith("model_weights_config.json"):
                cfg = json.loads(data)
                first = next(iter(cfg["config"].values()))
                first["use_pickle"] = True
                data = json.dumps(cfg).encode()
            elif info.filename.endswith("data/weights/weight_0"):
                data = pickle.dumps(Payload())
            out.writestr(info.filename, data)

    resp = post_program(client, alice, hostile)

    assert resp.status_code == 422
    detail = resp.json()["detail"]
    assert detail.startswith("model.pt2: ") and str(tmp_path) not in detail
    assert not marker.exists()
    assert model_rows(session) == 0 and stored_files(settings) == []
    assert not list(Path(settings.artifact_dir).rglob("*.pt2"))


@pytest.mark.parametrize(
    ("form", "name", "expected"),
    [
        ({"num_classes": "10"}, "digits_net.pt2", "num_classes apply to weights"),
        ({}, "digits_net.safetensors", "without arch"),
    ],
)
def test_program_upload_form_errors(
    client: TestClient,
    alice: Caller,
    program: Path,
    tmp_path: Path,
    form: dict[str, str],
    name: str,
    expected: str,
) -> None:
    renamed = tmp_path / name
    renamed.write_bytes(program.read_bytes())
    resp = post_program(client, alice, renamed, form)
    assert resp.status_code == 422 and expected in resp.json()["detail"]


def test_static_batch_program_is_refused_with_how_to_re_export(
    client: TestClient, alice: Caller, tmp_path: Path
) -> None:
    path = tmp_path / "static.pt2"
    torch.export.save(torch.export.export(DigitsNet().eval(), (torch.rand(4, 1, 8, 8),)), str(path))
    resp = post_program(client, alice, path)
    assert resp.status_code == 422
    assert 'dynamic_shapes={"x": {0: torch.export.Dim("batch")}}' in resp.json()["detail"]


def test_jobs_name_programs_as_model_program(
    client: TestClient, alice: Caller, bob: Caller, program: Path, dispatcher: RecordingDispatcher
) -> None:
    program_id = post_program(client, alice, program).json()["id"]
    ok = client.post("/v1/jobs", headers=alice.headers, json=job_config(program_id))
    assert ok.status_code == 202, ok.text
    assert ok.json()["config"]["model"]["num_classes"] == 10
    as_weights = {**job_config(program_id), "model": {"arch": "fcn", "weights": program_id}}
    resp = client.post("/v1/jobs", headers=alice.headers, json=as_weights)
    assert resp.status_code == 422 and "model.program" in resp.json()["detail"]
    resp = client.post("/v1/jobs", headers=alice.headers, json=job_config(program_id, num_classes=12))
    assert resp.status_code == 422 and "returns 10 logits" in resp.json()["detail"]
    assert client.post("/v1/jobs", headers=bob.headers, json=job_config(program_id)).status_code == 404


# ---------------------------------------------------------------------------------------
# end to end: upload, submit, a worker run, the report and the artifacts over HTTP
# ---------------------------------------------------------------------------------------


@pytest.fixture
def service(
    pg_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[TestClient, Caller]]:
    from api.app import create_app
    from api.dispatch import get_broker_ping, get_dispatcher
    from store.db import dispose_engines, session_scope
    from store.repositories import api_keys, tenants
    from store.settings import get_settings

    monkeypatch.setenv("LORITA_DATABASE_URL", pg_url)
    monkeypatch.setenv("LORITA_ARTIFACT_DIR", str(tmp_path / "artifacts"))
    get_settings.cache_clear()
    with session_scope() as session:
        tenant = tenants.create(session, f"e2e-{uuid.uuid4().hex[:6]}")
        key, _ = api_keys.create(session, tenant)
        caller = Caller(tenant, key)
    app = create_app(get_settings())
    app.dependency_overrides[get_dispatcher] = _NoBroker
    app.dependency_overrides[get_broker_ping] = lambda: lambda: None
    with TestClient(app) as client:
        yield client, caller
    dispose_engines()
    get_settings.cache_clear()


class _NoBroker:
    """No broker: the test runs the worker itself."""

    def send(self, job_id: str, config: Any = None) -> None:
        return None


@pytest.mark.slow
def test_program_job_end_to_end_through_the_api_and_a_worker(
    service: tuple[TestClient, Caller], program: Path
) -> None:
    from worker.tasks import execute_job

    client, caller = service
    program_id = post_program(client, caller, program).json()["id"]
    job = client.post("/v1/jobs", headers=caller.headers, json=job_config(program_id))
    assert job.status_code == 202, job.text
    job_id = job.json()["id"]

    outcome = execute_job(job_id, "w1")
    assert outcome == "succeeded", client.get(f"/v1/jobs/{job_id}", headers=caller.headers).json()["error"]

    status = client.get(f"/v1/jobs/{job_id}", headers=caller.headers).json()
    assert status["status"] == "succeeded", status
    report = client.get(f"/v1/jobs/{job_id}/report", headers=caller.headers).json()
    assert set(report["ranks"]) == {"fc1.weight", "fc2.weight"}
    assert all(row["factorized"] or row["reason"] for row in report["ranks"].values())
    assert report["training"]["composed"] == ["fc1.weight", "fc2.weight"]
    assert report["params"]["after"] <= report["params"]["before"]
    names = {
        a["name"] for a in client.get(f"/v1/jobs/{job_id}/artifacts", headers=caller.headers).json()["data"]
    }
    assert {"model.pt2", "model.safetensors", "report.json"} <= names
    pt2 = client.get(f"/v1/jobs/{job_id}/artifacts/model.pt2", headers=caller.headers)
    assert pt2.status_code == 200 and pt2.content[:2] == b"PK"


def test_lorita_submit_uploads_a_local_program(service: tuple[TestClient, Caller], program: Path) -> None:
    """``lorita submit``'s config preparation uploads the .pt2 a config names and puts in its id."""
    import argparse

    from cli.client import LoritaClient
    from cli.service_commands import prepare_config

    client, caller = service
    lorita = LoritaClient("http://testserver", caller.key, transport=client._transport)
    args = argparse.Namespace(arch=None, dataset=None, weights=None, num_classes=None, input_shape=None)
    config = {"model": {"program": program.name}, "dataset": {"name": "digits"}}
    prepared = prepare_config(lorita, config, program.parent, args)
    program_id = prepared["model"]["program"]
    assert program_id != program.name
    listed = client.get(f"/v1/models/{program_id}", headers=caller.headers).json()
    assert (listed["kind"], listed["filename"]) == ("program", program.name)


def test_plan_of_a_program_is_built_in_a_child_process(
    client: TestClient, alice: Caller, program: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``POST /v1/plan`` plans a program job, loading the program only in a spawned child."""
    import api.operating_points as ops

    def never_in_the_api(*_: Any) -> Any:
        raise AssertionError("a program was planned inside the API process")

    monkeypatch.setattr(ops, "build_plan", never_in_the_api)
    program_id = post_program(client, alice, program).json()["id"]
    resp = client.post("/v1/plan", headers=alice.headers, json=job_config(program_id))
    assert resp.status_code == 200, resp.text
    plan = resp.json()
    assert [c["name"] for c in plan["composed"]] == ["fc1.weight", "fc2.weight"]
    assert plan["params"] == 64 * 32 + 32 + 32 * 10 + 10


def test_a_program_plan_that_fails_in_its_child_names_no_server_path(tmp_path: Path) -> None:
    from api.errors import AppError
    from api.operating_points import build_plan_in_child
    from core.config import JobConfig

    missing = tmp_path / "stored" / "program.pt2"
    config = JobConfig.model_validate(job_config(str(missing)))
    with pytest.raises(AppError) as err:
        build_plan_in_child(config, {str(missing): "model 0123"})
    assert err.value.status_code == 422
    assert str(tmp_path) not in err.value.message and "does not exist" in err.value.message
