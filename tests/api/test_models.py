"""POST/GET /v1/models: weights are checked against the architecture; nothing unsafe is stored."""

from __future__ import annotations

import hashlib
import json
import pickle
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import save_file
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from core.zoo import build_model
from store.models import ModelRecord
from store.settings import Settings
from tests.api.conftest import Caller

pytestmark = pytest.mark.postgres

FCN_FORM = {
    "arch": "fcn",
    "num_classes": "10",
    "input_shape": "64",
    "options": json.dumps({"depth": 2, "width": 16}),
}


def fcn_state(num_classes: int = 10) -> dict[str, torch.Tensor]:
    model = build_model("fcn", num_classes, (64,), {"depth": 2, "width": 16})
    return {k: v.contiguous() for k, v in model.state_dict().items()}


def upload(client: TestClient, caller: Caller, path: Path, form: dict[str, str] | None = None) -> Any:
    with path.open("rb") as f:
        return client.post(
            "/v1/models", headers=caller.headers, data=form or FCN_FORM, files={"file": (path.name, f)}
        )


def model_rows(session: Session) -> int:
    return session.scalar(select(func.count()).select_from(ModelRecord)) or 0


def stored_files(settings: Settings) -> list[Path]:
    root = Path(settings.artifact_dir)
    return [p for p in root.rglob("*") if p.is_file()] if root.exists() else []


def test_safetensors_for_fcn_is_stored_with_its_checksum(
    client: TestClient, alice: Caller, session: Session, settings: Settings, tmp_path: Path
) -> None:
    path = tmp_path / "fcn.safetensors"
    save_file(fcn_state(), str(path))

    resp = upload(client, alice, path, FCN_FORM | {"name": "my fcn"})

    assert resp.status_code == 201, resp.text
    body = resp.json()
    assert (body["arch"], body["num_classes"], body["input_shape"], body["name"]) == (
        "fcn",
        10,
        [64],
        "my fcn",
    )
    assert body["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    row = session.get(ModelRecord, body["id"])
    assert row is not None and row.tenant_id == alice.tenant.id
    stored = Path(settings.artifact_dir) / row.location
    assert stored.read_bytes() == path.read_bytes()
    assert client.get(f"/v1/models/{body['id']}", headers=alice.headers).json()["sha256"] == body["sha256"]
    listing = client.get("/v1/models", headers=alice.headers).json()
    assert listing["count"] == 1 and listing["data"][0]["id"] == body["id"]


def test_weights_only_pytorch_checkpoint_is_accepted(
    client: TestClient, alice: Caller, tmp_path: Path
) -> None:
    path = tmp_path / "fcn.pt"
    torch.save({"state_dict": fcn_state()}, path)

    resp = upload(client, alice, path)

    assert resp.status_code == 201, resp.text


def test_mismatched_weights_are_refused_listing_the_keys(
    client: TestClient, alice: Caller, session: Session, settings: Settings, tmp_path: Path
) -> None:
    state = fcn_state(num_classes=5)  # the head has 5 outputs, the form says 10
    state["extra.weight"] = torch.zeros(3)
    path = tmp_path / "wrong.safetensors"
    save_file(state, str(path))

    resp = upload(client, alice, path)

    assert resp.status_code == 422
    detail = resp.json()["detail"]
    assert "extra.weight" in detail and "expected [10" in detail
    assert model_rows(session) == 0 and stored_files(settings) == []


class _Canary:
    """Unpickling this creates a file: the proof that pickle code ran."""

    def __init__(self, target: str) -> None:
        self.target = target

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (Path(self.target),))


@pytest.mark.parametrize("filename", ["evil.pt", "evil.safetensors"])
def test_pickle_payload_is_never_executed(
    client: TestClient, alice: Caller, session: Session, settings: Settings, tmp_path: Path, filename: str
) -> None:
    canary = tmp_path / "pwned"
    path = tmp_path / filename
    path.write_bytes(pickle.dumps({"fc.weight": _Canary(str(canary))}))

    resp = upload(client, alice, path)

    assert 400 <= resp.status_code < 500
    assert not canary.exists()
    assert model_rows(session) == 0 and stored_files(settings) == []


def test_oversized_upload_is_413_and_nothing_is_stored(
    make_client: Any, settings: Settings, alice: Caller, session: Session, tmp_path: Path
) -> None:
    client = make_client(settings.model_copy(update={"max_upload_bytes": 1000}))
    path = tmp_path / "fcn.safetensors"
    save_file(fcn_state(), str(path))

    resp = upload(client, alice, path)

    assert resp.status_code == 413
    assert "1000 bytes" in resp.json()["detail"]
    assert model_rows(session) == 0 and stored_files(settings) == []


def test_truncated_safetensors_is_422(
    client: TestClient, alice: Caller, session: Session, tmp_path: Path
) -> None:
    full = tmp_path / "fcn.safetensors"
    save_file(fcn_state(), str(full))
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(full.read_bytes()[: full.stat().st_size // 2])

    resp = upload(client, alice, cut)

    assert resp.status_code == 422
    assert "could not read weights" in resp.json()["detail"]
    assert model_rows(session) == 0


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("arch", "resnet21", "unknown architecture"),
        ("input_shape", "3,abc", "input_shape"),
        ("options", "{not json", "options is not valid JSON"),
    ],
)
def test_bad_form_fields_are_422_with_the_reason(
    client: TestClient, alice: Caller, tmp_path: Path, field: str, value: str, expected: str
) -> None:
    path = tmp_path / "fcn.safetensors"
    save_file(fcn_state(), str(path))

    resp = upload(client, alice, path, FCN_FORM | {field: value})

    assert resp.status_code == 422
    assert expected in resp.json()["detail"]


def test_body_far_past_the_cap_is_refused_before_it_is_read(
    make_client: Any, settings: Settings, alice: Caller, session: Session
) -> None:
    client = make_client(settings.model_copy(update={"max_upload_bytes": 1000}))
    big = b"\0" * (3 * 1024 * 1024)

    resp = client.post(
        "/v1/models", headers=alice.headers, data=FCN_FORM, files={"file": ("w.safetensors", big)}
    )

    assert resp.status_code == 413 and "1000 bytes" in resp.json()["detail"]
    assert model_rows(session) == 0 and stored_files(settings) == []


def test_chunked_body_past_the_cap_is_refused_while_streaming(
    make_client: Any, settings: Settings, alice: Caller, session: Session
) -> None:
    client = make_client(settings.model_copy(update={"max_upload_bytes": 1000}))
    boundary = "lorita-boundary"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="w.safetensors"\r\n\r\n'
    ).encode()

    def body() -> Any:  # no Content-Length: only counting can stop it
        yield head
        for _ in range(48):
            yield b"\0" * 65536

    headers = alice.headers | {"Content-Type": f"multipart/form-data; boundary={boundary}"}
    resp = client.post("/v1/models", headers=headers, content=body())

    assert resp.status_code == 413 and "1000 bytes" in resp.json()["detail"]
    assert model_rows(session) == 0 and stored_files(settings) == []
