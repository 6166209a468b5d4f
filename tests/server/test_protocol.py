"""Request validation as the OpenAI API validates: strict types and cross-field rules, each a 400
naming the parameter, through the app with a fake engine (no model runs)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from server.protocol import ChatCompletionRequest, ChatMessage, CompletionRequest
from tests.validation_cases import ACCEPTED, REFUSED


@pytest.mark.parametrize(("case", "path", "body", "param"), REFUSED, ids=[c[0] for c in REFUSED])
def test_refused_with_the_parameter_named(make_client, case, path, body, param):
    client, engine = make_client()
    r = client.post(path, json=body)
    assert r.status_code == 400, (case, r.text)
    err = r.json()["error"]
    assert err["param"] == param, (case, err)
    assert err["type"] == "invalid_request_error" and param.split("[")[0].split(".")[0] in err["message"]
    assert not engine.requests


@pytest.mark.parametrize(("case", "path", "body"), ACCEPTED, ids=[c[0] for c in ACCEPTED])
def test_valid_requests_are_accepted(make_client, case, path, body):
    client, engine = make_client()
    r = client.post(path, json=body)
    assert r.status_code == 200, (case, r.text)
    assert len(engine.requests) == 1


def test_numbers_take_integers_and_unknown_fields_are_kept_aside():
    req = ChatCompletionRequest.model_validate(
        {"model": "m", "messages": [{"role": "user", "content": "x"}], "temperature": 0, "top_p": 1, "foo": 1}
    )
    assert req.temperature == 0.0 and isinstance(req.temperature, float) and req.unknown_fields() == ["foo"]
    assert CompletionRequest.model_validate({"model": "m", "prompt": [1, 2]}).prompt == [1, 2]


def test_a_role_outside_the_supported_ones_is_refused_on_role():
    with pytest.raises(ValidationError) as e:
        ChatMessage.model_validate({"role": "tool", "content": "x"})
    assert e.value.errors()[0]["loc"] == ("role",)
