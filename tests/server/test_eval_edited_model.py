"""``frankly eval --edited-model``: another model's weights measured beside the directions,
through the real engine on tiny model directories (itself: KL 0; a changed copy: KL > 0)."""

from __future__ import annotations

import json

import torch

from directions.fileformat import save_direction
from server.cli import main
from tests.tiny_models import random_direction_set, save_tiny_dir, tiny_model


def _run(tmp_path, *extra, direction: bool = True) -> tuple[int, dict | None]:
    model = tiny_model("llama")
    model_dir = save_tiny_dir(model, tmp_path / "model")
    path = save_direction(random_direction_set(model, "refusal"), tmp_path / "r.safetensors", config=model.config)
    out = tmp_path / "eval"
    argv = ["eval", "--model", model_dir, "--strengths", "1", "--limit", "3"]
    argv += ["--direction", f"refusal={path}"] if direction else []
    argv += ["--max-tokens", "3", "--long-tokens", "4", "--n-long", "2", "--capability-tokens", "2", "--all-metrics"]
    argv += ["--split", "test", "--out-dir", str(out), *extra]
    rc = main(argv)
    res = json.loads((out / "eval.json").read_text()) if rc == 0 else None
    return rc, res


def test_eval_edited_model_itself_zero_kl_changed_copy_positive(tmp_path):
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[1].self_attn.o_proj.weight.mul_(0.5)
    changed = save_tiny_dir(model, tmp_path / "changed")
    same = str(tmp_path / "model")  # written by _run before the edited models load
    rc, res = _run(tmp_path, "--edited-model", f"same={same}", "--edited-model", f"changed={changed}")
    assert rc == 0
    rows = {r["direction"]: r for r in res["rows"] if r["when"] == "weights"}
    plain = next(r for r in res["rows"] if r["when"] == "always" and r["strength"] == 0.0)
    assert rows["same"]["first_token_kl"] == 0.0 and rows["same"]["long_kl"] == 0.0
    # the same weights through the same engine: the same greedy answers, so the same judgements
    for k in ("refusals", "capability", "slop_score"):
        assert rows["same"][k] == plain[k]
    assert rows["changed"]["first_token_kl"] > 0 and rows["changed"]["long_kl"] > 0
    assert res["edited_models"] == {"same": same, "changed": changed}


def test_eval_edited_model_bad_specs_exit_2(tmp_path, capsys):
    assert _run(tmp_path, "--edited-model", "nopath")[0] == 2
    assert "NAME=PATH" in capsys.readouterr().err
    assert _run(tmp_path, "--edited-model", f"x={tmp_path / 'missing'}")[0] == 2
    assert "not found" in capsys.readouterr().err
    other_vocab = tiny_model("llama")
    other_vocab.resize_token_embeddings(100)
    d = save_tiny_dir(other_vocab, tmp_path / "v100")
    assert _run(tmp_path, "--edited-model", f"v={d}")[0] == 2
    assert "vocabulary differs" in capsys.readouterr().err


def test_eval_edited_model_without_a_direction_measures_only_its_row(tmp_path, capsys):
    same = str(tmp_path / "model")
    rc, res = _run(tmp_path, "--edited-model", f"same={same}", direction=False)
    assert rc == 0
    assert [(r["direction"], r["when"]) for r in res["rows"]] == [("same", "weights")]
    row = res["rows"][0]
    assert row["first_token_kl"] == 0.0 and row["long_kl"] == 0.0 and row["n_harmful"] == 3
    assert _run(tmp_path, direction=False)[0] == 2
    assert "--direction NAME=PATH and/or --edited-model" in capsys.readouterr().err
