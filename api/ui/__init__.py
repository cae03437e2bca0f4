"""The service's web page at ``/ui`` (see ``api.ui.routes``): ``install(app)`` adds it."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

from api.ui.bridge import PREFIX, UiApiBridge
from api.ui.routes import router

STATIC_DIR = Path(__file__).parent / "static"


def install(app: FastAPI) -> None:
    """The page's routes, its static files (CSS, JS) and the cookie bridge to the JSON API."""
    app.include_router(router)
    app.mount("/ui/static", StaticFiles(directory=STATIC_DIR), name="ui-static")
    app.mount(PREFIX, UiApiBridge(), name="ui-api")
