"""``/v1/jobs``: submit, watch, cancel, and fetch the report and artifacts of compression jobs."""

from __future__ import annotations

import logging
from typing import Annotated, Literal

from fastapi import APIRouter, Header, Query, Response
from fastapi.responses import FileResponse
from pydantic import ValidationError
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from api.deps import (
    CurrentTenant,
    DispatcherDep,
    IdempotencyKey,
    SessionDep,
    SettingsDep,
    StoreDep,
    TenantRef,
)
from api.downloads import artifact_response
from api.errors import AppError, not_found
from api.job_checks import check_job_size
from api.limits import MAX_QUERY_INT, Offset, check_text
from api.quotas import check_submit
from api.schemas import (
    ArtifactRead,
    ArtifactsRead,
    JobEventRead,
    JobEventsRead,
    JobRead,
    JobsRead,
    ResultSummary,
)
from core.config import JobConfig
from core.report import SCHEMA_VERSION, CountChange, JobReport
from store import references
from store.models import Job, Result
from store.repositories import jobs as job_repo
from store.status import JobStatus

log = logging.getLogger("lorita.api")
router = APIRouter(prefix="/v1/jobs", tags=["jobs"])


def resolve_references(session: Session, tenant: TenantRef, config: JobConfig) -> JobConfig:
    """``store.references.check_for_submit`` with its errors as 404 (not this tenant's upload)
    or 422 (a reference that does not fit the config)."""
    try:
        return references.check_for_submit(session, tenant.id, config)
    except references.ReferenceNotFound as err:
        raise AppError(404, str(err)) from None
    except references.UnresolvedReference as err:
        raise AppError(422, str(err)) from None


_JOB_COLUMNS = tuple(name for name in JobRead.model_fields if name != "result")


def job_read(job: Job) -> JobRead:
    # the columns only: touching ``job.result`` would lazy-load it, a second query on every poll
    read = JobRead.model_validate({name: getattr(job, name) for name in _JOB_COLUMNS})
    if job.status == JobStatus.SUCCEEDED and job.result is not None:
        read.result = result_summary(job.result)
    return read


def _report_ratio(report: dict[str, object], key: str) -> float | None:
    """``report[key].ratio`` as the job's report states it (None when the report lacks it)."""
    try:
        return CountChange.model_validate(report.get(key)).ratio
    except ValidationError:
        return None


def result_summary(result: Result) -> ResultSummary:
    summary = ResultSummary.model_validate(result, from_attributes=True)
    summary.params_ratio = _report_ratio(result.report, "params")
    summary.flops_ratio = _report_ratio(result.report, "flops")
    return summary


def _job_or_404(session: Session, tenant: TenantRef, job_id: str) -> Job:
    job = job_repo.get_for_tenant(session, tenant.id, job_id)
    if job is None:
        raise not_found("job", job_id)
    return job


@router.post(
    "",
    status_code=202,
    response_model=JobRead,
    summary="Submit a compression job",
    responses={200: {"description": "The job already created with this Idempotency-Key."}},
)
def create_job(
    config: JobConfig,
    response: Response,
    session: SessionDep,
    tenant: CurrentTenant,
    settings: SettingsDep,
    dispatcher: DispatcherDep,
    idempotency_key: IdempotencyKey = None,
) -> JobRead:
    """The body is the job config (unknown fields are rejected). Uploaded models and datasets are
    referenced by id: ``"model": {"arch": "fcn", "weights": "<model id>"}``, ``"dataset": {"id": "<id>"}``.
    The job is stored before it is queued; poll ``GET /v1/jobs/{id}`` for progress."""
    check_text(config.model_dump())
    config = resolve_references(session, tenant, config)
    check_job_size(session, tenant.id, config, settings)
    check_submit(session, tenant.id, config, settings, idempotency_key)  # quotas and the work limit
    stored = config.model_dump(mode="json")
    job, created = job_repo.create(
        session,
        tenant.id,
        stored,
        max_attempts=settings.max_attempts,
        name=config.name,
        idempotency_key=idempotency_key,
    )
    if not created:
        if job.config != stored:
            raise AppError(
                409, f"Idempotency-Key {idempotency_key!r} was used for job {job.id} with a different config"
            )
        response.status_code = 200
        return job_read(job)
    session.commit()  # the row is durable before any worker can hear of it
    try:
        dispatcher.send(job.id, config=job.config)
    except Exception:
        # the job stays queued; the sweeper re-sends queued jobs nobody picked up
        log.warning("could not enqueue job %s; it stays queued for the sweeper", job.id, exc_info=True)
    return job_read(job)


@router.get("", response_model=JobsRead, summary="List jobs, newest first")
def list_jobs(
    session: SessionDep,
    tenant: CurrentTenant,
    status: Annotated[JobStatus | None, Query(description="Only jobs in this status.")] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    offset: Offset = 0,
) -> JobsRead:
    jobs, count = job_repo.list_for_tenant(session, tenant.id, status=status, limit=limit, offset=offset)
    return JobsRead(data=[job_read(j) for j in jobs], count=count)


def _read_job_and_release(session: Session, tenant: TenantRef, job_id: str) -> JobRead:
    if session.get_transaction() is None:
        # One statement needs no transaction: in autocommit there is no BEGIN before the SELECT
        # and no ROLLBACK when the connection goes back, two of the round trips of a poll.
        session.connection(execution_options={"isolation_level": "AUTOCOMMIT"})
    read = job_read(_job_or_404(session, tenant, job_id))
    session.close()  # the connection goes back to the pool here, in this thread
    return read


@router.get("/{job_id}", response_model=JobRead, summary="Get a job's status and progress")
async def get_job(job_id: str, session: SessionDep, tenant: CurrentTenant) -> JobRead:
    """The endpoint clients poll: one query and one thread hop, the connection released before
    the response is encoded."""
    return await run_in_threadpool(_read_job_and_release, session, tenant, job_id)


@router.post("/{job_id}/cancel", response_model=JobRead, summary="Cancel a job")
def cancel_job(job_id: str, session: SessionDep, tenant: CurrentTenant) -> JobRead:
    """A queued job is canceled at once; a running one is flagged and stops at its next step."""
    job = _job_or_404(session, tenant, job_id)
    outcome = job_repo.request_cancel(session, job)
    if outcome is job_repo.CancelOutcome.FINISHED:
        # nothing was written; the session dependency rolls back on the way out
        raise AppError(409, f"job {job_id} has already {job.status}; there is nothing to cancel")
    session.commit()
    return job_read(job)


@router.get("/{job_id}/events", response_model=JobEventsRead, summary="A job's progress history")
def list_events(
    job_id: str,
    session: SessionDep,
    tenant: CurrentTenant,
    after_id: Annotated[
        int, Query(ge=0, le=MAX_QUERY_INT, description="Only events with a larger id (for polling).")
    ] = 0,
    limit: Annotated[int, Query(ge=1, le=1000)] = 500,
) -> JobEventsRead:
    _job_or_404(session, tenant, job_id)
    events = job_repo.list_events(session, job_id, after_id=after_id, limit=limit)
    return JobEventsRead(data=[JobEventRead.model_validate(e) for e in events], count=len(events))


@router.get(
    "/{job_id}/report",
    response_model=JobReport,
    summary="The report.json of a succeeded job",
    description="Every figure the job measured; its JSON Schema is served at `GET /v1/schemas/report`.",
)
def get_report(job_id: str, session: SessionDep, tenant: CurrentTenant) -> JobReport:
    job = _job_or_404(session, tenant, job_id)
    if job.status != "succeeded":
        why = f": {job.error}" if job.status == "failed" and job.error else ""
        raise AppError(409, f"job {job_id} is {job.status}{why}; its report exists once it has succeeded")
    result = job_repo.get_result(session, job_id)
    if result is None:
        raise AppError(409, f"job {job_id} succeeded but its report is not recorded; contact the operator")
    try:
        return JobReport.model_validate(result.report)
    except ValidationError:
        log.warning("job %s: stored report does not match report schema %d", job_id, SCHEMA_VERSION)
        raise AppError(
            409,
            f"job {job_id}'s report was written in a format this server no longer reads (report schema "
            f"{SCHEMA_VERSION}); download report.json from GET /v1/jobs/{job_id}/artifacts or rerun the job",
        ) from None


@router.get("/{job_id}/artifacts", response_model=ArtifactsRead, summary="List a job's files")
def list_artifacts(
    job_id: str,
    session: SessionDep,
    tenant: CurrentTenant,
    include: Annotated[
        Literal["dense"] | None,
        Query(description="'dense': also the collapsed dense model (dense/...) derived jobs start from."),
    ] = None,
) -> ArtifactsRead:
    _job_or_404(session, tenant, job_id)
    artifacts = job_repo.list_artifacts(session, job_id)
    if include != "dense":
        artifacts = [a for a in artifacts if not a.name.startswith("dense/")]
    data = [
        ArtifactRead(
            name=a.name,
            size_bytes=a.size_bytes,
            sha256=a.sha256,
            url=f"/v1/jobs/{job_id}/artifacts/{a.name}",
            created_at=a.created_at,
        )
        for a in artifacts
    ]
    return ArtifactsRead(data=data, count=len(data))


@router.get(
    "/{job_id}/artifacts/{name:path}",
    summary="Download one of a job's files",
    response_class=FileResponse,
    responses={200: {"description": "The file, with its sha256 in X-Checksum-SHA256."}},
)
def download_artifact(
    job_id: str,
    name: str,
    session: SessionDep,
    tenant: CurrentTenant,
    store: StoreDep,
    range_header: Annotated[str | None, Header(alias="Range", include_in_schema=False)] = None,
) -> Response:
    _job_or_404(session, tenant, job_id)
    artifact = job_repo.get_artifact(session, job_id, name)
    if artifact is None:
        raise AppError(
            404, f"job {job_id} has no artifact {name!r}; list them with GET /v1/jobs/{job_id}/artifacts"
        )
    return artifact_response(store, artifact.location, name, artifact.sha256, range_header)
