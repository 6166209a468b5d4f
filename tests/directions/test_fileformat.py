"""Direction files: a round trip with the condition, the metadata written, clear errors for bad files."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from directions.fileformat import (
    CONVENTION,
    DirectionFileError,
    DirectionSet,
    base_name,
    edit_sets,
    firing_name,
    load_direction,
    model_fingerprint,
    save_direction,
)
from tests.tiny_models import random_direction_set, tiny_model


def test_round_trip_with_condition_and_metadata(tmp_path):
    model = tiny_model("qwen2")
    ds = random_direction_set(model, "r")
    ds.detect_vector, ds.detect_layer, ds.detect_threshold = torch.ones(64) * 3, 1, 0.25
    ds.metadata["eval"] = {"refusal": 0.1}
    path = save_direction(ds, tmp_path / "d" / "r.safetensors", config=model.config)
    back = load_direction(path, name="renamed")
    assert back.name == "renamed" and back.has_condition and back.detect_layer == 1 and back.detect_threshold == 0.25
    torch.testing.assert_close(back.directions, ds.directions)
    torch.testing.assert_close(back.detect_vector.norm(), torch.tensor(1.0))  # unit on load
    md = back.public_metadata()
    assert md["eval"] == {"refusal": 0.1} and md["convention"] == CONVENTION and md["conditional"] is True
    assert md["fingerprint"] == model_fingerprint(model.config)
    assert not list((tmp_path / "d").glob("*.tmp"))  # written atomically


def test_one_vector_for_every_layer_is_broadcast(tmp_path):
    p = tmp_path / "one.safetensors"
    save_file({"directions": torch.ones(8), "layer_weights": torch.ones(3)}, str(p))
    ds = load_direction(p)
    assert ds.directions.shape == (3, 8) and ds.name == "one"


@pytest.mark.parametrize(
    ("tensors", "why"),
    [
        ({"directions": torch.ones(3, 8)}, "lacks"),
        ({"directions": torch.ones(3, 8), "layer_weights": torch.ones(2)}, "do not agree"),
        ({"directions": torch.full((3, 8), float("nan")), "layer_weights": torch.ones(3)}, "non-finite"),
        ({"directions": torch.ones(3, 8), "layer_weights": -torch.ones(3)}, "negative"),
    ],
)
def test_bad_tensors_are_clear_errors(tmp_path, tensors, why):
    p = tmp_path / "bad.safetensors"
    save_file(tensors, str(p))
    with pytest.raises(DirectionFileError, match=why):
        load_direction(p)


def test_firing_case_edit_round_trip(tmp_path):
    """The optional firing-case edit (auto_* tensors) survives a round trip, is reported in the
    public metadata, and engines see it as NAME@auto; a file without one is unchanged."""
    model = tiny_model("qwen2")
    ds = random_direction_set(model, "r")
    n = ds.n_layers
    fire = DirectionSet("x", torch.randn(n, 64) * 3, torch.linspace(0, 2, n))
    fire.component_weights = torch.rand(3, n)
    ds.auto_edit = fire
    ds.metadata["auto_edit"] = json.dumps({"source": "cand.safetensors"})
    back = load_direction(save_direction(ds, tmp_path / "r.safetensors"))
    assert back.auto_edit is not None and back.auto_edit.name == "r@auto"
    torch.testing.assert_close(back.auto_edit.directions, torch.nn.functional.normalize(fire.directions, dim=-1))
    torch.testing.assert_close(back.auto_edit.writer_weights(), fire.writer_weights())
    assert back.public_metadata()["auto_edit"] == {"source": "cand.safetensors"}
    assert set(edit_sets({"r": back})) == {"r", "r@auto"} and firing_name("r", back) == "r@auto"
    assert base_name("r@auto") == "r" and base_name("r") == "r"
    ds.auto_edit = None  # dropping it drops its metadata too
    plain = load_direction(save_direction(ds, tmp_path / "p.safetensors"))
    assert (
        plain.auto_edit is None and "auto_edit" not in plain.metadata and plain.public_metadata()["auto_edit"] is None
    )
    assert set(edit_sets({"r": plain})) == {"r"} and firing_name("r", plain) == "r"


@pytest.mark.parametrize(
    ("extra", "why"),
    [
        ({"auto_directions": torch.ones(3, 8)}, "needs auto_directions and auto_layer_weights"),
        ({"auto_directions": torch.ones(2, 8), "auto_layer_weights": torch.ones(3)}, "do not match"),
        ({"auto_directions": torch.ones(3, 8), "auto_layer_weights": -torch.ones(3)}, "negative"),
        (
            {
                "auto_directions": torch.ones(3, 8),
                "auto_layer_weights": torch.ones(3),
                "auto_component_weights": torch.ones(2, 3),
            },
            "component_weights",
        ),
    ],
)
def test_bad_firing_case_edit_is_a_clear_error(tmp_path, extra, why):
    p = tmp_path / "bad.safetensors"
    save_file({"directions": torch.ones(3, 8), "layer_weights": torch.ones(3), **extra}, str(p))
    with pytest.raises(DirectionFileError, match=why):
        load_direction(p)


def test_missing_pickle_and_truncated_files(tmp_path):
    with pytest.raises(DirectionFileError, match="not found"):
        load_direction(tmp_path / "nope.safetensors")
    (tmp_path / "x.pt").write_bytes(b"\x80\x04")
    with pytest.raises(DirectionFileError, match="pickle"):
        load_direction(tmp_path / "x.pt")
    (tmp_path / "t.safetensors").write_bytes(json.dumps({"x": 1}).encode())
    with pytest.raises(DirectionFileError, match="corrupt"):
        load_direction(tmp_path / "t.safetensors")


def test_lookahead_condition_round_trip(tmp_path):
    """``auto_lookahead`` makes a file conditional without a probe; with a probe it takes over
    (``uses_probe`` is False) and the probe stays in the file."""
    d = DirectionSet("r", torch.nn.functional.normalize(torch.randn(3, 8), dim=-1), torch.ones(3))
    d.metadata["auto_lookahead"] = json.dumps({"tokens": 3, "judge": "refusal"})
    back = load_direction(save_direction(d, tmp_path / "r.safetensors"))
    assert back.lookahead == (3, "refusal") and back.has_condition and not back.has_probe and not back.uses_probe
    md = back.public_metadata()
    assert md["conditional"] is True and md["condition"] == "lookahead"
    assert md["auto_lookahead"] == {"tokens": 3, "judge": "refusal"} and "detect_layer" not in md
    back.detect_vector, back.detect_layer, back.detect_threshold = torch.ones(8), 1, 0.5
    both = load_direction(save_direction(back, tmp_path / "b.safetensors"))
    assert both.has_probe and both.lookahead == (3, "refusal") and not both.uses_probe
    both.metadata.pop("auto_lookahead")
    probe = load_direction(save_direction(both, tmp_path / "p.safetensors"))
    assert probe.uses_probe and probe.lookahead is None and probe.public_metadata()["condition"] == "probe"


@pytest.mark.parametrize(
    "spec,why",
    [
        ('{"tokens": 0}', "tokens must be"),
        ('{"tokens": 99}', "tokens must be"),
        ('{"tokens": "3"}', "tokens must be"),
        ('{"tokens": 3, "judge": "vibes"}', "unknown judge"),
        ('{"judge": "refusal"}', "expected"),
        ("[3]", "expected"),
        ("three", "auto_lookahead"),
    ],
)
def test_bad_lookahead_is_a_clear_error(tmp_path, spec, why):
    p = tmp_path / "bad.safetensors"
    save_file(
        {"directions": torch.ones(3, 8), "layer_weights": torch.ones(3)}, str(p), metadata={"auto_lookahead": spec}
    )
    with pytest.raises(DirectionFileError, match=why):
        load_direction(p)
