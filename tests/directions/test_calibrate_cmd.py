"""``frankly calibrate``: rewrites only the condition of a direction file (tiny model directory)."""

from __future__ import annotations

import torch

from directions import extract, selection
from directions.fileformat import load_direction, save_direction
from server.cli import main
from tests.tiny_models import save_tiny_dir, tiny_extract_data, tiny_model, tiny_tokenizer


def test_cli_calibrate_rewrites_only_the_condition(tmp_path):
    model = tiny_model("llama")
    model_dir = save_tiny_dir(model, tmp_path / "model")
    tok = tiny_tokenizer()
    data = tiny_extract_data(n_train=16, n_val=12)
    ds = selection.select_and_build(
        model,
        tok,
        data,
        "refusal",
        selection.SelectConfig(layers=[1], batch_size=4, detect=False),
        [extract.Candidate("single", 1)],
    )
    src = save_direction(ds, tmp_path / "r.safetensors", config=model.config)
    assert not load_direction(src).has_condition
    files = {}
    for k in ("pos_train", "neg_train", "pos_val", "neg_val"):
        files[k] = tmp_path / f"{k}.txt"
        files[k].write_text("\n".join(getattr(data, k)) + "\n")
    out = tmp_path / "calibrated.safetensors"
    args = ["calibrate", "--model", model_dir, "--direction", str(src), "--out", str(out), "--layers", "1-2"]
    args += ["--positive", str(files["pos_train"]), "--negative", str(files["neg_train"])]
    args += ["--val-positive", str(files["pos_val"]), "--val-negative", str(files["neg_val"]), "--fpr", "0.1"]
    assert main(args) == 0
    back = load_direction(out)
    assert back.has_condition and back.detect_layer in (1, 2)
    torch.testing.assert_close(back.directions, load_direction(src).directions)
    det = back.public_metadata()["selection"]["detection"]
    assert det["calibrated_by"] == "frankly calibrate" and det["fpr_target"] == 0.1
    assert {c["kind"] for c in det["candidates"]} >= {"mean-diff", "lda/0.1"}
    states = extract.collect_states(model, tok, extract.build_prompts(tok, data.neg_val))
    fired = (states[:, back.detect_layer] @ back.detect_vector) > back.detect_threshold
    assert float(fired.float().mean()) <= 0.1
