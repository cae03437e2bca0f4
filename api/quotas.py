"""Per-tenant quotas and the per-job work limit, checked before anything is stored or queued.

* Active jobs (queued + running) past ``LORITA_MAX_ACTIVE_JOBS``: 429 with ``Retry-After`` (a slot
  frees when one of them ends).
* Stored bytes (uploads + job outputs) past ``LORITA_MAX_STORED_BYTES``: an upload is 413, a new
  job 409 (its outputs would add more); either way the message says how to free space.
* Work: parameters (times the LoRITa factors while training) x training samples x epochs (training
  plus fine-tuning) past ``LORITA_MAX_JOB_WORK``: 422 naming what to shrink. The model is sized on
  the meta device, the data from the config and the upload records (``api.job_checks``).

A replay of a submission with a known ``Idempotency-Key`` is never refused: it creates nothing.
"""

from __future__ import annotations

from sqlalchemy.orm import Session

from api.errors import AppError
from api.job_checks import data_shape
from api.uploads import human_bytes
from core.config import JobConfig
from store import quotas
from store.settings import Settings

RETRY_AFTER_S = 30


def _store_full(used: int, settings: Settings, status: int, what: str) -> AppError:
    return AppError(
        status,
        f"{what}: your stored files take {human_bytes(used)} of the {human_bytes(settings.max_stored_bytes)} "
        "allowed (LORITA_MAX_STORED_BYTES); delete jobs, models or datasets you no longer need "
        "(DELETE /v1/jobs/{id}, /v1/models/{id}, /v1/datasets/{id})",
    )


def check_upload(session: Session, tenant_id: str, size: int, settings: Settings) -> None:
    """413 when an upload of ``size`` bytes would take the tenant past its stored-bytes quota."""
    used = quotas.stored_bytes(session, tenant_id)
    if used + size > settings.max_stored_bytes:
        raise _store_full(used, settings, 413, f"this upload of {human_bytes(size)} does not fit")


def job_work(session: Session, tenant_id: str, config: JobConfig) -> tuple[int, str] | None:
    """(parameters x samples x epochs, how it was counted), or None where the size is not known."""
    data = data_shape(session, tenant_id, config)
    arch = getattr(config.model, "arch", None)
    if data is None or not isinstance(arch, str):
        return None
    from core import zoo

    try:
        params = zoo.count_parameters(
            zoo.build_meta_model(
                arch, config.model.num_classes or data.num_classes, data.input_shape, config.model.options
            )
        )
    except (ValueError, TypeError):
        return None  # reported by api.job_checks
    train = config.train
    factors = train.factors if train is not None else 1
    epochs = (train.epochs if train is not None else 0) + config.finetune.epochs
    epochs = max(1, epochs)  # an SVT-only job still evaluates the data
    work = params * factors * data.samples * epochs
    return work, f"{params} parameters x {factors} factors x {data.samples} samples x {epochs} epochs"


def check_submit(
    session: Session,
    tenant_id: str,
    config: JobConfig,
    settings: Settings,
    idempotency_key: str | None = None,
) -> None:
    """The quotas and the work limit of a new job (call before the job row is written)."""
    quotas.lock_tenant(session, tenant_id)
    if quotas.job_with_key(session, tenant_id, idempotency_key):
        return
    active = quotas.active_jobs(session, tenant_id)
    if active >= settings.max_active_jobs:
        raise AppError(
            429,
            f"you have {active} queued or running jobs, the most allowed at once (LORITA_MAX_ACTIVE_JOBS); "
            "submit again when one has finished, or cancel one",
            headers={"Retry-After": str(RETRY_AFTER_S)},
        )
    used = quotas.stored_bytes(session, tenant_id)
    if used >= settings.max_stored_bytes:
        raise _store_full(used, settings, 409, "no room for this job's outputs")
    counted = job_work(session, tenant_id, config)
    if counted is not None and counted[0] > settings.max_job_work:
        work, how = counted
        raise AppError(
            422,
            f"train.epochs: this job is {work:.3g} units of work ({how}), more than the {settings.max_job_work:.3g} "
            "this server runs (LORITA_MAX_JOB_WORK); use fewer epochs or factors, a smaller model, or less data",
        )
