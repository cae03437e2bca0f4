"""Uploaded models and datasets in a job config: checked per tenant, resolved to files, on a real
database (SQLite and PostgreSQL), for the API's submit and the worker's run alike."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest

from core.config import JobConfig
from store.db import session_scope
from store.models import Dataset, ModelRecord, Tenant
from store.references import (
    ReferenceNotFound,
    UnresolvedReference,
    check_for_submit,
    resolve_for_run,
)
from store.settings import Settings

STORE_ROOT = Path("/srv/lorita-store")  # a server path: must never show in a message


def local_file(location: str) -> Path:
    return STORE_ROOT / location


def add_tenant(db_url: str) -> str:
    with session_scope(db_url) as s:
        tenant = Tenant(name=f"t-{uuid.uuid4().hex[:8]}")
        s.add(tenant)
        s.flush()
        return tenant.id


def add_model(db_url: str, tenant_id: str, **fields: Any) -> str:
    values: dict[str, Any] = {
        "name": "w.safetensors",
        "arch": "fcn",
        "num_classes": 10,
        "input_shape": [64],
        "options": {"depth": 2, "width": 16},
        "filename": "w.safetensors",
        "size_bytes": 1,
        "sha256": "0" * 64,
    } | fields
    with session_scope(db_url) as s:
        record = ModelRecord(tenant_id=tenant_id, location="pending", **values)
        s.add(record)
        s.flush()
        record.location = f"models/{tenant_id}/{record.id}/w.safetensors"
        return record.id


def add_dataset(db_url: str, tenant_id: str, kind: str = "npz", num_classes: int = 10) -> str:
    with session_scope(db_url) as s:
        record = Dataset(
            tenant_id=tenant_id,
            name="d.npz",
            kind=kind,
            num_classes=num_classes,
            input_shape=[64],
            n_train=100,
            n_test=20,
            size_bytes=1,
            sha256="0" * 64,
            location="pending",
        )
        s.add(record)
        s.flush()
        record.location = f"datasets/{tenant_id}/{record.id}/data.npz"
        return record.id


def config(**parts: Any) -> JobConfig:
    data: dict[str, Any] = {"model": {"arch": "fcn"}, "dataset": {"name": "digits"}} | parts
    return JobConfig.model_validate(data)


def test_submit_fills_in_what_the_uploaded_model_fixes(db_url: str, tenant_id: str) -> None:
    model_id = add_model(db_url, tenant_id)
    dataset_id = add_dataset(db_url, tenant_id)
    given = config(model={"arch": "fcn", "weights": model_id}, dataset={"id": dataset_id})
    with session_scope(db_url) as s:
        checked = check_for_submit(s, tenant_id, given)
    assert (checked.model.num_classes, checked.model.options) == (10, {"depth": 2, "width": 16})
    assert (checked.model.weights, checked.dataset.id) == (model_id, dataset_id)  # still ids
    assert given.model.num_classes is None and given.model.options == {}  # the input is not edited


def test_another_tenants_uploads_are_not_found_at_submit_and_at_run(db_url: str, tenant_id: str) -> None:
    other = add_tenant(db_url)
    model_id = add_model(db_url, other)
    dataset_id = add_dataset(db_url, other)
    by_model = config(model={"arch": "fcn", "weights": model_id})
    by_dataset = config(dataset={"id": dataset_id})
    settings = Settings()
    with session_scope(db_url) as s:
        for cfg in (by_model, by_dataset):
            for check in (
                lambda c: check_for_submit(s, tenant_id, c),
                lambda c: resolve_for_run(s, tenant_id, c, local_file, settings),
            ):
                with pytest.raises(ReferenceNotFound) as info:
                    check(cfg)
                message = str(info.value)
                assert (model_id if cfg is by_model else dataset_id) in message
                assert "POST /v1/" in message and str(STORE_ROOT) not in message


@pytest.mark.parametrize(
    ("model", "dataset_kwargs", "expected"),
    [
        ({"arch": "vgg11"}, {}, "model.arch is 'vgg11' but model"),
        ({"arch": "fcn", "num_classes": 3}, {}, "model.num_classes is 3 but model"),
        ({"arch": "fcn", "options": {"depth": 3}}, {}, "model.options {'depth': 3} differ"),
        ({"arch": "fcn"}, {"num_classes": 4}, "model.num_classes is 10 but dataset"),
    ],
)
def test_references_that_do_not_fit_the_config_are_refused(
    db_url: str, tenant_id: str, model: dict[str, Any], dataset_kwargs: dict[str, Any], expected: str
) -> None:
    model_id = add_model(db_url, tenant_id)
    dataset_id = add_dataset(db_url, tenant_id, **dataset_kwargs)
    cfg = config(model=model | {"weights": model_id}, dataset={"id": dataset_id})
    with session_scope(db_url) as s, pytest.raises(UnresolvedReference, match=expected) as info:
        check_for_submit(s, tenant_id, cfg)
    assert not isinstance(info.value, ReferenceNotFound)


@pytest.mark.parametrize(
    ("dataset", "field"),
    [({"path": "/etc/data.npz"}, "dataset.path"), ({"name": "mnist", "root": "/data"}, "dataset.root")],
)
def test_clients_cannot_name_server_paths(
    db_url: str, tenant_id: str, dataset: dict[str, Any], field: str
) -> None:
    with session_scope(db_url) as s, pytest.raises(UnresolvedReference, match=f"{field} is not accepted"):
        check_for_submit(s, tenant_id, config(dataset=dataset))


def test_run_resolves_ids_to_local_files(db_url: str, tenant_id: str) -> None:
    model_id = add_model(db_url, tenant_id)
    dataset_id = add_dataset(db_url, tenant_id)
    cfg = config(model={"arch": "fcn", "weights": model_id}, dataset={"id": dataset_id})
    with session_scope(db_url) as s:
        resolved = resolve_for_run(s, tenant_id, cfg, local_file, Settings())
    assert resolved.model.weights == str(STORE_ROOT / "models" / tenant_id / model_id / "w.safetensors")
    assert resolved.dataset.path == str(STORE_ROOT / "datasets" / tenant_id / dataset_id / "data.npz")
    assert (resolved.dataset.id, resolved.model.num_classes) == (None, 10)
    assert JobConfig.model_validate(resolved.model_dump()) == resolved  # still a valid config


def test_torchvision_data_comes_from_the_operators_folder(db_url: str, tenant_id: str) -> None:
    cfg = config(dataset={"name": "cifar10"})
    with session_scope(db_url) as s:
        with pytest.raises(UnresolvedReference, match=r"LORITA_DATA_DIR.*POST /v1/datasets"):
            resolve_for_run(s, tenant_id, cfg, local_file, Settings(data_dir=None))
        resolved = resolve_for_run(
            s, tenant_id, cfg, local_file, Settings(data_dir="/data/vision", allow_download=True)
        )
    assert (resolved.dataset.root, resolved.dataset.download) == ("/data/vision", True)
