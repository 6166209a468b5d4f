"""The application factory: assembles settings, engine, serving and routers (no module globals)."""

from __future__ import annotations

import logging
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from server import __version__
from server.api import admin_routes, models_routes, openai_routes, system_routes
from server.deps import AppState
from server.engine import Engine, EngineConfig
from server.errors import ERROR_SCHEMA, ERROR_STATUSES, PayloadTooLarge, error_response, install_error_handlers
from server.metrics import Metrics
from server.serving import OpenAIServing
from server.settings import ModelSettings, ServerSettings
from server.steering import SteeringPolicy

log = logging.getLogger("frankly.app")


class BodyLimit:
    """ASGI middleware: refuse bodies over ``limit`` bytes with 413 (checks the header and the stream).

    The body is read here, up to the limit, and replayed to the app: raising from inside
    ``receive`` would be caught by FastAPI's body parsing and turned into a generic 400.
    """

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        err = PayloadTooLarge(f"request body exceeds {self.limit} bytes")
        for k, v in scope.get("headers", []):
            if k == b"content-length" and v.isdigit() and int(v) > self.limit:
                return await error_response(err)(scope, receive, send)
        chunks, seen = [], 0
        while True:
            msg = await receive()
            if msg["type"] != "http.request":  # client went away before sending its body
                return None
            body = msg.get("body", b"")
            seen += len(body)
            if seen > self.limit:
                return await error_response(err)(scope, receive, send)
            chunks.append(body)
            if not msg.get("more_body", False):
                break
        pending = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

        async def replay():
            # the buffered body once, then the real channel (disconnect detection needs it)
            return pending.pop() if pending else await receive()

        return await self.app(scope, replay, send)


STREAMING_PATHS = ("/v1/chat/completions", "/v1/completions")
# OpenAPI 3.1 has the event-stream `schema` describe one event (3.2 would call it itemSchema).
SSE_EVENT_SCHEMA = {
    "type": "object",
    "required": ["data"],
    "properties": {
        "data": {
            "type": "string",
            "description": (
                'a JSON chunk (chat.completion.chunk or text_completion), an error envelope {"error": {...}}, '
                "or [DONE] as the last event"
            ),
        }
    },
}


def document_responses(schema: dict) -> dict:
    """Make /openapi.json say what the server answers: FastAPI documents a 422 that never
    happens (validation errors are 400s in the OpenAI envelope), no error statuses, and
    JSON for the streaming and Prometheus routes."""
    schemas = schema.setdefault("components", {}).setdefault("schemas", {})
    schemas["ErrorResponse"] = ERROR_SCHEMA
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)
    ref = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}
    for path, ops in schema.get("paths", {}).items():
        for op in ops.values():
            responses = op.setdefault("responses", {})
            responses.pop("422", None)
            if path.startswith("/v1/"):
                for status, desc in ERROR_STATUSES.items():
                    responses.setdefault(status, {"description": desc, "content": ref})
            if path in STREAMING_PATHS and "200" in responses:
                responses["200"].setdefault("content", {})["text/event-stream"] = {"schema": SSE_EVENT_SCHEMA}
            if path == "/metrics":
                responses["200"]["content"] = {"text/plain": {"schema": {"type": "string"}}}
            if path == "/health":
                responses.setdefault(
                    "503", {"description": "the engine is not running", "content": {"application/json": {}}}
                )
    return schema


def max_model_len_for(model, requested: int | None) -> int:
    native = int(getattr(model.config, "max_position_embeddings", 4096) or 4096)
    # Default cap 8192: prefill is one uninterruptible pass, and a 32k prompt on a CPU
    # would hold the engine for minutes. --max-model-len raises it.
    return min(requested or min(native, 8192), native)


def build_app(
    loaded,
    directions: dict,
    settings: ServerSettings,
    model_settings: ModelSettings,
    base_id: str,
    engine: Engine | None = None,
) -> FastAPI:
    """Build the FastAPI app around a loaded model. The engine starts in the lifespan."""
    metrics = Metrics()
    mml = max_model_len_for(loaded.model, model_settings.max_model_len)
    if engine is None:
        engine = Engine(
            loaded.model,
            loaded.tokenizer,
            directions,
            EngineConfig(
                max_batch_size=settings.max_batch_size,
                max_queue=settings.max_queue,
                max_model_len=mml,
                num_threads=model_settings.num_threads,
            ),
            metrics=metrics,
        )
    metrics.bind_engine(engine)
    policy = SteeringPolicy(base_id, directions, settings.max_abs_strength, settings.max_directions_per_request)
    serving = OpenAIServing(engine, loaded.tokenizer, policy, settings, metrics, mml)
    bake_jobs = None
    try:
        from directions.bake_jobs import BakeJobs

        bake_jobs = BakeJobs(loaded, directions, settings.bake_dir)
    except ImportError:  # bake module not available
        pass
    st = AppState(
        engine=engine,
        serving=serving,
        policy=policy,
        settings=settings,
        model_settings=model_settings,
        metrics=metrics,
        directions=directions,
        loaded=loaded,
        bake_jobs=bake_jobs,
        api_keys=settings.all_api_keys(),
        started=time.time(),
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if not engine.alive:
            engine.start()
        log.info("serving %s with directions [%s]", base_id, ", ".join(directions) or "none")
        yield
        log.info("shutting down: finishing in-flight requests (up to %.0fs)", settings.shutdown_grace_s)
        engine.shutdown(timeout=settings.shutdown_grace_s)

    app = FastAPI(
        title="frankly",
        version=__version__,
        lifespan=lifespan,
        description="OpenAI-compatible server with per-request direction ablation.",
    )
    app.state.frankly = st
    _plain_openapi = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            app.openapi_schema = document_responses(_plain_openapi())
        return app.openapi_schema

    app.openapi = openapi
    install_error_handlers(app)
    for r in (openai_routes.router, models_routes.router, admin_routes.router, system_routes.router):
        app.include_router(r)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST", "OPTIONS"],
            allow_headers=["Authorization", "Content-Type"],
            expose_headers=["X-Steering", "X-Request-Id"],
        )
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)
    return app
