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
    # the plot's panels name the split the figures come from
    from directions.plots import panels_of

    titles = dict(panels_of(res))
    assert titles["refusal_rate"] == "refusal rate (harmful test)"
    assert titles["first_token_kl"] == "first-token KL (harmless test)"
    assert dict(panels_of({"rows": res["rows"]}))["refusal_rate"] == "refusal rate (harmful val)"


@pytest.mark.parametrize("condition", ["probe", "lookahead"])
def test_cli_eval_auto_rows_use_the_firing_case_edit(tmp_path, monkeypatch, condition):
    """A file with a firing-case edit and a condition that always fires (a probe below every score,
    or a lookahead whose judge flags everything): its auto rows measure that edit (KLs, refusals,
    capability), i.e. equal the always rows of a file whose own edit it is."""
    import json

    from directions.detection import LOOKAHEAD_JUDGES
    from tests.tiny_models import random_direction_set

    model = tiny_model("llama")
    model_dir = save_tiny_dir(model, tmp_path / "model")
    ds = random_direction_set(model, "refusal", seed=1)
    fire = random_direction_set(model, "fire", seed=2)
    ds.auto_edit = random_direction_set(model, "refusal@auto", seed=2)
    if condition == "probe":
        ds.detect_vector, ds.detect_layer, ds.detect_threshold = fire.directions[0].clone(), 1, -1e9
    else:
        monkeypatch.setitem(LOOKAHEAD_JUDGES, "all", lambda text: True)
        ds.metadata["auto_lookahead"] = json.dumps({"tokens": 2, "judge": "all"})
    p = save_direction(ds, tmp_path / "r.safetensors", config=model.config)
    f = save_direction(fire, tmp_path / "f.safetensors", config=model.config)
    out = tmp_path / "eval"
    args = ["eval", "--model", model_dir, "--direction", f"refusal={p}", "--direction", f"fire={f}"]
    args += ["--strengths", "1", "--conditional", "--limit", "3", "--max-tokens", "3", "--long-tokens", "5"]
    args += ["--n-long", "2", "--capability-tokens", "2", "--out-dir", str(out)]
    assert main(args) == 0
    rows = {(r["direction"], r["when"], r["strength"]): r for r in json.loads((out / "eval.json").read_text())["rows"]}
    auto, other, own = rows[("refusal", "auto", 1.0)], rows[("fire", "always", 1.0)], rows[("refusal", "always", 1.0)]
    assert auto["fired"]["harmless"] == 1.0 and auto["condition_mismatches"] == 0
    for k in ("first_token_kl", "long_kl"):
        assert auto[k] == pytest.approx(other[k], rel=1e-5)
        assert abs(own[k] - other[k]) > 1e-3 * other[k]  # the file's own edit measures otherwise
    assert auto["refusals"] == other["refusals"] and auto["capability"] == other["capability"]
