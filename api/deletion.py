"""``DELETE /v1/models/{id}``, ``/v1/datasets/{id}``, ``/v1/jobs/{id}``: the row and its files.

* Another tenant's id, or one that does not exist, is 404 (as every other route).
* 409 while a queued or running job still needs the object: a job that uses the model or the
  dataset, a job that is itself not finished (cancel it first), a derived job still reading its
  parent's files.
* The row goes first (committed), then the files: a store failure after the commit leaves an
  orphan file (logged; the housekeeping removes job folders) but never a row without its file.
* The answer is 204 with no body; the freed bytes count against the quota at once.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from fastapi import APIRouter, Response
from sqlalchemy.orm import Session

from api.deps import CurrentTenant, SessionDep, StoreDep
from api.errors import AppError, not_found
from store import deletion
from store.artifacts import ArtifactStore, ArtifactStoreError, dataset_key, job_key, model_key
from store.quotas import ACTIVE
from store.repositories import datasets as dataset_repo
from store.repositories import jobs as job_repo
from store.repositories import models as model_repo

log = logging.getLogger("lorita.api")
router = APIRouter(tags=["deletion"])

_RESPONSES: dict[int | str, dict[str, str]] = {
    204: {"description": "Deleted, files included."},
    404: {"description": "Not one of your objects."},
    409: {"description": "A queued or running job still needs it."},
}


def _in_use(kind: str, object_id: str, jobs: list[str]) -> AppError:
    shown = ", ".join(jobs[:5]) + (f" and {len(jobs) - 5} more" if len(jobs) > 5 else "")
    return AppError(
        409,
        f"{kind} {object_id} is used by queued or running job(s) {shown}; "
        "wait until they finish or cancel them (POST /v1/jobs/{id}/cancel), then delete it",
    )


def _remove_files(store: ArtifactStore, prefix: str) -> None:
    try:
        store.delete_prefix(prefix)
    except (ArtifactStoreError, OSError) as err:
        log.warning("deleted row, but not its files under %s: %s", prefix, err)


@dataclass(frozen=True)
class _Upload:
    """How to find, check, delete and locate the files of one kind of upload."""

    kind: str
    find: Callable[[Session, str, str], object | None]
    users: Callable[[Session, str, str], list[str]]
    delete: Callable[[Session, str, str], bool]
    key: Callable[[str, str, str], str]


_MODEL = _Upload(
    "model", model_repo.get_for_tenant, deletion.active_jobs_using_model, deletion.delete_model, model_key
)
_DATASET = _Upload(
    "dataset",
    dataset_repo.get_for_tenant,
    deletion.active_jobs_using_dataset,
    deletion.delete_dataset,
    dataset_key,
)


def _delete_upload(
    upload: _Upload, object_id: str, session: Session, tenant_id: str, store: ArtifactStore
) -> Response:
    """404 unless the tenant's, 409 while an active job uses it; else the row (committed), then its files."""
    if upload.find(session, tenant_id, object_id) is None:
        raise not_found(upload.kind, object_id)
    users = upload.users(session, tenant_id, object_id)
    if users:
        raise _in_use(upload.kind, object_id, users)
    upload.delete(session, tenant_id, object_id)
    session.commit()
    _remove_files(store, upload.key(tenant_id, object_id, "").rstrip("/"))
    return Response(status_code=204)


@router.delete(
    "/v1/models/{model_id}", status_code=204, summary="Delete an uploaded model", responses=_RESPONSES
)
def delete_model(model_id: str, session: SessionDep, tenant: CurrentTenant, store: StoreDep) -> Response:
    return _delete_upload(_MODEL, model_id, session, tenant.id, store)


@router.delete(
    "/v1/datasets/{dataset_id}", status_code=204, summary="Delete an uploaded dataset", responses=_RESPONSES
)
def delete_dataset(dataset_id: str, session: SessionDep, tenant: CurrentTenant, store: StoreDep) -> Response:
    return _delete_upload(_DATASET, dataset_id, session, tenant.id, store)


@router.delete(
    "/v1/jobs/{job_id}",
    status_code=204,
    summary="Delete a finished job with its report and files",
    responses=_RESPONSES,
)
def delete_job(job_id: str, session: SessionDep, tenant: CurrentTenant, store: StoreDep) -> Response:
    job = job_repo.get_for_tenant(session, tenant.id, job_id)
    if job is None:
        raise not_found("job", job_id)
    if job.status in ACTIVE:
        raise AppError(
            409,
            f"job {job_id} is {job.status}; cancel it (POST /v1/jobs/{job_id}/cancel) and delete it once it ended",
        )
    users = deletion.active_jobs_derived_from(session, tenant.id, job_id)
    if users:
        raise _in_use("job", job_id, users)
    if not deletion.delete_job(session, tenant.id, job_id):  # it was requeued in the meantime
        raise AppError(409, f"job {job_id} is running again; cancel it first")
    session.commit()
    _remove_files(store, job_key(tenant.id, job_id))
    return Response(status_code=204)
