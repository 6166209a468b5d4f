"""What ``frankly serve`` loads: shipped demo directions unless turned off, --direction over them, the served id."""

from __future__ import annotations

import pytest

from directions.demo import SHIPPED_DEMO, shipped_dir
from directions.fileformat import DirectionFileError
from server.settings import ModelSettings
from server.startup import direction_paths, served_id


def test_direction_paths():
    shipped = {n: str(shipped_dir() / f) for n, f in SHIPPED_DEMO.items() if (shipped_dir() / f).is_file()}
    assert direction_paths(ModelSettings(model="demo")) == shipped
    assert direction_paths(ModelSettings(model="demo", no_default_directions=True)) == {}
    got = direction_paths(ModelSettings(model="demo", directions=["refusal=/x/r.safetensors", "mine=m.safetensors"]))
    assert got["refusal"] == "/x/r.safetensors" and got["mine"] == "m.safetensors"
    assert direction_paths(ModelSettings(model="/some/dir", directions=["a=a.safetensors"])) == {"a": "a.safetensors"}
    with pytest.raises(DirectionFileError):
        direction_paths(ModelSettings(model="x", directions=["nameonly"]))


@pytest.mark.parametrize(
    ("ms", "expected"),
    [
        (ModelSettings(model="demo"), "qwen-demo"),
        (ModelSettings(model="demo", served_model_name="mine"), "mine"),
        (ModelSettings(model="/models/Qwen2.5-0.5B/"), "Qwen2.5-0.5B"),
        (ModelSettings(model="/models/smol.gguf"), "smol"),
        (ModelSettings(model="org/name"), "name"),
    ],
)
def test_served_id(ms, expected):
    assert served_id(ms) == expected
