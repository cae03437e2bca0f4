"""``Annotated`` dependency aliases shared by the routes."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from api.dispatch import Dispatcher, get_broker_ping, get_dispatcher
from api.errors import AppError
from store.artifacts import ArtifactStore, LocalArtifactStore
from store.db import get_sessionmaker
from store.models import Tenant
from store.repositories import api_keys
from store.settings import Settings


def get_app_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


SettingsDep = Annotated[Settings, Depends(get_app_settings)]


def get_session(settings: SettingsDep) -> Iterator[Session]:
    """A session per request. Write routes commit once at their end; errors roll back."""
    session = get_sessionmaker(settings.database_url)()
    try:
        yield session
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


SessionDep = Annotated[Session, Depends(get_session)]


def get_artifact_store(request: Request) -> ArtifactStore:
    store: LocalArtifactStore = request.app.state.artifact_store
    return store


StoreDep = Annotated[ArtifactStore, Depends(get_artifact_store)]

_bearer = HTTPBearer(auto_error=False, description="An API key: `lorita keys create --tenant NAME`.")
_AUTH_HINT = "send 'Authorization: Bearer <api key>'; create a key with `lorita keys create --tenant NAME`"


def get_current_tenant(
    session: SessionDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Tenant:
    challenge = {"WWW-Authenticate": "Bearer"}
    if credentials is None or not credentials.credentials:
        raise AppError(401, f"missing API key: {_AUTH_HINT}", headers=challenge)
    tenant = api_keys.tenant_for_key(session, credentials.credentials)
    if tenant is None:
        raise AppError(401, f"invalid or revoked API key: {_AUTH_HINT}", headers=challenge)
    return tenant


CurrentTenant = Annotated[Tenant, Depends(get_current_tenant)]
DispatcherDep = Annotated[Dispatcher, Depends(get_dispatcher)]
BrokerPingDep = Annotated[Callable[[], None], Depends(get_broker_ping)]
