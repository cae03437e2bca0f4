"""``POST /v1/models`` without ``arch``: a torch.export program, validated as data at upload.

The archive is checked by :func:`core.program.archive.validate_archive` (pure Python: zip
structure and sizes, no pickled members or flags, only allow-listed ATen ops, a dynamic batch
dimension); torch never opens it here. A refused upload is a 422 with the reason, and nothing of
it stays on disk. The worker validates it again and loads it in a child process.
"""

from __future__ import annotations

import shutil
from typing import Any

from fastapi import UploadFile
from sqlalchemy.orm import Session

from api.errors import AppError
from api.quotas import check_upload
from api.uploads import ValidationSlots, clean_filename, commit_record, save_upload
from store.artifacts import ArtifactStore, model_key
from store.models import ModelRecord, new_id
from store.repositories import models as model_repo
from store.settings import Settings

PROGRAM_SUFFIX = ".pt2"
PROGRAM_FILE = "program.pt2"
PROGRAM_ARCH = "program"  # models.arch of a program upload (the architecture is in the file)


def upload_program(
    session: Session,
    tenant_id: str,
    settings: Settings,
    store: ArtifactStore,
    slots: ValidationSlots,
    file: UploadFile,
    name: str | None,
    form: dict[str, Any],
) -> ModelRecord:
    """Store a validated program as a model of kind ``program``; 422 with the reason otherwise."""
    from core.program.archive import ProgramError, validate_archive  # no torch import

    given = sorted(k for k, v in form.items() if v is not None)
    if given:
        raise AppError(
            422,
            f"{', '.join(given)} apply to weights (with arch); a program holds its architecture, "
            "class count and input shape: upload the .pt2 alone",
        )
    filename = clean_filename(file.filename, "model.pt2")
    if not filename.lower().endswith(PROGRAM_SUFFIX):
        raise AppError(
            422,
            f"{filename}: without arch, upload a torch.export program saved with torch.export.save as "
            "a .pt2 file; to upload weights, give arch, num_classes and input_shape",
        )
    scratch = store.temp_dir()
    try:
        upload = scratch / "upload.pt2"
        size, sha256 = save_upload(file.file, upload, settings.max_upload_bytes)
        check_upload(session, tenant_id, size, settings)  # the tenant's stored-bytes quota
        with slots.hold():
            try:
                archive = validate_archive(upload, filename)
            except ProgramError as err:
                raise AppError(422, str(err)) from None
        if archive.parameter_count > settings.max_model_parameters:
            raise AppError(
                422,
                f"{filename}: the program has {archive.parameter_count} parameters, more than the "
                f"{settings.max_model_parameters} accepted (LORITA_MAX_MODEL_PARAMETERS)",
            )
        model_id = new_id()
        key = model_key(tenant_id, model_id, PROGRAM_FILE)
        store.put_file(key, upload)
        record = ModelRecord(
            id=model_id,
            tenant_id=tenant_id,
            name=name or filename,
            arch=PROGRAM_ARCH,
            kind="program",
            num_classes=archive.num_classes,
            input_shape=list(archive.input_shape),
            options={},
            filename=filename,
            size_bytes=size,
            sha256=sha256,
            location=key,
        )
        commit_record(
            session, lambda: model_repo.add(session, record), store, model_key(tenant_id, model_id, "")
        )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return record
