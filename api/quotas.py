"""Per-tenant quotas and the per-job work limit, checked before anything is stored or queued.

* Active jobs (queued + running) past ``LORITA_MAX_ACTIVE_JOBS``: 429 with ``Retry-After`` (a slot
  frees when one of them ends).
* Stored bytes (uploads + job outputs) past ``LORITA_MAX_STORED_BYTES``: an upload is 413, a new
  job 409 (its outputs would add more); either way the message says how to free space.
* Work: parameters (times the LoRITa factors while training) x training samples x epochs (training
  plus fine-tuning) past ``LORITA_MAX_JOB_WORK``: 422 naming what to shrink. The model is sized on
  the meta device, the data from the config and the upload records (``api.job_checks``).

A replay of a submission with a known ``Idempotency-Key`` is never refused: it creates nothing.

An upload is checked twice against the stored-bytes quota: by its declared ``Content-Length``
before its body is read (:class:`EarlyUploadQuota`), so a tenant near its quota is not kept
waiting while a file that cannot fit streams in; and by its real size once it has arrived
(:func:`check_upload`), the one that counts, since a Content-Length can be absent or lie.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Iterator
from contextlib import AsyncExitStack
from typing import Any

from fastapi import params
from fastapi.dependencies.utils import get_dependant, solve_dependencies
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from api.deps import CurrentTenant, SessionDep, SettingsDep
from api.errors import DATABASE_DOWN_ERRORS, AppError, send_app_error
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


def _upload_refusal(used: int, size: int, shown: int, settings: Settings) -> AppError | None:
    if used + size > settings.max_stored_bytes:
        return _store_full(used, settings, 413, f"this upload of {human_bytes(shown)} does not fit")
    return None


def check_upload(session: Session, tenant_id: str, size: int, settings: Settings) -> None:
    """413 when an upload of ``size`` bytes would take the tenant past its stored-bytes quota."""
    err = _upload_refusal(quotas.stored_bytes(session, tenant_id), size, size, settings)
    if err is not None:
        raise err


def _upload_caller(session: SessionDep, tenant: CurrentTenant, settings: SettingsDep) -> None:
    """What the early check needs of a request, resolved by the routes' own dependencies."""


log = logging.getLogger("lorita.api")

try:  # recent FastAPI keeps included routers as route contexts (not in app.routes)
    from fastapi.routing import iter_route_contexts as _routes_of
except ImportError:  # older FastAPI copies included routes into app.routes

    def _routes_of(routes: Iterable[Any]) -> Iterator[Any]:  # type: ignore[misc]
        return iter(routes)


_UPLOAD_CALLER = get_dependant(path="", call=_upload_caller)
# failures of the early check that the route itself answers (401 for the key, 503 for the database)
_ROUTE_ANSWERS: tuple[type[Exception], ...] = (AppError, *DATABASE_DOWN_ERRORS)


def _upload_paths(app: Any) -> list[re.Pattern[str]]:
    """Path patterns of the POST routes that take a file (built once per app)."""
    routes = getattr(app, "routes", [])
    cached = getattr(app.state, "upload_paths", None)
    if cached is not None and cached[0] == len(routes):
        return list(cached[1])
    found = []
    for route in _routes_of(routes):
        dependant = getattr(route, "dependant", None)
        regex = getattr(route, "path_regex", None)
        if dependant is None or regex is None or "POST" not in (getattr(route, "methods", None) or ()):
            continue
        if any(isinstance(p.field_info, params.File) for p in dependant.body_params):
            found.append(regex)
    app.state.upload_paths = (len(routes), found)
    return found


class EarlyUploadQuota:
    """Refuse an upload whose declared Content-Length cannot fit the tenant's stored-bytes quota,
    before its body is read, with :func:`check_upload`'s 413 message.

    FastAPI reads (spools) a body before it resolves the route's dependencies, so the route's own
    check sees the file only once all of it has arrived. Here the caller is resolved by those same
    dependencies (``api.deps``: the key cache, else one query; a database slot held only for the
    check), then one query sums what the tenant stores. The declared length counts the multipart
    framing and form fields too: ``framing_bytes`` of it are not counted, so only a body that
    clearly does not fit is refused. Whatever this cannot decide (no Content-Length, no key or a
    bad one, the database unreachable) goes on to the route unchanged, which answers as it always
    has: a bad key is a 401 before any talk of quotas.
    """

    def __init__(self, app: ASGIApp, framing_bytes: int) -> None:
        self.app = app
        self.framing_bytes = framing_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            try:
                err = await self._refusal(scope)
            except Exception:
                # only a courtesy: this leans on FastAPI's own machinery (route contexts,
                # solve_dependencies); should a release change it, the upload goes on to the route,
                # whose check_upload runs once the body has arrived
                log.warning("early upload quota check skipped", exc_info=True)
                err = None
            if err is not None:
                await send_app_error(send, err)
                return
        await self.app(scope, receive, send)

    async def _refusal(self, scope: Scope) -> AppError | None:
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if not declared.isdigit():
            return None
        size = int(declared) - self.framing_bytes
        app = scope.get("app")
        if size <= 0 or app is None or not any(p.match(scope["path"]) for p in _upload_paths(app)):
            return None
        async with AsyncExitStack() as stack:
            # the dependencies see the request's headers only: the body stays unread
            probe = Request({**scope, "fastapi_inner_astack": stack, "fastapi_function_astack": stack})
            try:
                solved = await solve_dependencies(
                    request=probe,
                    dependant=_UPLOAD_CALLER,
                    dependency_overrides_provider=app,
                    async_exit_stack=stack,
                    embed_body_fields=False,
                )
                if solved.errors:
                    return None
                session, tenant = solved.values["session"], solved.values["tenant"]
                used = await run_in_threadpool(quotas.stored_bytes, session, tenant.id)
            except _ROUTE_ANSWERS:
                return None
        return _upload_refusal(used, size, int(declared), solved.values["settings"])


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
