"""Operating points over HTTP: a job's live progress as server-sent events, the plan of a job
config (``lorita plan``'s dry run), and derived jobs that pick another point of a finished job's
Pareto curve without training again (``lorita select``).

Note: why the stream does not hold a database session.
    A stream lasts minutes. The request's session (``api.deps.get_session``) would hold one of
    the few database slots for all that time, so a handful of open pages would starve every other
    request. Here the caller is authenticated with a session that ends with the route function
    (``scope="function"``), and each poll opens a short session of its own in a worker thread,
    behind a small limiter, and closes it before sleeping.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Depends, Header, Request, Response
from fastapi.responses import StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials
from pydantic import BaseModel, ConfigDict, Field, field_validator
from sqlalchemy.orm import Session

from api.deps import (
    CurrentTenant,
    DispatcherDep,
    IdempotencyKey,
    SessionDep,
    SettingsDep,
    StoreDep,
    TenantRef,
    _bearer,
    get_app_settings,
    get_current_tenant,
    get_session,
)
from api.errors import AppError, not_found
from api.job_checks import check_job_size, check_ranks_against
from api.jobs import job_read, resolve_references
from api.limits import check_text
from api.quotas import check_submit
from api.schemas import JobEventRead, JobRead
from core.config import CompressConfig, ExportFormat, FinetuneConfig, JobConfig, RanksPolicy, shown_value
from store.artifacts import ArtifactStore
from store.db import get_sessionmaker
from store.models import Job
from store.repositories import jobs as job_repo
from store.settings import Settings
from store.status import FINISHED, JobStatus

log = logging.getLogger("lorita.api")
router = APIRouter(tags=["operating points"])

STREAM_POLL_SECONDS = 0.5
STREAM_HEARTBEAT_SECONDS = 15.0
# A stream ends after this long (the client reconnects with Last-Event-ID and goes on where it
# stopped): no connection, thread or generator lives unboundedly.
STREAM_MAX_SECONDS = 15 * 60
STREAM_RETRY_MS = 2000
MAX_EVENT_ID = 2**31 - 1  # event ids are a 32-bit integer column
# Polls of all streams of one process that may run queries at the same time.
STREAM_DB_CONCURRENCY = 4
# Plans of one process built at the same time; more answer 429 (a plan builds the model).
PLAN_CONCURRENCY = 2

# The artifacts a derived job starts from (written by the worker under the parent's prefix).
DENSE_PREFIX = "dense/"
DENSE_WEIGHTS = "dense/model.safetensors"


# ---------------------------------------------------------------------------------------
# Authentication that ends with the route function (see the note at the top)
# ---------------------------------------------------------------------------------------

ShortSession = Annotated[Session, Depends(get_session, scope="function")]


async def get_tenant_briefly(
    request: Request,
    settings: Annotated[Settings, Depends(get_app_settings)],
    session: ShortSession,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> TenantRef:
    """The bearer key's tenant, like ``CurrentTenant``, with the session closed before streaming."""
    return await get_current_tenant(request, settings, session, credentials)


BriefTenant = Annotated[TenantRef, Depends(get_tenant_briefly, scope="function")]


# ---------------------------------------------------------------------------------------
# The progress stream
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Snapshot:
    """What one poll of a stream read: the job as the API shows it and its new events."""

    job: JobRead
    events: list[JobEventRead]


def read_snapshot(session: Session, tenant_id: str, job_id: str, after_id: int) -> Snapshot | None:
    """The job (None when it is not this tenant's) and its events after ``after_id``."""
    job = job_repo.get_for_tenant(session, tenant_id, job_id)
    if job is None:
        return None
    read = job_read(job)
    events = job_repo.list_events(session, job_id, after_id=after_id, limit=500)
    return Snapshot(read, [JobEventRead.model_validate(e) for e in events])


class StreamReader:
    """Runs one poll of a stream: a short session in a worker thread, closed before returning."""

    def __init__(self, session_factory: Callable[[], Session]) -> None:
        self.session_factory = session_factory
        self.limiter = anyio.CapacityLimiter(STREAM_DB_CONCURRENCY)

    def _poll(self, tenant_id: str, job_id: str, after_id: int) -> Snapshot | None:
        session = self.session_factory()
        try:
            return read_snapshot(session, tenant_id, job_id, after_id)
        finally:
            session.close()

    async def poll(self, tenant_id: str, job_id: str, after_id: int) -> Snapshot | None:
        return await anyio.to_thread.run_sync(self._poll, tenant_id, job_id, after_id, limiter=self.limiter)


def get_stream_reader(request: Request, settings: SettingsDep) -> StreamReader:
    """One reader per app (tests replace this dependency to read through their own session)."""
    reader: StreamReader | None = getattr(request.app.state, "stream_reader", None)
    if reader is None:
        reader = request.app.state.stream_reader = StreamReader(get_sessionmaker(settings.database_url))
    return reader


StreamReaderDep = Annotated[StreamReader, Depends(get_stream_reader)]


def sse(event: str, data: Mapping[str, Any], event_id: int | None = None) -> str:
    """One server-sent event; ``data`` as one line of JSON."""
    head = f"id: {event_id}\n" if event_id is not None else ""
    return f"{head}event: {event}\ndata: {json.dumps(data, default=str, separators=(',', ':'))}\n\n"


def progress_data(job: JobRead) -> dict[str, Any]:
    metrics = job.metrics or {}
    return {
        "id": job.id,
        "status": job.status,
        "stage": job.stage,
        "progress": job.progress,
        "epoch": job.epoch,
        "epochs": job.epochs,
        "loss": metrics.get("loss"),
        "val_accuracy": metrics.get("val_accuracy"),
        "message": metrics.get("message"),
        "metrics": {k: metrics[k] for k in ("loss", "val_accuracy") if metrics.get(k) is not None},
        "eta_seconds": job.eta_seconds,
        "error": job.error,
    }


async def job_events(
    reader: StreamReader,
    tenant_id: str,
    job_id: str,
    *,
    after_id: int = 0,
    poll_seconds: float = STREAM_POLL_SECONDS,
    heartbeat_seconds: float = STREAM_HEARTBEAT_SECONDS,
    max_seconds: float = STREAM_MAX_SECONDS,
) -> AsyncIterator[str]:
    """The text of a job's stream until the job ends (an ``end`` event) or ``max_seconds`` pass.

    Events: ``progress`` (the job's current stage, progress, epoch, loss, val accuracy, ETA and
    status) whenever it changes; ``epoch`` (a recorded job event, with its id, so a reconnecting
    client resumes after the last one it saw); ``end`` (the final status); ``reconnect`` when the
    stream's time is up; comments as heartbeats.
    """
    yield f"retry: {STREAM_RETRY_MS}\n\n"
    started = last_beat = time.monotonic()
    last_sent: dict[str, Any] | None = None
    while True:
        snapshot = await reader.poll(tenant_id, job_id, after_id)
        if snapshot is None:  # deleted meanwhile
            yield sse("end", {"id": job_id, "status": "gone"})
            return
        for event in snapshot.events:
            after_id = event.id
            yield sse("epoch", event.model_dump(mode="json"), event_id=event.id)
        data = progress_data(snapshot.job)
        if data != last_sent:
            yield sse("progress", data)
            last_sent = data
            last_beat = time.monotonic()
        if JobStatus(snapshot.job.status) in FINISHED and not snapshot.events:
            yield sse("end", {"id": job_id, "status": snapshot.job.status, "error": snapshot.job.error})
            return
        now = time.monotonic()
        if now - started >= max_seconds:
            yield sse("reconnect", {"id": job_id, "after_id": after_id})
            return
        if now - last_beat >= heartbeat_seconds:
            yield ": heartbeat\n\n"
            last_beat = now
        await asyncio.sleep(poll_seconds)


def last_event_id(header: str | None, query: int | None) -> int:
    for value in (header, query):
        if value is not None and str(value).isdigit():
            return min(int(value), MAX_EVENT_ID)
    return 0


def event_stream_response(body: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(
        body,
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


@router.get(
    "/v1/jobs/{job_id}/stream",
    summary="A job's progress as server-sent events",
    response_class=StreamingResponse,
    responses={200: {"content": {"text/event-stream": {}}, "description": "Events until the job ends."}},
)
async def stream_job(
    job_id: str,
    request: Request,
    tenant: BriefTenant,
    reader: StreamReaderDep,
    last_event_id_header: Annotated[str | None, Header(alias="Last-Event-ID", max_length=20)] = None,
    after_id: int | None = None,
) -> StreamingResponse:
    """``text/event-stream``: ``progress`` events (status, stage, progress 0..1, epoch, loss,
    val_accuracy, eta_seconds) whenever they change, ``epoch`` events (the job's recorded
    progress history, with ids: reconnect with ``Last-Event-ID`` to resume), and a final ``end``
    event with the status. A stream lasts at most 15 minutes, then sends ``reconnect``."""
    # answer 404 now, as a status code, rather than as an event after a 200
    if await reader.poll(tenant.id, job_id, MAX_EVENT_ID) is None:
        raise not_found("job", job_id)
    start = last_event_id(last_event_id_header, after_id)
    return event_stream_response(job_events(reader, tenant.id, job_id, after_id=start))


# ---------------------------------------------------------------------------------------
# The plan of a job config
# ---------------------------------------------------------------------------------------

_plan_slots: dict[int, anyio.Semaphore] = {}


def _plan_semaphore() -> anyio.Semaphore:
    loop_id = id(asyncio.get_running_loop())
    sem = _plan_slots.get(loop_id)
    if sem is None:
        _plan_slots.clear()  # a test client's loop that is gone
        sem = _plan_slots[loop_id] = anyio.Semaphore(PLAN_CONCURRENCY)
    return sem


def plan_config(
    session: Session, tenant: TenantRef, config: JobConfig, settings: Settings, store: ArtifactStore
) -> tuple[JobConfig, dict[str, str]]:
    """The config ``core.plan`` can read: checked as ``POST /v1/jobs`` checks it (references,
    the data's and the model's size), its uploads turned into their local files.

    Returns the config and {local path: what a person calls it} so that error messages name
    uploads by id, never by a server path. Torchvision data is read from the operator's data
    directory and never downloaded for a plan.
    """
    from store import references

    config = resolve_references(session, tenant, config)
    check_job_size(session, tenant.id, config, settings)
    try:
        resolved = references.resolve_for_run(session, tenant.id, config, store.local_path, settings)
    except references.ReferenceNotFound as err:
        raise AppError(404, str(err)) from None
    except references.UnresolvedReference as err:
        raise AppError(422, str(err)) from None
    if resolved.dataset.download:
        resolved = resolved.model_copy(
            update={"dataset": resolved.dataset.model_copy(update={"download": False})}
        )
    names: dict[str, str] = {}
    for before, after, label in (
        (config.dataset.id, resolved.dataset.path, "dataset"),
        (config.model.weights, resolved.model.weights, "model"),
        (getattr(config.model, "program", None), getattr(resolved.model, "program", None), "model"),
    ):
        if before is not None and after is not None and before != after:
            names[str(after)] = f"{label} {before}"
    return resolved, names


def build_plan(config: JobConfig, names: Mapping[str, str]) -> dict[str, Any]:
    """``core.plan.plan_job`` with its errors as 422s that name no server path."""
    from core.config import ConfigError
    from core.plan import plan_job
    from core.progress import JobError

    try:
        return plan_job(config).to_dict()
    except (ConfigError, JobError, ValueError) as err:
        message = str(err)
        for path, name in names.items():
            message = message.replace(path, name)
        raise AppError(422, message) from None


PROGRAM_PLAN_TIMEOUT_S = 120.0


def _plan_child(config_json: str, conn: Any) -> None:
    """Body of the child that plans a program job: sends ("ok", plan) or ("error", message)."""
    from core.config import ConfigError, JobConfig
    from core.plan import plan_job
    from core.progress import JobError

    try:
        result: tuple[str, Any] = ("ok", plan_job(JobConfig.model_validate_json(config_json)).to_dict())
    except (ConfigError, JobError, ValueError) as err:
        result = ("error", str(err))
    except Exception as err:  # never a traceback to the user; the API logs the type
        result = ("crash", type(err).__name__)
    conn.send(result)
    conn.close()


def build_plan_in_child(
    config: JobConfig, names: Mapping[str, str], timeout_s: float = PROGRAM_PLAN_TIMEOUT_S
) -> dict[str, Any]:
    """:func:`build_plan` for a torch.export program, in a spawned child process.

    Note: an uploaded program is validated as data at upload, but it is only ever *loaded*
    outside the API process (the worker's child loader, or here), so a program that crashes
    or hangs torch takes down a disposable child, never the API.
    """
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    receive, send = ctx.Pipe(duplex=False)
    # not a daemon: the program loader starts a child of its own (crash isolation), which a
    # daemonic process may not do; the child is killed below if it does not answer in time
    proc = ctx.Process(target=_plan_child, args=(config.model_dump_json(), send))
    proc.start()
    send.close()
    try:
        outcome = receive.recv() if receive.poll(timeout_s) else ("timeout", None)
    except EOFError:  # the child died without answering
        outcome = ("crash", f"exit code {proc.exitcode}")
    finally:
        receive.close()
        proc.join(timeout=1)
        if proc.is_alive():
            proc.kill()
            proc.join(timeout=5)
    kind, value = outcome
    if kind == "ok" and isinstance(value, dict):
        return value
    if kind == "error":
        message = str(value)
        for path, name in names.items():
            message = message.replace(path, name)
        raise AppError(422, message)
    log.warning("planning a program failed in its child process: %s %s", kind, value)
    what = "did not finish in time" if kind == "timeout" else "crashed"
    raise AppError(422, f"the model's program {what} while it was being planned; check that it runs")


async def plan_for(
    session: Session, tenant: TenantRef, config: JobConfig, settings: Settings, store: ArtifactStore
) -> dict[str, Any]:
    """Check the config, then build the plan in a worker thread; 429 when too many are running."""
    from starlette.concurrency import run_in_threadpool

    prepared, names = await run_in_threadpool(plan_config, session, tenant, config, settings, store)
    # the references were read; the connection is not needed while the model is built
    await run_in_threadpool(session.close)
    sem = _plan_semaphore()
    if sem.value == 0:
        raise AppError(
            429,
            "the server is building other plans; try again in a few seconds",
            headers={"Retry-After": "2"},
        )
    builder = build_plan_in_child if prepared.model.program else build_plan
    async with sem:
        return await run_in_threadpool(builder, prepared, names)


class PlanRead(BaseModel):
    model_config = ConfigDict(extra="allow")

    arch: str
    factors: int
    input_shape: list[int]
    num_classes: int
    params: int = Field(description="Parameters of the model as built (dense).")
    flops: int = Field(description="FLOPs of one forward pass at batch 1 (2 x multiply-adds).")
    composed: list[dict[str, Any]] = Field(description="Weights LoRITa composes into factors.")
    skipped: list[dict[str, Any]] = Field(description="Weights left alone, each with the reason.")
    training: dict[str, Any] = Field(description="What the factors add during training.")


@router.post("/v1/plan", response_model=PlanRead, summary="Dry run of a job config (lorita plan)")
async def plan(
    config: JobConfig,
    session: ShortSession,
    tenant: BriefTenant,
    settings: SettingsDep,
    store: StoreDep,
) -> dict[str, Any]:
    """The body is a job config, checked as ``POST /v1/jobs`` checks it. Builds the model for the
    config's data and says which weights LoRITa composes (and why others are skipped), what the
    factors add during training, and the model's parameters and FLOPs. Trains nothing."""
    check_text(config.model_dump())
    return await plan_for(session, tenant, config, settings, store)


# ---------------------------------------------------------------------------------------
# Derived jobs: another operating point of a finished job
# ---------------------------------------------------------------------------------------


class SelectCreate(BaseModel):
    # strict as the job config is: "finetune": "yes" was true, a derived job that fine-tuned
    model_config = ConfigDict(extra="forbid", strict=True)

    compress: CompressConfig = Field(description="Any compression policy, as in a job config.")
    finetune: bool | FinetuneConfig = Field(
        default=False,
        description="true: fine-tune as the parent job's config says; an object: these settings; "
        "false: no fine-tuning.",
    )
    export: list[ExportFormat] | None = Field(
        default=None, description="Formats to write (default: the parent job's)."
    )
    name: str | None = Field(default=None, max_length=200)

    @field_validator("finetune", mode="before")
    @classmethod
    def _bool_or_settings(cls, value: Any) -> Any:
        # one message instead of one per member of the union ("finetune.bool: ...; finetune.FinetuneConfig: ...")
        if not isinstance(value, bool | dict | FinetuneConfig):
            raise ValueError(
                f"expected true, false or an object of fine-tuning settings, got {shown_value(value)}"
            )
        return value


def derived_config(parent: Job, body: SelectCreate) -> dict[str, Any]:
    """The derived job's stored config: the parent's, with the new policy, fine-tuning, export."""
    raw = json.loads(json.dumps(parent.config))
    raw["compress"] = body.compress.model_dump(mode="json")
    if isinstance(body.finetune, FinetuneConfig):
        raw["finetune"] = body.finetune.model_dump(mode="json")
    elif not body.finetune:
        raw["finetune"] = {**dict(raw.get("finetune") or {}), "epochs": 0}
    if body.export is not None:
        raw["export"] = list(body.export)
    raw["name"] = body.name or f"{parent.name or parent.id}: {policy_label(raw['compress'])}"
    return JobConfig.model_validate(raw).model_dump(mode="json")


def policy_label(policy: Mapping[str, Any]) -> str:
    name = str(policy.get("policy"))
    if name == "ranks":
        return f"ranks of {len(policy.get('ranks') or {})} layer(s)"
    for key in ("budget", "keep", "energy", "max_drop", "max_rel_drop"):
        if policy.get(key) is not None:
            return f"{name} {key}={policy[key]:g}"
    return name


def check_ranks(session: Session, parent_id: str, ranks: Mapping[str, int]) -> None:
    """A ``ranks`` policy against the parent's layers (its dense reference point: every truncatable
    layer at full rank): 422 naming an unknown layer or a rank outside its range. The worker checks
    again against the model itself."""
    result = job_repo.get_result(session, parent_id)
    pareto = (result.report or {}).get("pareto") if result is not None else None
    first = pareto[0] if isinstance(pareto, list) and pareto else None
    full = first.get("ranks") if isinstance(first, dict) else None
    if not isinstance(full, dict) or not full:
        return
    check_ranks_against(full, ranks, f"job {parent_id}")


def create_derived_job(
    session: Session,
    tenant: TenantRef,
    parent_id: str,
    body: SelectCreate,
    *,
    settings: Settings,
    idempotency_key: str | None,
) -> tuple[Job, bool]:
    """Insert the derived job of ``parent_id`` (not committed); (job, created)."""
    parent = job_repo.get_for_tenant(session, tenant.id, parent_id)
    if parent is None:
        raise not_found("job", parent_id)
    if parent.status != JobStatus.SUCCEEDED:
        raise AppError(
            409,
            f"job {parent_id} is {parent.status}; another operating point can be chosen once it "
            "has succeeded",
        )
    if job_repo.get_artifact(session, parent_id, DENSE_WEIGHTS) is None:
        raise AppError(
            409,
            f"job {parent_id} has no stored dense model (it ran before the service kept one); "
            "submit it again to choose other operating points",
        )
    if isinstance(body.compress, RanksPolicy):
        check_ranks(session, parent_id, body.compress.ranks)
    stored = derived_config(parent, body)
    check_submit(session, tenant.id, JobConfig.model_validate(stored), settings, idempotency_key)
    job, created = job_repo.create(
        session,
        tenant.id,
        stored,
        max_attempts=settings.max_attempts,
        name=stored.get("name"),
        idempotency_key=idempotency_key,
    )
    if not created:
        if job.config != stored or job.parent_id != parent_id:
            raise AppError(
                409, f"Idempotency-Key {idempotency_key!r} was used for job {job.id} with a different request"
            )
        return job, False
    job.parent_id = parent_id
    session.flush()
    return job, True


def send_after_commit(dispatcher: Any, job: Job) -> None:
    try:
        dispatcher.send(job.id, config=job.config)
    except Exception:
        log.warning("could not enqueue job %s; it stays queued for the sweeper", job.id, exc_info=True)


@router.post(
    "/v1/jobs/{job_id}/select",
    status_code=202,
    response_model=JobRead,
    summary="Another operating point of a finished job (a derived job, no training)",
    responses={
        200: {"description": "The job already created with this Idempotency-Key."},
        409: {"description": "The parent has not succeeded, or has no stored dense model."},
    },
)
def select_operating_point(
    job_id: str,
    body: SelectCreate,
    response: Response,
    session: SessionDep,
    tenant: CurrentTenant,
    settings: SettingsDep,
    dispatcher: DispatcherDep,
    idempotency_key: IdempotencyKey = None,
) -> JobRead:
    """Creates a job whose ``parent_id`` is ``job_id``: a worker reloads the parent's collapsed
    dense model, reruns the rank search with ``compress`` on the same validation split, and
    writes a new report and artifacts. Nothing is trained (unless ``finetune`` asks for it)."""
    check_text(body.model_dump())
    job, created = create_derived_job(
        session, tenant, job_id, body, settings=settings, idempotency_key=idempotency_key
    )
    if not created:
        response.status_code = 200
        return job_read(job)
    session.commit()  # durable before any worker hears of it
    send_after_commit(dispatcher, job)
    return job_read(job)
