"""Liveness and readiness probes."""

from __future__ import annotations

import logging

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from sqlalchemy import text

from api.deps import BrokerPingDep, SessionDep
from api.errors import RETRY_AFTER_SECONDS
from api.schemas import Health, Readiness

log = logging.getLogger("lorita.api")
router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Health, summary="The process is up")
def healthz() -> Health:
    return Health(status="ok")


@router.get(
    "/readyz",
    response_model=Readiness,
    summary="The database and the broker are reachable",
    responses={503: {"model": Readiness, "description": "A dependency is unreachable; `checks` says which."}},
)
def readyz(session: SessionDep, broker_ping: BrokerPingDep) -> Readiness | JSONResponse:
    checks: dict[str, str] = {}
    try:
        session.execute(text("SELECT 1"))
        checks["database"] = "ok"
    except Exception as err:
        log.warning("readiness: database unreachable: %s", err)
        checks["database"] = f"unreachable: {type(err).__name__}"
    try:
        broker_ping()
        checks["broker"] = "ok"
    except Exception as err:
        log.warning("readiness: broker unreachable: %s", err)
        # the probe is unauthenticated: the error's text (hosts, ports, URLs) stays in the log
        checks["broker"] = f"unreachable: {type(err).__name__}"
    failed = [name for name, state in checks.items() if state != "ok"]
    if failed:
        body = {
            "status": "unavailable",
            "checks": checks,
            "detail": f"not ready: {', '.join(failed)} unreachable",
        }
        return JSONResponse(body, status_code=503, headers={"Retry-After": str(RETRY_AFTER_SECONDS)})
    return Readiness(status="ok", checks=checks)
