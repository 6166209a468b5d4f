"""Engine errors to HTTP answers in one place, and validation locations to ``error.param``."""

from __future__ import annotations

import pytest

from server.engine.errors import EngineOverloaded, EngineStopped, GenerationFailed, RequestTimedOut
from server.errors import (
    EngineFailure,
    Overloaded,
    RequestTimeout,
    Unavailable,
    _loc_to_param,
    failure,
    refusal,
)


def test_refusals_at_submit_carry_retry_after():
    e = refusal(EngineOverloaded(retry_after=3.0))
    assert isinstance(e, Overloaded) and e.status == 429 and e.headers == {"Retry-After": "3"}
    assert refusal(EngineOverloaded(retry_after=0.2)).headers == {"Retry-After": "1"}
    e = refusal(EngineStopped("bye"))
    assert isinstance(e, Unavailable) and e.status == 503 and e.headers == {"Retry-After": "5"}


@pytest.mark.parametrize(
    ("error", "reason", "cls", "status"),
    [
        (RequestTimedOut("request timed out"), "error", RequestTimeout, 408),
        (EngineStopped("server shutting down"), "cancelled", Unavailable, 503),
        (None, "cancelled", Unavailable, 503),
        (GenerationFailed("generation failed: X"), "error", EngineFailure, 500),
        (None, "error", EngineFailure, 500),
    ],
)
def test_failures_of_a_started_request(error, reason, cls, status):
    e = failure(error, reason)
    assert isinstance(e, cls) and e.status == status
    if error is not None:
        assert e.message == str(error)


def test_engine_error_codes_for_stream_error_chunks():
    assert RequestTimedOut.code == "timeout" and EngineStopped.code == "shutdown"
    assert GenerationFailed.code == "engine_error" and EngineOverloaded.code == "server_overloaded"


@pytest.mark.parametrize(
    ("loc", "param"),
    [
        (("body", "messages", 0, "content"), "messages[0].content"),
        (("body", "stop", "list[str]", 0), "stop[0]"),
        (("body", "logit_bias", "42"), "logit_bias[42]"),
        (("body",), None),
    ],
)
def test_validation_locations_become_params(loc, param):
    assert _loc_to_param(loc) == param
