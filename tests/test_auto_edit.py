"""scripts/auto_edit.py: attach a candidate's edit as a file's firing-case edit, remove it, refuse bad input."""

from __future__ import annotations

import json

import torch

from directions.fileformat import DirectionSet, load_direction, save_direction
from tests.scripts_loader import load_script
from tests.tiny_models import random_direction_set, tiny_model


def _files(tmp_path):
    model = tiny_model("qwen2")
    target = random_direction_set(model, "refusal", seed=1)
    target.detect_vector, target.detect_layer, target.detect_threshold = torch.ones(64), 1, 0.5
    cand = random_direction_set(model, "cand", seed=2)
    cand.component_weights = torch.rand(3, cand.n_layers)
    cand.metadata["eval"] = json.dumps({"refusal": 0.0, "first_token_kl": 0.08})
    t = save_direction(target, tmp_path / "refusal.safetensors", config=model.config)
    c = save_direction(cand, tmp_path / "cand.safetensors", config=model.config)
    return model, t, c, cand


def test_attach_and_remove(tmp_path, capsys):
    mod = load_script("auto_edit")
    _, t, c, cand = _files(tmp_path)
    before = load_direction(t)
    assert mod.main(["--direction", str(t), "--from", str(c), "--note", "val 0/65"]) == 0
    after = load_direction(t)
    assert after.name == "refusal" and after.auto_edit is not None
    torch.testing.assert_close(after.auto_edit.directions, cand.directions)
    torch.testing.assert_close(after.auto_edit.writer_weights(), cand.writer_weights())
    # the file's own edit and its condition are untouched
    torch.testing.assert_close(after.directions, before.directions)
    torch.testing.assert_close(after.writer_weights(), before.writer_weights())
    assert after.detect_threshold == before.detect_threshold and after.detect_layer == before.detect_layer
    info = after.public_metadata()["auto_edit"]
    assert info["source"] == "cand.safetensors" and info["note"] == "val 0/65" and len(info["source_sha256"]) == 64
    assert info["source_eval"] == {"refusal": 0.0, "first_token_kl": 0.08} and "source_fit" not in info
    # a fit candidate: its own "fit" record, not the eval it inherited from its source
    fit = load_direction(c)
    fit.metadata["fit"] = json.dumps({"lambda": "1.0"})
    save_direction(fit, c)
    assert mod.main(["--direction", str(t), "--from", str(c)]) == 0
    info = load_direction(t).public_metadata()["auto_edit"]
    assert info["source_fit"] == {"lambda": "1.0"} and "source_eval" not in info
    assert mod.main(["--direction", str(t), "--remove"]) == 0
    assert load_direction(t).auto_edit is None
    assert "removed" in capsys.readouterr().out


def test_bad_input_is_a_clear_error(tmp_path, capsys):
    mod = load_script("auto_edit")
    model, t, c, _ = _files(tmp_path)
    plain = random_direction_set(model, "plain", seed=3)  # no condition
    p = save_direction(plain, tmp_path / "plain.safetensors", config=model.config)
    assert mod.main(["--direction", str(p), "--from", str(c)]) == 2
    assert "no condition" in capsys.readouterr().err
    other = DirectionSet("other", torch.nn.functional.normalize(torch.randn(2, 64), dim=-1), torch.ones(2))
    o = save_direction(other, tmp_path / "other.safetensors")
    assert mod.main(["--direction", str(t), "--from", str(o)]) == 2
    assert "shape" in capsys.readouterr().err
    assert mod.main(["--direction", str(t), "--from", str(tmp_path / "missing.safetensors")]) == 2
    assert "not found" in capsys.readouterr().err
    assert load_direction(t).auto_edit is None  # nothing written on failure


def test_lookahead_and_probe(tmp_path, capsys):
    """--lookahead K sets the output-based condition (with or without --from), --probe goes back to
    the prefill probe; a bad K or a file without a probe is a clear error and writes nothing."""
    mod = load_script("auto_edit")
    model, t, c, cand = _files(tmp_path)
    assert mod.main(["--direction", str(t), "--lookahead", "3"]) == 0
    d = load_direction(t)
    assert d.lookahead == (3, "refusal") and d.auto_edit is None and d.has_probe
    assert mod.main(["--direction", str(t), "--from", str(c), "--lookahead", "4"]) == 0
    d = load_direction(t)
    assert d.lookahead == (4, "refusal") and d.auto_edit is not None
    torch.testing.assert_close(d.auto_edit.directions, cand.directions)
    assert mod.main(["--direction", str(t), "--lookahead", "0"]) == 2
    assert "tokens must be" in capsys.readouterr().err
    assert mod.main(["--direction", str(t), "--probe"]) == 0
    d = load_direction(t)
    assert d.lookahead is None and d.uses_probe and d.auto_edit is not None
    plain = random_direction_set(model, "plain", seed=3)
    p = save_direction(plain, tmp_path / "plain.safetensors", config=model.config)
    assert mod.main(["--direction", str(p), "--probe"]) == 2
    assert "no prefill probe" in capsys.readouterr().err
    # a file with only a lookahead condition can take a firing-case edit
    assert mod.main(["--direction", str(p), "--lookahead", "2", "--from", str(c)]) == 0
    assert load_direction(p).auto_edit is not None
