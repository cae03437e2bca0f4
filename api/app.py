"""The FastAPI application: ``create_app(settings)``; ``uvicorn api.app:app`` builds it lazily."""

from __future__ import annotations

import logging
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI

from api import datasets, health, jobs, models, operating_points, report_schema, ui
from api.conformance import install as install_conformance
from api.deletion import router as deletion_router
from api.downloads import install_store_error_handlers
from api.errors import install_error_handlers
from api.limits import BodySizeLimit, RefuseNulPath
from api.metrics import install_metrics
from api.quotas import EarlyUploadQuota
from store.artifacts import get_artifact_store
from store.logging import configure_logging
from store.settings import Settings, get_settings

# Multipart framing and the form fields ride along with the file: allow them on top of the cap.
MULTIPART_SLACK_BYTES = 1024 * 1024

DESCRIPTION = """
Compress neural networks with **LoRITa** (low-rank induced training) and singular value truncation.

1. Create an API key: `lorita keys create --tenant NAME`; send it as `Authorization: Bearer <key>`.
2. Optionally upload weights (`POST /v1/models`) and data (`POST /v1/datasets`).
3. Submit a job config (`POST /v1/jobs`), poll `GET /v1/jobs/{id}`, then download
   `GET /v1/jobs/{id}/artifacts/{name}` and read `GET /v1/jobs/{id}/report`.

Errors are JSON `{"detail": "..."}` saying what to change. Another tenant's objects answer 404.
"""


log = logging.getLogger("lorita.api")


def _warm_imports() -> None:
    """Import what the first job submission needs, ahead of it.

    Validating a job config checks the architecture against ``core.zoo``, which imports torch:
    seconds of the first ``POST /v1/jobs`` otherwise (measured 2.7 s of a 2.9 s dispatch on two
    cores). Done in a thread at start-up, so the service answers probes meanwhile; a request that
    needs the modules earlier waits on the import lock, as it would have anyway.
    """
    try:
        import core.zoo  # noqa: F401
    except Exception:  # a missing optional part shows up, with its message, where it is used
        log.debug("warm-up import failed", exc_info=True)


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    threading.Thread(target=_warm_imports, name="lorita-warm-up", daemon=True).start()
    yield


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    app = FastAPI(
        lifespan=_lifespan,
        title="lorita",
        version="0.1.0",
        description=DESCRIPTION,
        docs_url="/docs",
        openapi_tags=[
            {"name": "jobs", "description": "Compression jobs: submit, watch, cancel, results."},
            {"name": "models", "description": "Uploaded weights, checked against their architecture."},
            {"name": "datasets", "description": "Uploaded .npz / ImageFolder data and the built-ins."},
            {"name": "health", "description": "Probes for orchestrators."},
        ],
    )
    if settings.log_format is not None:
        configure_logging(settings.log_format)
    app.state.settings = settings
    app.state.artifact_store = get_artifact_store(settings)
    install_error_handlers(app)
    install_store_error_handlers(app)
    # inside the size cap: the quota query runs only for a body the server would accept at all
    app.add_middleware(EarlyUploadQuota, framing_bytes=MULTIPART_SLACK_BYTES)
    app.add_middleware(RefuseNulPath)
    app.add_middleware(
        BodySizeLimit,
        max_bytes=settings.max_upload_bytes + MULTIPART_SLACK_BYTES,
        file_limit=settings.max_upload_bytes,
        json_max_bytes=settings.max_json_bytes,
    )
    for module in (health, models, datasets, jobs, operating_points):
        app.include_router(module.router)
    ui.install(app)  # the page at /ui
    app.include_router(report_schema.router)
    install_conformance(app)  # HEAD, OPTIONS and 405 Allow on every route; errors in the schema
    app.include_router(deletion_router)
    install_metrics(app, settings)  # outermost: counts every answer, 413s included
    return app


_app: FastAPI | None = None


def __getattr__(name: str) -> Any:
    # `uvicorn api.app:app` reads settings only when the server starts, not at import
    global _app
    if name == "app":
        if _app is None:
            _app = create_app()
        return _app
    raise AttributeError(name)
