"""NAME=PATH specs, loading named direction files, and checking them against a model."""

from __future__ import annotations

import json

import pytest
import torch

from directions.fileformat import DirectionFileError, FingerprintMismatch, save_direction
from directions.specs import check_fit, load_directions, parse_direction_specs
from tests.tiny_models import random_direction_set, tiny_model


def test_parse_direction_specs_keeps_order_and_checks_names():
    assert parse_direction_specs(["refusal=a.safetensors", "slop-2=b=c.safetensors"]) == {
        "refusal": "a.safetensors",
        "slop-2": "b=c.safetensors",
    }
    for bad in ("no-equals", "=x.safetensors", "bad name=x.safetensors", "x="):
        with pytest.raises(DirectionFileError):
            parse_direction_specs([bad])


def test_load_and_check_fit(tmp_path, caplog):
    model = tiny_model("llama")
    path = save_direction(random_direction_set(model, "r"), tmp_path / "r.safetensors", config=model.config)
    dirs = load_directions({"refusal": path})
    assert list(dirs) == ["refusal"] and dirs["refusal"].name == "refusal"
    check_fit(dirs, model.config)
    # the same shapes but another config: a fingerprint mismatch, allowed only when asked
    other = tiny_model("llama").config
    other.rope_theta = 1234.0
    with pytest.raises(FingerprintMismatch, match=str(path)):
        check_fit(dirs, other, {"refusal": path})
    check_fit(dirs, other, allow_mismatch=True)
    assert "loaded anyway" in caplog.text
    # a wrong shape is never allowed
    dirs["refusal"].directions = torch.zeros(1, 4)
    with pytest.raises(DirectionFileError, match="shape") as e:
        check_fit(dirs, model.config, allow_mismatch=True)
    assert not isinstance(e.value, FingerprintMismatch)
    assert json.loads(dirs["refusal"].metadata["fingerprint"])["num_layers"]
