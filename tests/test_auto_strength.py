"""scripts/auto_strength.py and scripts/condition_report.py on a tiny random model: the refusal
labels come from a judge the test controls (a random model's replies are noise), so the counts
they print can be checked exactly."""

from __future__ import annotations

import json

import pytest

from directions import extract
from directions.detection import LOOKAHEAD_JUDGES
from tests.scripts_loader import load_script
from tests.tiny_models import tiny_refusal_direction, tiny_tokenizer


def test_auto_strength_counts_and_kl(tmp_path, monkeypatch, capsys):
    mod = load_script("auto_strength")
    _, model_dir, data, ds, src = tiny_refusal_direction(tmp_path)
    assert ds.has_condition
    (tmp_path / "harmful.txt").write_text("\n".join(data.pos_val) + "\n")
    (tmp_path / "harmless.txt").write_text("\n".join(data.neg_val) + "\n")
    # the plain model "refuses" the first 5 harmful prompts; every steered reply is an answer
    verdicts = iter([True] * 5 + [False] * (len(data.pos_val) - 5))
    monkeypatch.setattr(mod, "is_refusal", lambda text: next(verdicts, False))
    out = tmp_path / "a.json"
    args = ["--model", model_dir, "--direction", str(src), "--strengths", "0.5,2", "--label-tokens", "3"]
    args += ["--max-tokens", "3", "--batch-size", "4", "--out", str(out)]
    args += ["--harmful", str(tmp_path / "harmful.txt"), "--harmless", str(tmp_path / "harmless.txt")]
    assert mod.main(args) == 0
    res = json.loads(out.read_text())
    assert (res["n_harmful"], res["plain_refused"], res["n_harmless"]) == (len(data.pos_val), 5, len(data.neg_val))
    assert [r["strength"] for r in res["rows"]] == [0.5, 2.0]
    for r in res["rows"]:
        assert r["fired"] + r["missed_by_condition"] == 5
        assert r["refusals_left"] == r["fired_but_refused"] == 0
    kls = [r["harmless_first_token_kl_always"] for r in res["rows"]]
    assert 0 < kls[0] < kls[1]  # the always-on edit moves harmless logits, more at a higher strength
    assert "plain model refuses 5 of" in capsys.readouterr().out


def test_auto_strength_rejects_a_file_without_a_condition(tmp_path, capsys):
    mod = load_script("auto_strength")
    *_, src = tiny_refusal_direction(tmp_path, detect=False)
    assert mod.main(["--model", "unused", "--direction", str(src)]) == 2
    assert "no condition" in capsys.readouterr().err


def test_condition_report_counts_fires_against_the_judge(tmp_path, monkeypatch, capsys):
    from directions.detection import condition_score
    from directions.forward import forward_last

    mod = load_script("condition_report")
    model, model_dir, data, ds, src = tiny_refusal_direction(tmp_path)
    tok = tiny_tokenizer()
    texts = data.pos_val[:6] + data.neg_val[:6]
    (tmp_path / "mixed.txt").write_text("\n".join(texts) + "\n")
    refused = [i % 2 == 0 for i in range(len(texts))]  # every other prompt "refused" by the unedited model
    verdicts = iter(refused)
    monkeypatch.setattr(mod, "is_refusal", lambda text: next(verdicts))
    out = tmp_path / "c.json"
    args = ["a=" + str(src), "b=" + str(src), "--model", model_dir, "--prompts", str(tmp_path / "mixed.txt")]
    assert mod.main([*args, "--label-tokens", "2", "--batch-size", "4", "--out", str(out)]) == 0
    row = json.loads(out.read_text())["files"]["mixed.txt"]
    assert (row["n"], row["refused"]) == (12, 6)
    ids = extract.build_prompts(tok, texts)
    logits, states = forward_last(model, tok, ids, states=True)
    fired = [condition_score(ds, states[i, ds.detect_layer], logits[i]) > ds.detect_threshold for i in range(12)]
    want = {
        "fires": sum(fired),
        "fires_refused": sum(f and r for f, r in zip(fired, refused, strict=True)),
        "fires_answered": sum(f and not r for f, r in zip(fired, refused, strict=True)),
        "misses_refused": sum(r and not f for f, r in zip(fired, refused, strict=True)),
    }
    assert 0 < want["fires"] < 12  # the separable tiny prompts: the condition tells the two halves apart
    assert row["conditions"]["a"] == row["conditions"]["b"] == want
    assert "missed refused" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        mod.main(["nofile", "--model", model_dir])


def test_condition_report_lookahead_is_the_judge_on_the_reply_opening(tmp_path, monkeypatch, capsys):
    """--lookahead K: the judge on the first K tokens of the unedited reply. With K at least the
    label length it is the label itself (no false fires, no misses); with fewer tokens it sees less."""
    mod = load_script("condition_report")
    _, model_dir, data, _ds, src = tiny_refusal_direction(tmp_path)
    (tmp_path / "p.txt").write_text("\n".join(data.pos_val[:6] + data.neg_val[:6]) + "\n")
    # a deterministic judge on the text (a random model's replies are noise): "refused" when the
    # reply holds an even number of characters (the lookahead reads replies through the same judge)
    judge = lambda text: len(text) > 0 and len(text) % 2 == 0  # noqa: E731
    monkeypatch.setattr(mod, "is_refusal", judge)
    monkeypatch.setitem(LOOKAHEAD_JUDGES, "refusal", judge)
    out = tmp_path / "c.json"
    args = ["a=" + str(src), "--model", model_dir, "--prompts", str(tmp_path / "p.txt"), "--label-tokens", "3"]
    assert mod.main([*args, "--lookahead", "1,3,5", "--batch-size", "4", "--out", str(out)]) == 0
    row = json.loads(out.read_text())["files"]["p.txt"]
    c = row["conditions"]
    assert 0 < row["refused"] < 12  # the judge splits these replies
    assert set(c) == {"a", "first-1-tokens", "first-3-tokens", "first-5-tokens"}
    for k in ("first-3-tokens", "first-5-tokens"):  # the whole 3-token reply: the label
        assert c[k] == {
            "fires": row["refused"],
            "fires_refused": row["refused"],
            "fires_answered": 0,
            "misses_refused": 0,
        }
    assert (
        c["first-1-tokens"]["fires"] + c["first-1-tokens"]["misses_refused"] - c["first-1-tokens"]["fires_answered"]
        == row["refused"]
    )
    assert "first-3-tokens" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        mod.main([*args, "--lookahead", "0"])
    with pytest.raises(SystemExit):
        mod.main([*args, "--lookahead", "x"])


def test_kl_breakdown_splits_kl_by_the_plain_models_refusals(tmp_path, monkeypatch, capsys):
    """scripts/kl_breakdown.py: the parts from refused and answered prompts add up to the mean,
    the per-prompt KLs are the edit's own, and the auto figure is the firing-case edit's KL on
    the prompts the condition fires on, zero elsewhere."""
    from directions.detection import condition_score
    from directions.fileformat import load_direction, save_direction
    from directions.forward import forward_last
    from directions.kl import first_token_kl
    from tests.tiny_models import random_direction_set

    mod = load_script("kl_breakdown")
    model, model_dir, data, ds, _ = tiny_refusal_direction(tmp_path)
    fire = random_direction_set(model, "refusal@auto", seed=5)
    ds.auto_edit = fire
    src = save_direction(ds, tmp_path / "fire.safetensors", config=model.config)
    tok = tiny_tokenizer()
    texts = data.pos_val[:5] + data.neg_val[:5]
    (tmp_path / "mixed.txt").write_text("\n".join(texts) + "\n")
    refused = [i % 3 == 0 for i in range(len(texts))]
    verdicts = iter(refused)
    monkeypatch.setattr(mod, "is_refusal", lambda text: next(verdicts))
    out = tmp_path / "k.json"
    args = ["r=" + str(src), "same=" + str(src), "--model", model_dir, "--prompts", str(tmp_path / "mixed.txt")]
    args += ["--strength", "2"]
    assert mod.main([*args, "--label-tokens", "2", "--batch-size", "4", "--out", str(out)]) == 0
    row = json.loads(out.read_text())["files"]["mixed.txt"]
    assert row["refused"] == refused
    d = row["directions"]["r"]
    assert row["directions"]["same"] == d  # a second file with the same edits: the same figures
    ids = extract.build_prompts(tok, texts)
    base, states = forward_last(model, tok, ids, states=True)
    back = load_direction(src, name="r")
    edited_logits, _ = forward_last(model, tok, ids, {"r": back}, {"r": [2.0] * 10})
    _, want = first_token_kl(base, edited_logits)
    assert d["kl_always"] == pytest.approx(want, rel=1e-5, abs=1e-9)
    assert d["kl_firing_edit"] != pytest.approx(d["kl_always"])  # the firing-case edit is another edit
    for key in ("always", "firing_edit_always", "auto"):
        m = d[key]
        assert m["from_refused"] + m["from_answered"] == pytest.approx(m["mean"])
    fired = [condition_score(back, states[i, back.detect_layer], base[i]) > back.detect_threshold for i in range(10)]
    assert d["fired"] == fired
    assert d["auto"]["mean"] == pytest.approx(sum(k for k, f in zip(d["kl_firing_edit"], fired, strict=True) if f) / 10)
    assert d["always"]["mean_refused"] == pytest.approx(
        sum(k for k, r in zip(want, refused, strict=True) if r) / sum(refused)
    )
    assert "from refused" in capsys.readouterr().out


def test_out_of_fold_scores_never_score_a_prompt_with_a_probe_that_saw_it():
    """scripts/probe_ceiling.py: a prompt's score comes from the probe of the folds without it, so a
    point that only its own label separates gets no credit; separable data is caught in full."""
    import torch

    mod = load_script("probe_ceiling")
    g = torch.Generator().manual_seed(0)
    n, d = 60, 8
    is_pos = torch.arange(n) < 30
    states = torch.randn(n, 2, d, generator=g)
    states[is_pos, 1, 0] += 6.0  # layer 1 separates on feature 0; layer 0 is noise
    refused = is_pos.clone()
    rows = mod.ceiling_table(states, is_pos, refused, [0, 1], [0.1], fpr=0.05, k=5)
    by_layer = {r["layer"]: r for r in rows}
    assert by_layer[1]["recall_at_fpr_all"] == 1.0 and by_layer[1]["missed_at_fpr_all"] == 0
    assert by_layer[0]["recall_at_fpr_all"] < 0.5  # noise: in sample LDA would overfit 8 dims, out of fold it cannot
    folds = mod.folds_of(30, 5, seed=1)
    assert sorted(torch.bincount(folds).tolist()) == [6] * 5
    # one negative of three may fire: the threshold sits between the top two negatives (2.5, 0.5)
    assert mod.recall_at(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0.0, 0.5, 2.5]), 0.34) == pytest.approx(
        (2 / 3, 1.5)
    )


def test_stacked_probe_reads_several_layers_together_out_of_fold():
    """scripts/probe_ceiling.py's stacked probe: a class that only the sum of two layers' features
    separates is caught by the probe reading both, not by either layer alone; the RBF kernel also
    catches a ring (a boundary no linear score has)."""
    import torch

    mod = load_script("probe_ceiling")
    g = torch.Generator().manual_seed(0)
    n, d = 80, 4
    is_pos = torch.arange(n) < 40
    states = torch.randn(n, 3, d, generator=g)
    shift = torch.randn(n, generator=g) * 4  # large per-prompt noise that cancels between layers 0 and 1
    states[:, 0, 0] += shift + 1.5 * is_pos
    states[:, 1, 0] += -shift + 1.5 * is_pos
    refused = is_pos.clone()
    alone = mod.ceiling_table(states, is_pos, refused, [0, 1], [0.1], fpr=0.05, k=4)
    both = mod.stacked_table(states, is_pos, refused, {"0-1": [0, 1]}, [0.01], [None], fpr=0.05, k=4)
    assert both[0]["layers"] == "0-1" and both[0]["kernel"] == "linear"
    assert both[0]["recall_at_fpr_all"] >= 0.8 > max(r["recall_at_fpr_all"] for r in alone)
    # a ring: positives far from the centre in layer 2, negatives near it
    radius = torch.where(is_pos, torch.tensor(3.0), torch.tensor(0.5))
    ring = torch.randn(n, d, generator=g)
    states[:, 2] = ring / ring.norm(dim=-1, keepdim=True) * radius[:, None]
    lin, rbf = mod.stacked_table(states, is_pos, refused, {"2": [2]}, [0.01], [None, 1.0], fpr=0.05, k=4)
    assert rbf["kernel"] == "rbf 1" and rbf["recall_at_fpr_all"] == 1.0 > lin["recall_at_fpr_all"]


def test_probe_ceiling_runs_end_to_end_and_reports_the_files_condition(tmp_path, monkeypatch, capsys):
    mod = load_script("probe_ceiling")
    _, model_dir, data, ds, src = tiny_refusal_direction(tmp_path)
    (tmp_path / "harmful.txt").write_text("\n".join(data.pos_val) + "\n")
    (tmp_path / "harmless.txt").write_text("\n".join(data.neg_val) + "\n")
    verdicts = iter([True] * 8 + [False] * 100)  # the plain model "refuses" 8 harmful prompts, nothing else
    monkeypatch.setattr(mod, "is_refusal", lambda text: next(verdicts, False))
    out, cache = tmp_path / "c.json", tmp_path / "c.pt"
    args = ["--model", model_dir, "--direction", f"r={src}", "--layers", "1-2", "--shrinkages", "0.3"]
    args += ["--weights", "0,1", "--folds", "3", "--label-tokens", "2", "--batch-size", "4", "--stack", "1-2"]
    args += ["--harmful", str(tmp_path / "harmful.txt"), "--harmless", str(tmp_path / "harmless.txt")]
    assert mod.main([*args, "--cache", str(cache), "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert (res["n_harmful"], res["n_refused_harmful"], res["n_refused_harmless"]) == (len(data.pos_val), 8, 0)
    assert len(res["rows"]) == 2 * (2 if ds.detect_logit_tokens else 1)
    assert sum(res["file_condition_in_sample"]["harmful"][k] for k in ("fires_refused", "misses_refused")) == 8
    assert out.with_suffix(".png").stat().st_size > 0 and cache.exists()
    # a second run reads the cache: no model replies are generated (the judge would run out)
    monkeypatch.setattr(mod, "is_refusal", lambda text: pytest.fail("labels should come from the cache"))
    assert mod.main([*args, "--cache", str(cache), "--out", str(tmp_path / "d.json")]) == 0
    assert json.loads((tmp_path / "d.json").read_text())["rows"] == res["rows"]
    assert [(r["layers"], r["kernel"]) for r in res["stacked_rows"]] == [("1-2", k) for k in ("linear", "rbf 0.5")] * 2
    printed = capsys.readouterr().out
    assert "best_all: layer" in printed and "layers 1-2 together" in printed
    with pytest.raises(SystemExit):
        mod.main([*args, "--folds", "1"])
    with pytest.raises(SystemExit):  # the tiny model has fewer layers than the stack names
        mod.main([*args, "--cache", str(cache), "--stack", "0-40", "--out", str(tmp_path / "e.json")])
