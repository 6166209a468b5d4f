"""``frankly calibrate``: rewrites only the condition of a direction file (tiny model directory)."""

from __future__ import annotations

import torch

from directions import extract, selection
from directions.fileformat import load_direction, save_direction
from server.cli import main
from tests.tiny_models import save_tiny_dir, tiny_extract_data, tiny_model, tiny_tokenizer


def _tiny_setup(tmp_path):
    """A tiny llama directory, its tokenizer, separable prompt sets, and a refusal direction file
    extracted from them without a condition (what calibrate adds one to)."""
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
    return model, model_dir, tok, data, save_direction(ds, tmp_path / "r.safetensors", config=model.config)


def test_cli_calibrate_rewrites_only_the_condition(tmp_path):
    model, model_dir, tok, data, src = _tiny_setup(tmp_path)
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

    # with a next-token term: every candidate is tried with and without it, the file stores the
    # term it chose, and the engine's score (probe + weight * log P(tokens)) reproduces the firing rate
    out2 = tmp_path / "calibrated-next.safetensors"
    args2 = [a if a != str(out) else str(out2) for a in args] + ["--next-token", "t5,t9", "--count-positives", "all"]
    assert main(args2) == 0
    back2 = load_direction(out2)
    det2 = back2.public_metadata()["selection"]["detection"]
    assert {c["logit_weight"] for c in det2["candidates"]} == {0.0, 0.5, 1.0, 2.0}
    assert det2["logit_tokens"] == [5, 9]
    if det2["chosen_logit_weight"]:
        assert back2.detect_logit_tokens == (5, 9) and back2.detect_logit_weight != 0
    else:
        assert back2.detect_logit_tokens == ()
    from directions.detection import condition_score
    from directions.forward import forward_last

    logits, states = forward_last(model, tok, extract.build_prompts(tok, data.neg_val), states=True)
    scores = [condition_score(back2, states[i, back2.detect_layer], logits[i]) for i in range(len(logits))]
    assert abs(sum(s > back2.detect_threshold for s in scores) / len(scores) - det2["val_fire_neg"]) < 1e-3


def test_cli_calibrate_takes_several_validation_negative_files(tmp_path):
    """--val-negative FILE FILE: the threshold is set on both files' prompts together (the plain harmless
    split plus the edgy one), and the record hashes each file."""
    model, model_dir, tok, data, src = _tiny_setup(tmp_path)
    files = {}
    for k in ("pos_train", "neg_train", "pos_val"):
        files[k] = tmp_path / f"{k}.txt"
        files[k].write_text("\n".join(getattr(data, k)) + "\n")
    # the second negative file holds the positives' own prompts: a threshold set on both files must keep
    # the firing rate on their union within --fpr, which the first file alone would not force
    (tmp_path / "neg_a.txt").write_text("\n".join(data.neg_val) + "\n")
    (tmp_path / "neg_b.txt").write_text("\n".join(data.pos_val[:6]) + "\n")
    out = tmp_path / "c.safetensors"
    args = ["calibrate", "--model", model_dir, "--direction", str(src), "--out", str(out), "--layers", "1-2"]
    args += ["--positive", str(files["pos_train"]), "--negative", str(files["neg_train"])]
    args += ["--val-positive", str(files["pos_val"]), "--fpr", "0.1", "--next-token", "none"]
    args += ["--count-positives", "all", "--val-negative", str(tmp_path / "neg_a.txt"), str(tmp_path / "neg_b.txt")]
    assert main(args) == 0
    back = load_direction(out)
    det = back.public_metadata()["selection"]["detection"]
    assert [h["file"] for h in det["prompt_hashes"]["val_negative"]] == ["neg_a.txt", "neg_b.txt"]
    assert det["prompt_hashes"]["val_positive"]["file"] == "pos_val.txt"
    negs = data.neg_val + data.pos_val[:6]
    states = extract.collect_states(model, tok, extract.build_prompts(tok, negs))
    fired = (states[:, back.detect_layer] @ back.detect_vector) > back.detect_threshold
    assert float(fired.float().mean()) <= 0.1
    assert abs(float(fired.float().mean()) - det["val_fire_neg"]) < 1e-3


def test_cli_calibrate_count_negatives_answered_sets_the_threshold_on_answered_prompts(tmp_path, monkeypatch):
    """--count-negatives answered: validation negatives the unedited model refuses are left out of the
    threshold (firing there removes an over-refusal), and the record says how many were left out. The
    judge is replaced by one that calls the second file's prompts refused (a tiny random model's replies
    are noise), so the threshold must only hold the firing rate on the first file within --fpr."""
    import directions.refusal

    model, model_dir, tok, data, src = _tiny_setup(tmp_path)
    for k in ("pos_train", "neg_train", "pos_val"):
        (tmp_path / f"{k}.txt").write_text("\n".join(getattr(data, k)) + "\n")
    (tmp_path / "neg_a.txt").write_text("\n".join(data.neg_val) + "\n")
    (tmp_path / "neg_b.txt").write_text("\n".join(data.pos_val[:6]) + "\n")
    verdicts = iter([False] * len(data.neg_val) + [True] * 6)
    monkeypatch.setattr(directions.refusal, "is_refusal", lambda text: next(verdicts))
    out = tmp_path / "c.safetensors"
    args = ["calibrate", "--model", model_dir, "--direction", str(src), "--out", str(out), "--layers", "1-2"]
    args += ["--positive", str(tmp_path / "pos_train.txt"), "--negative", str(tmp_path / "neg_train.txt")]
    args += ["--val-positive", str(tmp_path / "pos_val.txt"), "--fpr", "0.1", "--next-token", "none"]
    args += ["--count-positives", "all", "--count-negatives", "answered", "--label-tokens", "4"]
    args += ["--val-negative", str(tmp_path / "neg_a.txt"), str(tmp_path / "neg_b.txt")]
    assert main(args) == 0
    assert next(verdicts, None) is None  # every negative was judged, once
    back = load_direction(out)
    det = back.public_metadata()["selection"]["detection"]
    assert det["negatives_counted"] == "answered"
    assert det["val_negatives_refused_by_model"] == 6
    states = extract.collect_states(model, tok, extract.build_prompts(tok, data.neg_val))
    fired = (states[:, back.detect_layer] @ back.detect_vector) > back.detect_threshold
    assert float(fired.float().mean()) <= 0.1
    assert abs(float(fired.float().mean()) - det["val_fire_neg"]) < 1e-3
