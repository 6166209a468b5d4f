"""/openapi.json as the server answers: the OpenAI error envelope, no 422s, SSE and text routes."""

from __future__ import annotations

from fastapi import FastAPI

from server.errors import ERROR_SCHEMA, ERROR_STATUSES

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


def install(app: FastAPI) -> None:
    """Serve :func:`document_responses` of the generated schema (built once, on first request)."""
    plain = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            app.openapi_schema = document_responses(plain())
        return app.openapi_schema

    app.openapi = openapi
