"""The direction search on tiny random models: the parameter space, the proxy, a resumable Optuna
study, and ``frankly search`` end to end (confirm through the engine, file + plot + JSON written)."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from directions import search, search_space
from directions.edit import normalize
from directions.extract import Candidate, Means, build_prompts, candidate_tensors, collect_states
from directions.fileformat import COMPONENTS, load_direction
from directions.search_space import Kernel, Params, build_set
from tests.tiny_models import save_tiny_dir, tiny_extract_data, tiny_model, tiny_tokenizer


def _means(model, tok) -> Means:
    d = tiny_extract_data()
    pos = collect_states(model, tok, build_prompts(tok, d.pos_train))
    neg = collect_states(model, tok, build_prompts(tok, d.neg_train))
    return Means.from_states(pos, neg)


def _params(**kw) -> Params:
    base = dict(
        direction="index",
        index=1.0,
        orth=False,
        attn=Kernel(1.0, 1.0, 1.0, 0.0),
        mlp=Kernel(2.0, 0.5, 0.8, 0.25),
        embed=0.0,
        skip_first=0,
    )
    return Params(**{**base, **kw})


def test_fractional_index_interpolates_between_neighbouring_layers():
    model, tok = tiny_model("llama"), tiny_tokenizer()
    m = _means(model, tok)
    d1, d2 = normalize(m.diff[1]), normalize(m.diff[2])
    assert torch.allclose(search_space.interpolated_direction(m, 1.0, False), d1.float(), atol=1e-6)
    assert torch.allclose(search_space.interpolated_direction(m, 2.0, False), d2.float(), atol=1e-6)
    mid = search_space.interpolated_direction(m, 1.5, False)
    assert torch.allclose(mid, normalize(d1 + d2).float(), atol=1e-6)
    assert float(mid @ d1.float()) < 1 - 1e-4 and float(mid @ d2.float()) < 1 - 1e-4
    orth = search_space.interpolated_direction(m, 1.0, True)
    assert abs(float(orth @ normalize(m.neg[1]))) < 1e-5


def test_kernels_floor_embedding_and_first_layers():
    model, tok = tiny_model("llama"), tiny_tokenizer()
    m = _means(model, tok)
    ds = build_set(m, _params(skip_first=1, embed=0.7), "x")
    cw = ds.component_weights
    a, mlp, e = (COMPONENTS.index(k) for k in ("attn", "mlp", "embed"))
    assert torch.all(cw[[a, mlp], 0] == 0)  # layer 0 skipped
    assert float(cw[a, 1]) == pytest.approx(1.0)  # attention peak at layer 1, max 1
    assert float(cw[mlp, 2]) == pytest.approx(0.8)  # MLP peak at layer 2, max 0.8
    assert float(cw[mlp, 1]) == pytest.approx(0.8 * (0.25 + 0.75 * torch.exp(torch.tensor(-2.0)).item()), rel=1e-5)
    assert float(cw[e, 0]) == pytest.approx(0.7) and torch.all(cw[e, 1:] == 0)
    assert torch.all(ds.layer_weights == 1) and ds.metadata["chosen_layer"] == "1"


def test_perlayer_leaves_empty_differences_alone():
    """At the last prompt token layer 0's input is the same token embedding for every prompt."""
    model, tok = tiny_model("qwen2"), tiny_tokenizer()
    m = _means(model, tok)
    ds = build_set(m, _params(direction="perlayer", embed=1.0), "x")
    assert torch.all(ds.component_weights[:, 0] == 0)
    assert torch.allclose(ds.directions[2], normalize(m.diff[2]).float(), atol=1e-6)


def test_reference_trial_is_the_flat_orth_candidate():
    model, tok = tiny_model("llama"), tiny_tokenizer()
    m = _means(model, tok)
    ds = build_set(m, search_space.params_from_dict(search.reference_params(1)), "ref")
    dirs, w = candidate_tensors(m, Candidate("orth", 1))
    assert torch.allclose(ds.directions, dirs, atol=1e-6)
    got = ds.writer_weights()  # the embedding writer reads column 0 only
    assert torch.allclose(got[1:], w.repeat(2, 1)) and float(got[0, 0]) == pytest.approx(float(w[0]))


def test_study_resumes_and_pareto_candidates_respect_the_budget(tmp_path):
    model, tok = tiny_model("llama"), tiny_tokenizer()
    d = tiny_extract_data()
    prompts = search.SearchPrompts(d.pos_train, d.neg_train, d.pos_val, d.neg_val)
    acts = search.load_or_extract(model, tok, prompts, tmp_path, "k", 4)
    assert search.load_or_extract(model, tok, prompts, tmp_path, "k", 4).means.pos.equal(acts.means.pos)  # cached
    ref = search.refusal_tokens(acts)
    assert ref
    scorer = search.ProxyScorer(
        model, tok, build_prompts(tok, d.pos_val), build_prompts(tok, d.neg_val), ref, 1.0, 4, 3
    )
    study = search.open_study(tmp_path, "t", 0, 2)
    study.enqueue_trial(search.reference_params(1))
    assert search.run_trials(study, scorer, acts, 3, 3) == 3
    again = search.open_study(tmp_path, "t", 0, 2)  # resumed from SQLite
    assert search.run_trials(again, scorer, acts, 5, 3) == 2
    rows = search.trial_rows(again)
    assert len(rows) == 5 and any(r["pareto"] for r in rows)
    assert rows[0]["label"].startswith("idx1.00-orth")
    assert all(r["kl"] >= 0 and 0 <= r["refusal_mass"] <= 1 and 0 <= r["refusal"] <= 1 for r in rows)
    assert all(r["objective"] == pytest.approx(search.objective_value(r)) for r in rows)
    budget = sorted(r["kl"] for r in rows)[2]
    picked = search.pareto_candidates(rows, budget, top=10, slack=1.0)
    assert all(r["pareto"] and r["kl"] <= budget for r in picked)
    plain = scorer.score(build_set(acts.means, _params(attn=Kernel(1, 1, 0, 0), mlp=Kernel(1, 1, 0, 0)), "zero"))
    assert plain["kl"] == pytest.approx(0.0, abs=1e-9)  # zero weights: the unedited model


def test_frankly_search_end_to_end(tmp_path, capsys, monkeypatch):
    from server import search_cmd

    model = tiny_model("llama")
    model_dir = save_tiny_dir(model, tmp_path / "m")
    d = tiny_extract_data()
    files = {}
    for k, lines in (("p", d.pos_train), ("n", d.neg_train), ("vp", d.pos_val), ("vn", d.neg_val)):
        files[k] = tmp_path / f"{k}.txt"
        files[k].write_text("\n".join(lines) + "\n")
    parser = argparse.ArgumentParser()
    search_cmd.add_arguments(parser)
    out = tmp_path / "out" / "tiny-refusal.safetensors"
    argv = ["--model", model_dir, "--positive", str(files["p"]), "--negative", str(files["n"])]
    argv += ["--val-positive", str(files["vp"]), "--val-negative", str(files["vn"]), "--out", str(out)]
    argv += ["--study-dir", str(tmp_path / "study"), "--trials", "4", "--startup-trials", "2", "--proxy-n", "6"]
    argv += ["--kl-budget", "100", "--confirm-top", "2", "--confirm-tokens", "3", "--batch-size", "4"]
    argv += ["--reference-layer", "1", "--confirm-base"]
    assert search_cmd.run(parser.parse_args(argv)) == 0
    ds = load_direction(out)
    ds.check_fits(model.config)
    assert ds.component_weights is not None and ds.has_condition
    sel = json.loads(ds.metadata["selection"])
    assert sel["trials"] == 4 and sel["chosen"] in sel["confirm"] and "base" in sel["confirm"]
    assert sel["detection"]["val_fire_neg"] <= 0.1
    assert out.with_suffix(".pareto.png").stat().st_size > 5000
    assert json.loads(out.with_suffix(".selection.json").read_text())["selection"]["chosen"] == sel["chosen"]
    assert "<- winner" in capsys.readouterr().out
    # a rerun reuses the study and the confirm figures (study_dir/confirm.json): nothing is generated
    import server.engine.offline as offline

    def no_generation(*a, **k):
        raise AssertionError("confirm figures should have come from confirm.json")

    monkeypatch.setattr(offline, "engine_generate", no_generation)
    assert search_cmd.run(parser.parse_args(argv)) == 0
    assert json.loads(load_direction(out).metadata["selection"])["confirm"] == sel["confirm"]


def test_winner_within_budget_else_fewest_refusals():
    from directions.search_confirm import pick_winner

    figs = {
        "base": {"refusals": 40, "first_token_kl": 0.0},
        "t1": {"refusals": 1, "first_token_kl": 0.05},
        "t2": {"refusals": 5, "first_token_kl": 0.015},
        "t3": {"refusals": 9, "first_token_kl": 0.01},
    }
    assert pick_winner(figs, 0.02) == ("t2", None)
    label, warning = pick_winner(figs, 0.005)
    assert label == "t1" and "fewest refusals" in warning
    # a non-answer counts as a refusal: t2's 5 refusals plus 4 deflections lose to t1
    figs["t2"]["non_answers"] = 4
    figs["t1"]["first_token_kl"] = 0.019
    assert pick_winner(figs, 0.02) == ("t1", None)


def test_thinned_train_sets_are_evenly_spaced_and_keep_validation():
    p = search.SearchPrompts([f"a{i}" for i in range(10)], [f"b{i}" for i in range(9)], ["v"], ["w"])
    t = p.thinned(4)
    assert t.harmful_train == ["a0", "a3", "a6", "a9"] and t.harmless_train == ["b0", "b3", "b5", "b8"]
    assert t.harmful_val == ["v"] and p.thinned(None) == p and p.thinned(50) == p
    assert t.digest() != p.digest()


def test_pareto_candidates_spread_along_the_front_within_the_budget():
    rows = [{"number": i, "pareto": True, "objective": 1 - i / 10, "kl": i / 100} for i in range(8)]
    rows.append({"number": 99, "pareto": False, "objective": 0.0, "kl": 0.0})
    got = [r["number"] for r in search.pareto_candidates(rows, kl_budget=0.04, top=3, slack=1.5)]
    assert got == [6, 3, 0]  # within 0.06: lowest objective first, then spread towards lower KL
    assert [r["number"] for r in search.pareto_candidates(rows, 0.04, top=1)] == [6]
    assert len(search.pareto_candidates(rows, 1.0, top=20)) == 8
