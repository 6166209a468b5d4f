"""Request dependencies: the app state, API-key and admin-key checks.

Auth policy: with API keys configured, every /v1/* route needs ``Authorization: Bearer <key>``
(or ``X-API-Key``); the admin key also works there. /v1/bake needs the admin key and is off
(403 ``admin_disabled``) without one. /health, /metrics, / and the OpenAPI pages stay open, so
probes and scrapers work without a key: put the server behind a proxy if those must be private.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from fastapi import Request

from directions.fileformat import DirectionSet
from directions.models import LoadedModel
from server.engine.protocol import Engine
from server.errors import AuthError, PermissionDenied
from server.metrics import Metrics
from server.serving import ChatServing, CompletionServing
from server.settings import ModelSettings, ServerSettings
from server.steering import SteeringPolicy

if TYPE_CHECKING:
    from directions.bake_jobs import BakeJobs


@dataclass
class AppState:
    """Everything the routes need, stored on ``app.state.frankly`` (no module globals)."""

    engine: Engine
    chat: ChatServing
    completions: CompletionServing
    policy: SteeringPolicy
    settings: ServerSettings
    model_settings: ModelSettings
    metrics: Metrics
    directions: dict[str, DirectionSet]
    loaded: LoadedModel  # the served model's source: what /v1/bake reloads and edits
    bake_jobs: BakeJobs | None = None
    api_keys: list[str] = field(default_factory=list)
    started: float = 0.0


def state(request: Request) -> AppState:
    """The app's state (set by ``build_app``)."""
    return request.app.state.frankly


_CHALLENGE = {"WWW-Authenticate": "Bearer"}  # RFC 7235: a 401 names the scheme it wants


def _bearer(request: Request) -> str | None:
    h = request.headers.get("authorization", "")
    if h.lower().startswith("bearer "):
        return h[7:].strip()
    return request.headers.get("x-api-key")


def _match(key: str | None, keys: list[str]) -> bool:
    return key is not None and any(hmac.compare_digest(key.encode(), k.encode()) for k in keys)


async def require_api_key(request: Request) -> None:
    st = state(request)
    if not st.api_keys:
        return
    key = _bearer(request)
    admin = st.settings.admin_key
    if _match(key, st.api_keys) or (admin and _match(key, [admin])):
        return
    if key is None:
        raise AuthError("missing API key: send 'Authorization: Bearer <key>'", headers=_CHALLENGE)
    raise AuthError("invalid API key", headers=_CHALLENGE)


async def require_admin(request: Request) -> None:
    st = state(request)
    admin = st.settings.admin_key
    if not admin:
        raise PermissionDenied(
            "admin routes are disabled: start the server with --admin-key to enable them", code="admin_disabled"
        )
    key = _bearer(request)
    if key is None:
        raise AuthError("missing admin key: send 'Authorization: Bearer <admin key>'", headers=_CHALLENGE)
    if not _match(key, [admin]):
        if _match(key, st.api_keys):
            raise PermissionDenied("this route needs the admin key; a user API key is not enough")
        raise AuthError("invalid admin key", headers=_CHALLENGE)
