"""Typed API errors carrying the offending parameter, mapped to the OpenAI envelope in one place."""

from __future__ import annotations

import json
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from server.engine.errors import EngineError, EngineOverloaded, EngineStopped, RequestTimedOut

log = logging.getLogger("frankly.api")


class APIError(Exception):
    status = 400
    type = "invalid_request_error"
    code: str | None = None

    def __init__(self, message: str, param: str | None = None, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class InvalidRequest(APIError):
    pass


class NotFound(APIError):
    status = 404
    code = "not_found"


class ModelNotFound(NotFound):
    code = "model_not_found"


class AuthError(APIError):
    status = 401
    type = "authentication_error"
    code = "invalid_api_key"


class PermissionDenied(APIError):
    status = 403
    type = "permission_error"
    code = "forbidden"


class PayloadTooLarge(APIError):
    status = 413
    code = "payload_too_large"


class Overloaded(APIError):
    status = 429
    type = "rate_limit_error"
    code = "server_overloaded"


class Unavailable(APIError):
    status = 503
    type = "server_error"
    code = "unavailable"


# The envelope as JSON Schema, and the statuses the /v1 routes answer with it (for /openapi.json).
ERROR_SCHEMA = {
    "title": "ErrorResponse",
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type", "param", "code"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"anyOf": [{"type": "string"}, {"type": "null"}]},
                "code": {"anyOf": [{"type": "string"}, {"type": "null"}]},
            },
        }
    },
}
ERROR_STATUSES = {
    "400": "invalid request; error.param names the offending parameter",
    "401": "missing or invalid API key",
    "403": "the key may not use this route, or admin routes are disabled",
    "404": "unknown model, direction or resource",
    "408": "the request ran past the server's request timeout",
    "413": "request body too large",
    "429": "the waiting queue is full; retry after Retry-After seconds",
    "500": "internal error",
    "503": "the server is shutting down or its engine is unavailable",
}


class RequestTimeout(APIError):
    status = 408
    type = "timeout_error"
    code = "timeout"


class ClientDisconnected(APIError):
    """The client hung up before the answer was ready; nobody reads this (nginx's 499)."""

    status = 499
    code = "client_closed_request"


class EngineFailure(APIError):
    status = 500
    type = "server_error"
    code = "engine_error"


def refusal(exc: EngineError) -> APIError:
    """The answer to an engine refusing a request at submission (it never ran)."""
    if isinstance(exc, EngineOverloaded):
        return Overloaded(
            "the server is at capacity; retry later", headers={"Retry-After": str(int(exc.retry_after) or 1)}
        )
    if isinstance(exc, EngineStopped):
        return Unavailable("the server is shutting down", headers={"Retry-After": "5"})
    return EngineFailure(str(exc))


def failure(error: EngineError | None, finish_reason: str | None) -> APIError:
    """The answer to a request the engine ended without a complete answer (non-streamed)."""
    if isinstance(error, RequestTimedOut):
        return RequestTimeout(str(error))
    if isinstance(error, EngineStopped) or (error is None and finish_reason == "cancelled"):
        return Unavailable(str(error) if error else "request cancelled")
    return EngineFailure(str(error) if error else "generation failed")


def error_response(err: APIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


def _loc_to_param(loc) -> str | None:
    parts = [str(p) for p in loc if p not in ("body",)]
    # drop pydantic's union-branch labels such as 'str' or 'list[str]'
    parts = [
        p
        for p in parts
        if not any(c in p for c in "[]") and p not in ("str", "int", "float", "list", "dict", "function-after")
    ]
    if not parts:
        return None
    out = parts[0]
    for p in parts[1:]:
        out += f"[{p}]" if p.isdigit() else f".{p}"
    return out


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        errs = exc.errors()
        first = errs[0] if errs else {}
        if first.get("type") == "json_invalid":
            return error_response(
                InvalidRequest(f"request body is not valid JSON: {first.get('msg', '')}", code="invalid_json")
            )
        param = _loc_to_param(first.get("loc", ()))
        msg = first.get("msg", "invalid request")
        if first.get("type") == "missing":
            msg = f"missing required parameter '{param}'" if param else "request body is required (a JSON object)"
        elif param:
            msg = f"invalid value for '{param}': {msg}"
        return error_response(InvalidRequest(msg, param=param, code="invalid_value"))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        err = APIError(str(exc.detail))
        err.status = exc.status_code
        err.type = "invalid_request_error" if exc.status_code < 500 else "server_error"
        # FastAPI raises a bare 400 when the body cannot be decoded at all (e.g. not UTF-8)
        err.code = {400: "invalid_body", 404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        err.headers = dict(exc.headers or {})  # keeps 405's Allow header
        return error_response(err)

    @app.exception_handler(json.JSONDecodeError)
    async def _json(request: Request, exc: json.JSONDecodeError):
        return error_response(InvalidRequest(f"request body is not valid JSON: {exc.msg}", code="invalid_json"))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        err = APIError("internal server error")
        err.status, err.type, err.code = 500, "server_error", "internal_error"
        return error_response(err)
