"""``frankly eval`` end to end on a tiny model directory (always and auto rows, JSON, PNG)."""

from __future__ import annotations

import pytest

from directions import extract, selection
from directions.fileformat import save_direction
from server.cli import main
from tests.tiny_models import save_tiny_dir, tiny_extract_data, tiny_model, tiny_tokenizer


def test_cli_eval_on_a_tiny_model_directory(tmp_path):
    """``frankly eval`` end to end (always + auto rows, JSON, PNG) with tiny limits, on the test split."""
    import json

    model = tiny_model("llama")
    model_dir = save_tiny_dir(model, tmp_path / "model")
    tok = tiny_tokenizer()
    ds = selection.select_and_build(
        model,
        tok,
        tiny_extract_data(),
        "refusal",
        selection.SelectConfig(layers=[1], batch_size=4),
        [extract.Candidate("single", 1)],
    )
    ds.detect_threshold = -1e9  # always fires: every auto row must equal the always row
    path = save_direction(ds, tmp_path / "r.safetensors", config=model.config)
    out = tmp_path / "eval"
    rc = main(
        [
            "eval",
            "--model",
            model_dir,
            "--direction",
            f"refusal={path}",
            "--strengths",
            "0.5,1",
            "--conditional",
            "--limit",
            "3",
            "--max-tokens",
            "3",
            "--long-tokens",
            "5",
            "--n-long",
            "2",
            "--capability-tokens",
            "2",
            "--all-metrics",
            "--split",
            "test",
            "--out-dir",
            str(out),
        ]
    )
    assert rc == 0
    res = json.loads((out / "eval.json").read_text())
    assert (out / "eval.png").stat().st_size > 1000
    assert res["split"] == "test" and res["sets"]["harmful"] == 3  # the held-out test split, cut by --limit
    rows = {(r["when"], r["strength"]): r for r in res["rows"]}
    assert set(rows) == {(w, s) for w in ("always", "auto") for s in (0.0, 0.5, 1.0)}
    assert rows[("always", 0.0)]["first_token_kl"] == 0.0 and rows[("always", 0.0)]["long_kl"] == 0.0
    assert rows[("always", 1.0)]["first_token_kl"] > 0
    for s in (0.5, 1.0):
        a, b = rows[("always", s)], rows[("auto", s)]
        assert b["fired"]["harmless"] == 1.0 and b["condition_mismatches"] == 0
        assert b["first_token_kl"] == pytest.approx(a["first_token_kl"], rel=1e-5)
        assert b["refusal_rate"] == a["refusal_rate"] and b["capability"] == a["capability"]
    for k in ("refusal_rate", "slop_score", "capability", "long_kl"):
        assert k in rows[("always", 1.0)]
