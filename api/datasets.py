"""``/v1/datasets``: uploaded .npz files and ImageFolder archives, plus the built-in datasets."""

from __future__ import annotations

import errno
import shutil
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, File, Form, Query, UploadFile

from api.archives import (
    ArchiveError,
    ArchiveLimits,
    archive_kind,
    extract_archive,
    inspect_image_folder,
)
from api.deps import CurrentTenant, SessionDep, SettingsDep, StoreDep
from api.errors import AppError, not_found
from api.limits import Offset, check_text
from api.quotas import check_upload
from api.schemas import BuiltinDatasetRead, DatasetRead, DatasetsRead
from api.uploads import ValidationSlotsDep, clean_filename, commit_record, save_upload
from store.artifacts import ArtifactStore, dataset_key
from store.models import Dataset, new_id
from store.repositories import datasets as dataset_repo
from store.settings import Settings

router = APIRouter(prefix="/v1/datasets", tags=["datasets"])

NPZ_OBJECT = "data.npz"
IMAGEFOLDER_OBJECT = "imagefolder"
_TORCHVISION_NOTE = (
    "read from the worker's data directory; available only where the operator has placed it "
    "(or allowed downloads)"
)
BUILTINS: tuple[BuiltinDatasetRead, ...] = (
    BuiltinDatasetRead(
        name="digits",
        description="scikit-learn 8x8 handwritten digits, 10 classes, 1797 images",
        availability="always (bundled, offline)",
        use={"name": "digits"},
    ),
    BuiltinDatasetRead(
        name="synthetic",
        description="generated class templates plus noise; set num_classes, input_shape, n_train, n_test",
        availability="always (generated)",
        use={"name": "synthetic", "num_classes": 10, "input_shape": [64]},
    ),
    BuiltinDatasetRead(
        name="mnist",
        description="28x28 grey digits, 10 classes",
        availability=_TORCHVISION_NOTE,
        use={"name": "mnist"},
    ),
    BuiltinDatasetRead(
        name="fashion-mnist",
        description="28x28 grey clothing, 10 classes",
        availability=_TORCHVISION_NOTE,
        use={"name": "fashion-mnist"},
    ),
    BuiltinDatasetRead(
        name="cifar10",
        description="32x32 colour images, 10 classes",
        availability=_TORCHVISION_NOTE,
        use={"name": "cifar10"},
    ),
    BuiltinDatasetRead(
        name="cifar100",
        description="32x32 colour images, 100 classes",
        availability=_TORCHVISION_NOTE,
        use={"name": "cifar100"},
    ),
)


def _store_npz(
    upload: Path, filename: str, tenant_id: str, dataset_id: str, store: ArtifactStore, settings: Settings
) -> tuple[Dataset, str]:
    from core.data import DataError, validate_npz

    try:
        info = validate_npz(upload, name=filename or "the .npz file", max_values=settings.max_dataset_values)
    except DataError as err:
        raise AppError(422, str(err)) from None
    key = dataset_key(tenant_id, dataset_id, NPZ_OBJECT)
    store.put_file(key, upload)
    record = Dataset(
        kind="npz",
        num_classes=info.num_classes,
        input_shape=list(info.input_shape),
        n_train=info.n_train,
        n_test=info.n_test,
    )
    return record, key


def archive_limits(settings: Settings) -> ArchiveLimits:
    return ArchiveLimits(
        max_files=settings.max_archive_files,
        max_bytes=settings.max_archive_bytes,
        max_image_bytes=settings.max_image_bytes,
        max_image_pixels=settings.max_image_pixels,
    )


def _store_image_folder(
    upload: Path,
    kind: str,
    scratch: Path,
    tenant_id: str,
    dataset_id: str,
    store: ArtifactStore,
    settings: Settings,
) -> tuple[Dataset, str]:
    extracted = scratch / "extracted"
    try:
        found = extract_archive(upload, extracted, kind=kind, limits=archive_limits(settings))
        info = inspect_image_folder(extracted)
    except ArchiveError as err:
        raise AppError(422, f"rejected archive: {err}") from None
    except OSError as err:
        if err.errno == errno.ENOSPC:
            raise AppError(
                507, "no space left on the artifact store; retry later or ask the operator"
            ) from None
        raise
    key = dataset_key(tenant_id, dataset_id, IMAGEFOLDER_OBJECT)
    # one rename publishes the checked tree; the worker points dataset.path at it
    store.put_dir(key, info.root)
    record = Dataset(
        kind="imagefolder",
        num_classes=len(info.classes),
        input_shape=list(info.input_shape),
        n_train=info.n_train,
        n_test=info.n_test,
        image_sizes=found.sizes,
    )
    return record, key


@router.post("", status_code=201, response_model=DatasetRead, summary="Upload a dataset")
def upload_dataset(
    session: SessionDep,
    tenant: CurrentTenant,
    settings: SettingsDep,
    store: StoreDep,
    slots: ValidationSlotsDep,
    file: Annotated[
        UploadFile,
        File(
            description="An .npz with x_train, y_train, x_test, y_test, or an ImageFolder archive "
            "(.zip, .tar, .tar.gz) laid out as <class>/<image> or train/<class>/<image> + test/<class>/<image>."
        ),
    ],
    name: Annotated[str | None, Form(max_length=200)] = None,
) -> Dataset:
    """Streamed to disk with a size cap; .npz files are read without unpickling, archives are
    extracted with path, link, file-count and byte checks. Nothing is kept when a check fails."""
    check_text(name, "name")
    filename = clean_filename(file.filename, "")
    kind = "npz" if filename.lower().endswith(".npz") else archive_kind(filename)
    if kind is None:
        raise AppError(
            422,
            f"unsupported dataset file {filename or '(no name)'!r}: upload an .npz, .zip, .tar or .tar.gz",
        )
    scratch = store.temp_dir()
    dataset_id = new_id()
    try:
        upload = scratch / ("upload.npz" if kind == "npz" else "upload.archive")
        size, sha256 = save_upload(file.file, upload, settings.max_upload_bytes)
        check_upload(session, tenant.id, size, settings)  # the tenant's stored-bytes quota
        with slots.hold():
            if kind == "npz":
                record, key = _store_npz(upload, filename, tenant.id, dataset_id, store, settings)
            else:
                record, key = _store_image_folder(
                    upload, kind, scratch, tenant.id, dataset_id, store, settings
                )
        record.id, record.tenant_id, record.name = dataset_id, tenant.id, name or filename
        record.size_bytes, record.sha256, record.location = size, sha256, key
        commit_record(
            session, lambda: dataset_repo.add(session, record), store, dataset_key(tenant.id, dataset_id, "")
        )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return record


@router.get("", response_model=DatasetsRead, summary="List uploaded and built-in datasets")
def list_datasets(
    session: SessionDep,
    tenant: CurrentTenant,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    offset: Offset = 0,
) -> DatasetsRead:
    records, count = dataset_repo.list_for_tenant(session, tenant.id, limit=limit, offset=offset)
    return DatasetsRead(
        data=[DatasetRead.model_validate(r) for r in records], count=count, builtins=list(BUILTINS)
    )


@router.get("/{dataset_id}", response_model=DatasetRead, summary="Get an uploaded dataset")
def get_dataset(dataset_id: str, session: SessionDep, tenant: CurrentTenant) -> Dataset:
    record = dataset_repo.get_for_tenant(session, tenant.id, dataset_id)
    if record is None:
        raise not_found("dataset", dataset_id)
    return record
