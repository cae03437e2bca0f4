"""The page at ``/ui``: server-rendered templates over the same repositories as the API.

Pages read with the signed-in tenant (the key in the session cookie goes through the API's own
key check); the few form posts (sign in/out, cancel, "use this point") check the CSRF token and
the origin; everything the page's scripts do goes through ``/ui/api`` (see ``api.ui.bridge``).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any
from urllib.parse import quote

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.security import HTTPAuthorizationCredentials
from fastapi.templating import Jinja2Templates
from sqlalchemy import select
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from api.deps import DispatcherDep, SessionDep, SettingsDep, TenantRef, get_current_tenant
from api.errors import AppError
from api.jobs import job_read
from api.operating_points import DENSE_PREFIX, SelectCreate, create_derived_job, send_after_commit
from api.ui import charts
from api.ui.security import (
    CSRF_FIELD,
    LOGIN_COOKIE,
    clear_session_cookie,
    csrf_token,
    new_login_token,
    same_origin,
    session_key,
    set_login_cookie,
    set_session_cookie,
    tokens_match,
)
from store.models import Job
from store.repositories import datasets as dataset_repo
from store.repositories import jobs as job_repo
from store.repositories import models as model_repo
from store.status import FINISHED, JobStatus

log = logging.getLogger("lorita.api")
router = APIRouter(include_in_schema=False)
HERE = Path(__file__).parent
templates = Jinja2Templates(directory=str(HERE / "templates"))

EXAMPLE_FILE = HERE.parents[1] / "examples" / "digits_fcn.json"
# The page's starting config when the examples folder is not installed next to the package.
FALLBACK_EXAMPLE: dict[str, Any] = {
    "name": "digits-fcn-lorita",
    "model": {"arch": "fcn", "options": {"depth": 4, "width": 96}},
    "dataset": {"name": "digits", "val_fraction": 0.15},
    "train": {
        "factors": 3,
        "epochs": 20,
        "optimizer": "adam",
        "lr": 0.01,
        "weight_decay": 2e-4,
        "batch_size": 64,
        "seed": 0,
    },
    "compress": {"policy": "accuracy_budget", "max_drop": 0.01, "max_evals": 20},
    "finetune": {"epochs": 2},
    "export": ["safetensors", "pt2", "onnx"],
}


def example_config() -> dict[str, Any]:
    try:
        loaded = json.loads(EXAMPLE_FILE.read_text())
    except (OSError, ValueError):
        return FALLBACK_EXAMPLE
    return loaded if isinstance(loaded, dict) else FALLBACK_EXAMPLE


class SignedIn:
    def __init__(self, tenant: TenantRef, key: str) -> None:
        self.tenant = tenant
        self.key = key
        self.csrf = csrf_token(key)


async def signed_in(request: Request, settings: Any, session: Session) -> SignedIn | None:
    key = session_key(request)
    if key is None:
        return None
    credentials = HTTPAuthorizationCredentials(scheme="Bearer", credentials=key)
    try:
        tenant = await get_current_tenant(request, settings, session, credentials)
    except AppError:
        return None
    return SignedIn(tenant, key)


def to_login(request: Request) -> RedirectResponse:
    target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    return RedirectResponse(f"/ui/login?next={quote(target)}", status_code=303)


def safe_next(value: str | None) -> str:
    """Only a path of this page, never another site (``//evil`` or ``https://...``)."""
    if value and value.startswith("/ui/") and not value.startswith("//") and "\\" not in value:
        return value
    return "/ui/jobs"


async def check_form(request: Request, user: SignedIn) -> dict[str, str]:
    """The posted form, after the origin and CSRF checks (403 otherwise)."""
    if not same_origin(request):
        raise AppError(403, "cross-site request refused")
    form = await request.form()
    if not tokens_match(str(form.get(CSRF_FIELD) or ""), user.csrf):
        raise AppError(403, "missing or wrong CSRF token: reload the page and try again")
    return {k: str(v) for k, v in form.items() if isinstance(v, str)}


def render(
    request: Request, name: str, user: SignedIn | None, status_code: int = 200, **context: Any
) -> HTMLResponse:
    context.update(
        user=user,
        csrf=user.csrf if user else "",
        tenant=user.tenant.name if user else None,
    )
    response = templates.TemplateResponse(request, name, context, status_code=status_code)
    response.headers["Cache-Control"] = "no-store"
    response.headers["X-Frame-Options"] = "DENY"
    response.headers["Content-Security-Policy"] = (
        "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
        "frame-ancestors 'none'; form-action 'self'; base-uri 'none'"
    )
    response.headers["Referrer-Policy"] = "same-origin"
    return response


_TITLES = {
    401: "Not signed in",
    403: "Refused",
    404: "Not found",
    409: "Not possible now",
    429: "Too many jobs",
}


def error_page(
    request: Request, user: SignedIn | None, err: AppError, back: str = "/ui/jobs"
) -> HTMLResponse:
    """A form post's refusal as a page (the API's JSON would show as raw text in a browser)."""
    title = _TITLES.get(err.status_code, "Could not do that")
    response = render(
        request,
        "message.html",
        user,
        status_code=err.status_code,
        title=title,
        message=err.message,
        back=back,
    )
    for name, value in (err.headers or {}).items():
        response.headers[name] = value
    return response


# ---------------------------------------------------------------------------------------
# sign in / out


@router.get("/")
def root() -> RedirectResponse:
    return RedirectResponse("/ui", status_code=302)


@router.get("/ui")
def ui_root() -> RedirectResponse:
    return RedirectResponse("/ui/jobs", status_code=302)


@router.get("/ui/login")
def login_page(request: Request, next: str | None = None) -> HTMLResponse:
    token = new_login_token()
    response = render(request, "login.html", None, login_token=token, next=safe_next(next), error=None)
    set_login_cookie(response, request, token)
    return response


@router.post("/ui/login")
async def login(request: Request, settings: SettingsDep, session: SessionDep) -> Response:
    if not same_origin(request):
        return error_page(request, None, AppError(403, "cross-site request refused"), back="/ui/login")
    form = await request.form()
    token = request.cookies.get(LOGIN_COOKIE) or ""
    if not tokens_match(str(form.get(CSRF_FIELD) or ""), token):
        expired = AppError(403, "the sign-in form expired: reload the page and try again")
        return error_page(request, None, expired, back="/ui/login")
    key = str(form.get("api_key") or "").strip()
    target = safe_next(str(form.get("next") or ""))
    user = None
    if key and len(key) <= 200:
        credentials = HTTPAuthorizationCredentials(scheme="Bearer", credentials=key)
        try:
            tenant = await get_current_tenant(request, settings, session, credentials)
            user = SignedIn(tenant, key)
        except AppError:
            user = None
    if user is None:
        response: Response = render(
            request,
            "login.html",
            None,
            status_code=401,
            login_token=token,
            next=target,
            error="That API key is not valid. Create one with `lorita keys create --tenant NAME`.",
        )
        return response
    response = RedirectResponse(target, status_code=303)
    set_session_cookie(response, request, key)
    response.delete_cookie(LOGIN_COOKIE, path="/ui/login")
    return response


@router.post("/ui/logout")
async def logout(request: Request, settings: SettingsDep, session: SessionDep) -> Response:
    user = await signed_in(request, settings, session)
    if user is not None:
        await check_form(request, user)
    response = RedirectResponse("/ui/login", status_code=303)
    clear_session_cookie(response)
    return response


# ---------------------------------------------------------------------------------------
# jobs


def result_cells(job: Job) -> dict[str, Any] | None:
    read = job_read(job)
    r = read.result
    if r is None:
        return None
    return {
        "params": r.params_after,
        "params_ratio": r.params_ratio,
        "flops": r.flops_after,
        "flops_ratio": r.flops_ratio,
        "test_accuracy": r.test_accuracy_after,
        "test_accuracy_before": r.test_accuracy_before,
    }


def _jobs_page_data(session: Session, tenant_id: str) -> list[dict[str, Any]]:
    jobs, _ = job_repo.list_for_tenant(session, tenant_id, limit=100)
    return [
        {
            "job": job_read(j),
            "parent_id": j.parent_id,
            "result": result_cells(j),
            "finished": j.status in FINISHED,
        }
        for j in jobs
    ]


@router.get("/ui/jobs", response_class=HTMLResponse)
async def jobs_page(request: Request, settings: SettingsDep, session: SessionDep) -> Response:
    user = await signed_in(request, settings, session)
    if user is None:
        return to_login(request)
    rows = await run_in_threadpool(_jobs_page_data, session, user.tenant.id)
    return render(request, "jobs.html", user, rows=rows)


@router.post("/ui/jobs/{job_id}/cancel")
async def cancel_from_page(
    job_id: str, request: Request, settings: SettingsDep, session: SessionDep
) -> Response:
    user = await signed_in(request, settings, session)
    try:
        return await _cancel_from_page(job_id, request, session, user)
    except AppError as err:
        return error_page(request, user, err)


async def _cancel_from_page(
    job_id: str, request: Request, session: Session, user: SignedIn | None
) -> Response:
    if user is None:
        raise AppError(401, "not signed in: sign in at /ui/login")
    await check_form(request, user)

    def cancel() -> None:
        job = job_repo.get_for_tenant(session, user.tenant.id, job_id)
        if job is None:
            raise AppError(404, f"job {job_id} not found")
        if job_repo.request_cancel(session, job) is not job_repo.CancelOutcome.FINISHED:
            session.commit()

    await run_in_threadpool(cancel)
    return RedirectResponse("/ui/jobs", status_code=303)


def _new_job_data(session: Session, tenant_id: str) -> dict[str, Any]:
    from api.datasets import BUILTINS

    models, _ = model_repo.list_for_tenant(session, tenant_id, limit=100)
    datasets, _ = dataset_repo.list_for_tenant(session, tenant_id, limit=100)
    return {
        "models": [{"id": m.id, "name": m.name, "arch": m.arch} for m in models],
        "datasets": [{"id": d.id, "name": d.name, "num_classes": d.num_classes} for d in datasets],
        "builtins": [b.name for b in BUILTINS],
    }


@router.get("/ui/jobs/new", response_class=HTMLResponse)
async def new_job_page(request: Request, settings: SettingsDep, session: SessionDep) -> Response:
    user = await signed_in(request, settings, session)
    if user is None:
        return to_login(request)
    data = await run_in_threadpool(_new_job_data, session, user.tenant.id)
    example = example_config()
    return render(request, "new.html", user, example=example, example_json=json.dumps(example), **data)


def _job_page_data(session: Session, tenant_id: str, job_id: str) -> dict[str, Any] | None:
    job = job_repo.get_for_tenant(session, tenant_id, job_id)
    if job is None:
        return None
    read = job_read(job)
    report: dict[str, Any] | None = None
    if job.status == JobStatus.SUCCEEDED:
        result = job_repo.get_result(session, job_id)
        report = dict(result.report) if result is not None else None
    artifacts = [
        {"name": a.name, "size_bytes": a.size_bytes, "sha256": a.sha256}
        for a in job_repo.list_artifacts(session, job_id)
        if not a.name.startswith(DENSE_PREFIX)
    ]
    events = job_repo.list_events(session, job_id, limit=1000)
    children = session.scalars(
        select(Job).where(Job.parent_id == job_id, Job.tenant_id == tenant_id).order_by(Job.created_at.desc())
    ).all()
    data: dict[str, Any] = {
        "job": read,
        "parent_id": job.parent_id,
        "finished": job.status in FINISHED,
        "report": report,
        "artifacts": artifacts,
        "epoch_rows": epoch_rows(report, events),
        "children": [{"id": c.id, "name": c.name, "status": str(c.status)} for c in children],
    }
    if report is not None:
        points = charts.pareto_points(report)
        ranks = charts.rank_rows(report)
        data.update(
            points=points,
            pareto_params_svg=charts.pareto_svg(points, "params"),
            pareto_flops_svg=charts.pareto_svg(points, "flops"),
            ranks=ranks,
            ranks_svg=charts.ranks_svg(ranks),
            before_after=before_after_rows(report),
            has_spectra=any(a["name"] == "spectra.png" for a in artifacts),
        )
    return data


def epoch_rows(report: dict[str, Any] | None, events: list[Any]) -> list[dict[str, Any]]:
    """Loss and validation accuracy per (stage, epoch): the report's histories once the job
    finished (measured at each epoch's end), else the progress events recorded so far."""
    rows: dict[tuple[str, int], dict[str, Any]] = {}
    if report is not None:
        for stage, part in (("train", report.get("training")), ("finetune", report.get("finetune"))):
            for h in (part or {}).get("history") or []:
                if isinstance(h, dict) and h.get("epoch") is not None:
                    rows[(stage, int(h["epoch"]))] = {
                        "stage": stage,
                        "epoch": int(h["epoch"]),
                        "loss": h.get("loss"),
                        "val_accuracy": h.get("val_accuracy"),
                    }
    if not rows:
        for e in events:
            if e.epoch is None or (e.loss is None and e.val_accuracy is None):
                continue
            row = rows.setdefault(
                (e.stage, e.epoch), {"stage": e.stage, "epoch": e.epoch, "loss": None, "val_accuracy": None}
            )
            row["loss"] = e.loss if e.loss is not None else row["loss"]
            row["val_accuracy"] = e.val_accuracy if e.val_accuracy is not None else row["val_accuracy"]
    return list(rows.values())


def _pct(v: Any) -> str:
    return "" if v is None else f"{float(v):.2%}"


def _count(v: Any) -> str:
    return "" if v is None else f"{int(v):,}"


def before_after_rows(report: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """(figure, before, after, after/before) for the before/after table."""
    rows = []
    for key, label in (("params", "parameters"), ("flops", "FLOPs per sample")):
        part = report.get(key) or {}
        ratio = part.get("ratio")
        rows.append(
            (
                label,
                _count(part.get("before")),
                _count(part.get("after")),
                "" if ratio is None else f"{ratio:.3f}x",
            )
        )
    for split in ("val", "test"):
        part = (report.get("accuracy") or {}).get(split) or {}
        rows.append((f"{split} accuracy", _pct(part.get("before")), _pct(part.get("after")), ""))
    for batch, part in sorted(
        (report.get("latency_ms") or {}).items(), key=lambda kv: int(kv[0]) if str(kv[0]).isdigit() else 0
    ):
        before, after = part.get("before"), part.get("after")
        if before is None and after is None:
            continue
        ratio = f"{after / before:.3f}x" if before and after is not None else ""
        fmt = lambda v: "" if v is None else f"{v:.3f} ms"  # noqa: E731
        rows.append((f"latency, batch {batch}", fmt(before), fmt(after), ratio))
    return rows


@router.get("/ui/jobs/{job_id}", response_class=HTMLResponse)
async def job_page(job_id: str, request: Request, settings: SettingsDep, session: SessionDep) -> Response:
    user = await signed_in(request, settings, session)
    if user is None:
        return to_login(request)
    data = await run_in_threadpool(_job_page_data, session, user.tenant.id, job_id)
    if data is None:
        return render(request, "not_found.html", user, status_code=404, what=f"job {job_id}")
    return render(request, "job.html", user, **data)


@router.post("/ui/jobs/{job_id}/select")
async def select_from_page(
    job_id: str, request: Request, settings: SettingsDep, session: SessionDep, dispatcher: DispatcherDep
) -> Response:
    """ "Use this point": a derived job with the point's ranks (policy ``ranks``), then its page."""
    user = await signed_in(request, settings, session)
    try:
        return await _select_from_page(job_id, request, settings, session, dispatcher, user)
    except AppError as err:
        return error_page(request, user, err, back=f"/ui/jobs/{job_id}")


def point_policy(session: Session, tenant_id: str, job_id: str, index: int) -> dict[str, Any]:
    """The ``ranks`` policy of point ``index`` of the job's Pareto curve: the derived job builds
    exactly that model (the same dense model and validation split, so the same figures)."""
    parent = job_repo.get_for_tenant(session, tenant_id, job_id)
    if parent is None:
        raise AppError(404, f"job {job_id} not found")
    if parent.status != JobStatus.SUCCEEDED:
        raise AppError(
            409,
            f"job {job_id} is {parent.status}; another operating point can be chosen once it has succeeded",
        )
    result = job_repo.get_result(session, job_id)
    pareto = (result.report or {}).get("pareto") if result is not None else None
    points = pareto if isinstance(pareto, list) else []
    if not 0 <= index < len(points):
        raise AppError(422, f"point: job {job_id} has points 0..{len(points) - 1}, not {index}")
    ranks = points[index].get("ranks") if isinstance(points[index], dict) else None
    if not isinstance(ranks, dict) or not ranks:
        raise AppError(422, f"point {index} of job {job_id} has no per-layer ranks; submit the job again")
    return {"policy": "ranks", "ranks": ranks}


async def _select_from_page(
    job_id: str, request: Request, settings: Any, session: Session, dispatcher: Any, user: SignedIn | None
) -> Response:
    if user is None:
        raise AppError(401, "not signed in: sign in at /ui/login")
    form = await check_form(request, user)
    try:
        index = int(form.get("point", ""))
    except ValueError:
        raise AppError(422, "point: give the index of a point of the job's Pareto chart") from None
    finetune = form.get("finetune") == "on"

    def create() -> Job:
        compress = point_policy(session, user.tenant.id, job_id, index)
        body = SelectCreate.model_validate({"compress": compress, "finetune": finetune})
        job, created = create_derived_job(
            session,
            user.tenant,
            job_id,
            body,
            settings=settings,
            idempotency_key=form.get("idempotency_key") or None,
        )
        if created:
            session.commit()
            send_after_commit(dispatcher, job)
        return job

    job = await run_in_threadpool(create)
    return RedirectResponse(f"/ui/jobs/{job.id}", status_code=303)
