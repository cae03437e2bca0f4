"""Uploaded models and datasets named by a job config: checked and resolved in one place.

A job config reaches the service with references (``model.weights`` = an uploaded model's id,
``dataset.id`` = an uploaded dataset's id) and leaves for the pipeline with local files. Both ends
go through the tenant-scoped repositories, so a job can only ever use its own tenant's uploads:

* :func:`check_for_submit` (the API, at ``POST /v1/jobs``): every reference is one of the
  tenant's uploads and fits the config; what the uploaded model fixes (``num_classes``,
  ``options``) is filled in. Clients never name server paths.
* :func:`resolve_for_run` (the worker, per attempt): the same check again (the upload may be
  gone), then ids become the local paths of their files, and a built-in torchvision dataset is
  pointed at the operator's data directory.

Both take and return a :class:`core.config.JobConfig` (``model_copy(update=...)``, never an edited
dict). Messages name the user's ids and fields, never server paths. Imports ``core.config`` only
(pydantic; no torch).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from sqlalchemy.orm import Session

from core.config import JobConfig
from store.models import Dataset, ModelRecord
from store.repositories import datasets as dataset_repo
from store.repositories import models as model_repo
from store.settings import Settings

TORCHVISION_DATASETS = ("mnist", "fashion-mnist", "cifar10", "cifar100")
UPLOAD_MODEL_HINT = "upload weights with POST /v1/models and put the returned id in model.weights"
UPLOAD_PROGRAM_HINT = (
    "upload a torch.export .pt2 with POST /v1/models (without arch) and put the returned id in model.program"
)
UPLOAD_DATA_HINT = 'upload data with POST /v1/datasets and reference it as {"id": "<dataset id>"}'


class UnresolvedReference(ValueError):
    """A config whose references do not fit (422 over HTTP; a failed job in the worker)."""


class ReferenceNotFound(UnresolvedReference):
    """A referenced upload that is not one of the tenant's (404 over HTTP)."""


def _model(session: Session, tenant_id: str, model_id: str, field: str = "model.weights") -> ModelRecord:
    record = model_repo.get_for_tenant(session, tenant_id, model_id)
    if record is None:
        hint = UPLOAD_PROGRAM_HINT if field == "model.program" else UPLOAD_MODEL_HINT
        raise ReferenceNotFound(f"{field} {model_id!r} is not one of your uploaded models; {hint}")
    if (record.kind == "program") != (field == "model.program"):
        raise UnresolvedReference(
            f"model {record.id} is a torch.export program: name it as model.program (without model.arch)"
            if record.kind == "program"
            else f"model {record.id} holds weights for {record.arch!r}: name it as model.weights with model.arch"
        )
    return record


def _check_program(session: Session, tenant_id: str, config: JobConfig, dataset: Dataset | None) -> JobConfig:
    """``model.program``: one of the tenant's program uploads, fitting the config and the dataset;
    ``model.num_classes`` is the program's."""
    m = config.model
    assert m.program is not None
    record = _model(session, tenant_id, m.program, "model.program")
    if m.num_classes is not None and m.num_classes != record.num_classes:
        raise UnresolvedReference(
            f"model.num_classes is {m.num_classes} but program {record.id} returns {record.num_classes} "
            "logits; remove model.num_classes (the program fixes it)"
        )
    if dataset is not None and list(dataset.input_shape) != list(record.input_shape):
        raise UnresolvedReference(
            f"program {record.id} takes inputs of shape {list(record.input_shape)} but dataset "
            f"{dataset.id} has inputs of shape {list(dataset.input_shape)}"
        )
    return config.model_copy(update={"model": m.model_copy(update={"num_classes": record.num_classes})})


def _dataset(session: Session, tenant_id: str, dataset_id: str) -> Dataset:
    record = dataset_repo.get_for_tenant(session, tenant_id, dataset_id)
    if record is None:
        raise ReferenceNotFound(f"dataset {dataset_id} not found; {UPLOAD_DATA_HINT}")
    return record


def _refuse_server_paths(config: JobConfig) -> None:
    ds = config.dataset
    if ds.path is not None:
        raise UnresolvedReference(f"dataset.path is not accepted over HTTP; {UPLOAD_DATA_HINT}")
    if ds.root is not None:
        raise UnresolvedReference(
            "dataset.root is not accepted over HTTP; the operator sets the data directory"
        )
    if ds.download:
        raise UnresolvedReference(
            "dataset.download is not accepted over HTTP; the operator decides what is downloaded"
        )


def check_for_submit(session: Session, tenant_id: str, config: JobConfig) -> JobConfig:
    """``config`` as it is stored for a job of ``tenant_id``; raises :class:`UnresolvedReference`.

    Every reference must be one of the tenant's uploads and agree with the rest of the config;
    ``model.num_classes`` and ``model.options`` default to the uploaded model's.
    """
    _refuse_server_paths(config)
    ds = config.dataset
    dataset = None
    if ds.id is not None:
        dataset = _dataset(session, tenant_id, ds.id)
        if ds.image_size is not None and dataset.kind != "imagefolder":
            raise UnresolvedReference(
                "dataset.image_size only applies to ImageFolder uploads, not to .npz files"
            )

    if config.model.program is not None:
        config = _check_program(session, tenant_id, config, dataset)
    m = config.model
    if m.weights is not None:
        record = _model(session, tenant_id, m.weights)
        if record.arch != m.arch:
            raise UnresolvedReference(
                f"model.arch is {m.arch!r} but model {record.id} was uploaded for {record.arch!r}"
            )
        if m.num_classes is not None and m.num_classes != record.num_classes:
            raise UnresolvedReference(
                f"model.num_classes is {m.num_classes} but model {record.id} has {record.num_classes} classes"
            )
        if m.options and m.options != record.options:
            raise UnresolvedReference(
                f"model.options {m.options} differ from those model {record.id} was uploaded with "
                f"{record.options}"
            )
        m = m.model_copy(update={"num_classes": record.num_classes, "options": dict(record.options)})
        config = config.model_copy(update={"model": m})
    if dataset is not None and m.num_classes is not None and m.num_classes != dataset.num_classes:
        raise UnresolvedReference(
            f"model.num_classes is {m.num_classes} but dataset {dataset.id} has {dataset.num_classes} classes"
        )
    return config


def resolve_for_run(
    session: Session,
    tenant_id: str,
    config: JobConfig,
    local_file: Callable[[str], Path],
    settings: Settings,
) -> JobConfig:
    """``config`` with its references replaced by local files, for one run of the pipeline.

    ``local_file`` maps a stored location (a model's or dataset's ``location``) to a path on
    this machine. The tenant check of :func:`check_for_submit` is repeated (an upload may have
    been deleted since); a torchvision dataset is read from ``settings.data_dir``.
    """
    config = check_for_submit(session, tenant_id, config)
    ds = config.dataset
    if ds.name in TORCHVISION_DATASETS:
        if settings.data_dir is None:
            raise UnresolvedReference(
                f"dataset {ds.name!r} is not available on this server (the operator has set no "
                f"LORITA_DATA_DIR); upload it as an .npz with POST /v1/datasets"
            )
        ds = ds.model_copy(update={"root": settings.data_dir, "download": settings.allow_download})
    elif ds.id is not None:
        record = _dataset(session, tenant_id, ds.id)
        ds = ds.model_copy(update={"id": None, "path": str(local_file(record.location))})
    m = config.model
    if m.weights is not None:
        record_m = _model(session, tenant_id, m.weights)
        m = m.model_copy(update={"weights": str(local_file(record_m.location))})
    if m.program is not None:  # the worker loads it in a child process, after validating it again
        record_p = _model(session, tenant_id, m.program, "model.program")
        m = m.model_copy(update={"program": str(local_file(record_p.location))})
    return config.model_copy(update={"model": m, "dataset": ds})
