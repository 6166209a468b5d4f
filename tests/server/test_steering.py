"""Per-request steering: model-id suffixes, the body field, limits, the header, engine capabilities."""

from __future__ import annotations

import pytest
import torch

from directions.fileformat import DirectionSet
from server.errors import InvalidRequest, ModelNotFound
from server.steering import SteeringPolicy, steering_header


def _ds(cond=False):
    ds = DirectionSet("x", torch.nn.functional.normalize(torch.randn(2, 4), dim=-1), torch.ones(2))
    if cond:
        ds.detect_vector, ds.detect_layer, ds.detect_threshold = torch.tensor([1.0, 0, 0, 0]), 1, 0.5
    return ds


@pytest.fixture
def policy():
    return SteeringPolicy("base", {"refusal": _ds(cond=True), "slop": _ds()}, max_abs_strength=4.0, max_directions=2)


def test_model_suffixes(policy):
    assert policy.parse_model("base") == {}
    r = policy.parse_model("base+refusal+slop:0.5")
    assert r["refusal"].strength == 1.0 and r["slop"].strength == 0.5
    assert policy.parse_model("base+refusal:0.8@auto")["refusal"].when == "auto"
    with pytest.raises(ModelNotFound):
        policy.parse_model("other+refusal")
    with pytest.raises(ModelNotFound):
        policy.parse_model("base+nope")
    with pytest.raises(InvalidRequest) as e:
        policy.parse_model("base+refusal:abc")
    assert e.value.param == "model"


def test_auto_without_a_strength_takes_the_calibrated_auto_strength(policy):
    assert policy.parse_model("base+refusal@auto")["refusal"].strength == 1.0  # none stored: 1
    policy.directions["refusal"].metadata["auto_strength"] = "1.5"
    assert policy.parse_model("base+refusal@auto")["refusal"].strength == 1.5
    assert policy.parse_model("base+refusal:0.8@auto")["refusal"].strength == 0.8  # explicit wins
    assert policy.parse_model("base+refusal")["refusal"].strength == 1.0  # always: 1
    assert policy.parse_body({"refusal": {"when": "auto"}})["refusal"].strength == 1.5
    assert policy.parse_body({"refusal": {"when": "auto", "strength": 0.5}})["refusal"].strength == 0.5
    assert policy.parse_body({"refusal": {"when": "always"}})["refusal"].strength == 1.0
    policy.directions["refusal"].metadata["auto_strength"] = "9"  # above the server's limit: clamped
    assert policy.parse_model("base+refusal@auto")["refusal"].strength == 4.0
    policy.directions["refusal"].metadata["auto_strength"] = "nan"  # unreadable: 1
    assert policy.parse_model("base+refusal@auto")["refusal"].strength == 1.0


def test_body_wins_per_direction(policy):
    r = policy.resolve("base+refusal+slop:0.5", {"refusal": 0.25})
    assert r["refusal"].strength == 0.25 and r["slop"].strength == 0.5
    r = policy.resolve("base", '{"slop": {"strength": -0.5}}')
    assert r["slop"].strength == -0.5
    assert steering_header(r) == "slop=-0.5"
    assert steering_header({}) == "none"


@pytest.mark.parametrize(
    "value,param",
    [
        ({"nope": 1}, "steering.nope"),
        ({"refusal": float("nan")}, "steering.refusal"),
        ({"refusal": float("inf")}, "steering.refusal"),
        ({"refusal": 10}, "steering.refusal"),
        ({"refusal": "1"}, "steering.refusal"),
        ({"refusal": True}, "steering.refusal"),
        ({"slop": {"strength": 1, "when": "auto"}}, "steering.slop"),  # no condition calibrated
        ({"refusal": {"strength": 1, "when": "sometimes"}}, "steering.refusal"),
        ("not json", "steering"),
        ([1, 2], "steering"),
    ],
)
def test_bad_steering(policy, value, param):
    with pytest.raises(InvalidRequest) as e:
        policy.parse_body(value)
    assert e.value.param == param


def test_too_many_directions():
    p = SteeringPolicy("b", {"a": _ds(), "c": _ds()}, 4.0, max_directions=1)
    with pytest.raises(InvalidRequest):
        p.resolve("b+a", {"c": 1})
