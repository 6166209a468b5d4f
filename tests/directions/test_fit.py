"""The gradient fit of writer weights (directions/fit.py, scripts/fit_weights.py) on tiny models:
its differentiable edit is the server's edit, the fit lowers what it minimises, and the script
writes loadable candidates that keep the source file's condition."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from directions.fileformat import COMPONENTS, load_direction
from directions.fit import DifferentiableEdit, FitConfig, fit_weights, last_logits, with_weights
from directions.forward import forward_last
from tests.scripts_loader import load_script
from tests.tiny_models import (
    random_direction_set,
    tiny_model,
    tiny_refusal_direction,
    tiny_tokenizer,
    tokens,
)

TOK = tiny_tokenizer()


def _prompts(seed: int, n: int = 8) -> list[list[int]]:
    return [tokens(seed + i, 1, 4 + (i % 4))[0].tolist() for i in range(n)]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_differentiable_edit_is_the_server_edit(arch):
    model = tiny_model(arch)
    ds = random_direction_set(model)
    g = torch.Generator().manual_seed(5)
    w = torch.rand(len(COMPONENTS), ds.n_layers, generator=g) * 1.5
    served = with_weights(ds, w, {"test": True})
    prompts = _prompts(0)
    want, _ = forward_last(model, TOK, prompts, {"s": served}, {"s": [1.0] * len(prompts)}, batch_size=8)
    edit = DifferentiableEdit(model, served.directions)
    try:
        edit.weights = served.writer_weights()
        got = last_logits(model, prompts, 0)
        edit.weights = None  # hooks installed but off: the plain model
        plain = last_logits(model, prompts, 0)
    finally:
        edit.remove()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert (got - plain).abs().max() > 1e-3  # the edit did something
    assert not any(m._forward_hooks for m in model.modules())  # removed


def test_a_fitted_copy_drops_the_sources_firing_case_edit():
    """A fit candidate is a new edit: it keeps the source's condition but not its firing-case edit
    (which would otherwise stand in for the candidate in every ``auto`` measurement)."""
    model = tiny_model("qwen2")
    ds = random_direction_set(model)
    ds.detect_vector, ds.detect_layer, ds.detect_threshold = torch.ones(64), 1, 0.0
    ds.auto_edit = random_direction_set(model, seed=7)
    ds.metadata["auto_edit"] = "{}"
    cand = with_weights(ds, torch.ones(len(COMPONENTS), ds.n_layers), {})
    assert cand.has_condition and cand.auto_edit is None and "auto_edit" not in cand.metadata
    assert ds.auto_edit is not None  # the source is untouched


def test_a_fitted_copy_describes_itself_not_its_source():
    """The copy's ``method`` names the fit (and the source's method it started from) and its
    ``eval`` is its own confirm figures, or absent: the source's figures describe another edit."""
    model = tiny_model("qwen2")
    ds = random_direction_set(model)
    ds.metadata |= {"method": "mean-diff orth", "eval": json.dumps({"refusal": 0.5, "split": "val"})}
    w = torch.ones(len(COMPONENTS), ds.n_layers)
    bare = with_weights(ds, w, {"lambda": 4.0})
    assert (
        bare.metadata["method"]
        == "writer weights fitted by scripts/fit_weights.py (lambda 4), from a file of: mean-diff orth"
    )
    assert "eval" not in bare.metadata
    conf = {"refusals": 2, "n": 65, "refusal_rate": 0.0308, "non_answers": 0, "first_token_kl": 0.0297, "tokens": 64}
    both = with_weights(ds, w, {"lambda": 4.0, "confirm": conf}, ds.directions)
    assert both.metadata["method"].startswith("writer weights and directions fitted")
    assert json.loads(both.metadata["eval"]) == {
        "refusal": 0.0308,
        "non_answers": 0,
        "first_token_kl": 0.0297,
        "n": 65,
        "tokens": 64,
        "split": "val",
    }
    assert ds.metadata["method"] == "mean-diff orth"  # the source is untouched


@torch.no_grad()
def _greedy(model, ds, prompt, n):
    """``n`` greedy tokens after ``prompt`` with ``ds`` at strength 1 (the server's hooks)."""
    seq = list(prompt)
    for _ in range(n):
        logits, _ = forward_last(model, TOK, [seq], {"s": ds}, {"s": [1.0]}, batch_size=1)
        seq.append(int(logits[0].argmax()))
    return seq[len(prompt) :]


def _prob_and_kl(model, ds, harmful, harmless, prefixes):
    """Mean P(prefix | prompt) over the harmful prompts (teacher-forced, one forward per token, through
    the server's hooks) and mean first-token KL over the harmless ones."""
    rows = lambda p: {"s": [1.0] * len(p)}  # noqa: E731
    probs = []
    for p, pre in zip(harmful, prefixes, strict=True):
        lp = 0.0
        for j, t in enumerate(pre):
            logits, _ = forward_last(model, TOK, [list(p) + list(pre[:j])], {"s": ds}, {"s": [1.0]}, batch_size=1)
            lp += float(torch.log_softmax(logits[0].double(), -1)[t])
        probs.append(math.exp(lp))
    base, _ = forward_last(model, TOK, harmless, batch_size=16)
    ln, _ = forward_last(model, TOK, harmless, {"s": ds}, rows(harmless), batch_size=16)
    lp, lq = torch.log_softmax(base.double(), -1), torch.log_softmax(ln.double(), -1)
    return sum(probs) / len(probs), float((lp.exp() * (lp - lq)).sum(-1).mean())


def test_fit_lowers_its_objective():
    model = tiny_model("qwen2")
    ds = random_direction_set(model)
    ds = dataclasses.replace(ds, layer_weights=torch.ones(ds.n_layers))
    harmful, harmless = _prompts(10, 12), _prompts(40, 12)
    # each "refusal prefix": the edited model's own two greedy tokens after the harmful prompt
    prefixes = [_greedy(model, ds, p, 2) for p in harmful]
    m0, k0 = _prob_and_kl(model, ds, harmful, harmless, prefixes)
    # lambda 0: only the refusal term; a large lambda: mostly the KL
    cfg = FitConfig(lambdas=(0.0, 1000.0), steps=25, batch=12, lr=0.2)
    seen = []
    stages = fit_weights(model, TOK, ds, harmful, harmless, prefixes, cfg, lambda *a: seen.append(a))
    assert [s.lam for s in stages] == [0.0, 1000.0]
    assert len(seen) == 50 and seen[-1][:3] == ("lambda=1000", 25, 25)
    m1, _ = _prob_and_kl(model, with_weights(ds, stages[0].weights, {}), harmful, harmless, prefixes)
    _, k2 = _prob_and_kl(model, with_weights(ds, stages[1].weights, {}), harmful, harmless, prefixes)
    assert m1 < m0 * 0.9
    assert k2 < k0 * 0.5
    for st in stages:
        assert st.weights.shape == (len(COMPONENTS), ds.n_layers)
        assert float(st.weights.min()) >= 0 and float(st.weights.max()) <= cfg.w_max
    assert all(not p.requires_grad for p in model.parameters())  # left as found


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_shared_prompt_prefix_scores_equal_one_forward_per_pair(arch):
    """prefix_set_logprobs (each prompt computed once, its KV cache repeated per prefix) gives the
    log-probabilities and the gradients of prefix_logprob run on every (prompt, prefix) pair, with
    prompts of different lengths (left padding), prefixes of different lengths (right padding, one
    a single token) and the edit on."""
    from directions.fit import prefix_logprob, prefix_set_logprobs

    model = tiny_model(arch)
    ds = random_direction_set(model)
    prompts = _prompts(3, 3)
    sets = [[[5, 6, 7], [8]], [[9, 10]], [[11, 12, 13, 14], [15, 16], [17]]]
    edit = DifferentiableEdit(model, ds.directions)
    try:
        outs = []
        for fn in ("shared", "pairs"):
            w = torch.full((len(COMPONENTS), ds.n_layers), 0.7, requires_grad=True)
            edit.weights = w
            if fn == "shared":
                lp = prefix_set_logprobs(model, prompts, sets, 0)
            else:
                pairs = [(p, x) for p, ps in zip(prompts, sets, strict=True) for x in ps]
                lp = prefix_logprob(model, [p for p, _ in pairs], [x for _, x in pairs], 0)
            (lp * torch.linspace(0.5, 1.5, len(lp))).sum().backward()
            outs.append((lp.detach(), w.grad.clone()))
    finally:
        edit.remove()
    assert outs[0][0].shape == (6,)
    torch.testing.assert_close(outs[0][0], outs[1][0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(outs[0][1], outs[1][1], rtol=1e-3, atol=1e-4)
    assert float(outs[0][1].abs().sum()) > 0  # the edit is in the graph


def test_several_refusal_prefixes_score_their_summed_probability():
    """A harmful prompt given a set of refusal openings: the refusal term's mass is the sum of their
    teacher-forced probabilities (checked at the first step, where the weights are still the
    file's), and a single prefix given bare or as a one-element set is the same fit."""
    model = tiny_model("qwen2")
    ds = random_direction_set(model)
    ds = dataclasses.replace(ds, layer_weights=torch.ones(ds.n_layers))
    harmful, harmless = _prompts(10, 6), _prompts(40, 6)
    own = [_greedy(model, ds, p, 2) for p in harmful]
    other = [_greedy(model, ds, p, 3)[1:] for p in reversed(harmful)]  # other openings, other lengths
    sets = [[a, b] for a, b in zip(own, other, strict=True)]
    cfg = FitConfig(lambdas=(0.0,), steps=1, batch=6, lr=0.2)
    got = fit_weights(model, TOK, ds, harmful, harmless, sets, cfg)[0].history[0]["mass"]
    m_own, _ = _prob_and_kl(model, ds, harmful, harmless, own)
    per_other = [_prob_and_kl(model, ds, [p], harmless[:1], [o])[0] for p, o in zip(harmful, other, strict=True)]
    assert got == pytest.approx(m_own + sum(per_other) / len(per_other), rel=1e-4)
    bare = fit_weights(model, TOK, ds, harmful, harmless, own, FitConfig(lambdas=(0.0,), steps=3, batch=6))[0]
    boxed = fit_weights(
        model, TOK, ds, harmful, harmless, [[x] for x in own], FitConfig(lambdas=(0.0,), steps=3, batch=6)
    )[0]
    torch.testing.assert_close(bare.weights, boxed.weights)


def test_the_compliance_term_pulls_toward_its_targets():
    """With compliance targets the fitted edit makes them likelier than the same fit without them
    (same seed and steps), a prompt without a target (None) is skipped, and a wrong-length list is
    refused."""
    from directions.fit import prefix_logprob

    model = tiny_model("qwen2")
    ds = random_direction_set(model)
    ds = dataclasses.replace(ds, layer_weights=torch.ones(ds.n_layers))
    harmful, harmless = _prompts(10, 8), _prompts(40, 8)
    prefixes = [_greedy(model, ds, p, 1) for p in harmful]
    g = torch.Generator().manual_seed(3)
    targets = [torch.randint(3, 100, (3,), generator=g).tolist() for _ in harmful]
    targets[0] = None
    cfg = FitConfig(lambdas=(0.1,), steps=20, batch=8, lr=0.3, comply_weight=5.0)

    def nll(st):
        edit = DifferentiableEdit(model, ds.directions)
        try:
            edit.weights = st.weights
            with torch.no_grad():
                lp = prefix_logprob(model, harmful[1:], targets[1:], 0)
        finally:
            edit.remove()
        return float(-lp.mean())

    with_c = fit_weights(model, TOK, ds, harmful, harmless, prefixes, cfg, comply=targets)[0]
    without = fit_weights(model, TOK, ds, harmful, harmless, prefixes, cfg)[0]
    assert nll(with_c) < nll(without)
    assert "comply_nll" in with_c.history[0] and "comply_nll" not in without.history[0]
    with pytest.raises(ValueError, match="comply needs one entry"):
        fit_weights(model, TOK, ds, harmful, harmless, prefixes, cfg, comply=targets[:3])


def test_a_fit_can_start_from_the_files_weights():
    """``init_from_file``: with nothing to learn (lr 0) the stage ends at the file's own writer weights
    (within the [0, w_max] squashing), where the default starts every writer at 1."""
    model = tiny_model("llama")
    ds = random_direction_set(model)
    harmful, harmless = _prompts(10, 4), _prompts(40, 4)
    prefixes = [[5]] * 4
    cfg = FitConfig(lambdas=(1.0,), steps=1, batch=4, lr=0.0, init_from_file=True)
    got = fit_weights(model, TOK, ds, harmful, harmless, prefixes, cfg)[0].weights
    torch.testing.assert_close(got, ds.writer_weights().clamp(2e-4, 2 - 2e-4), atol=1e-5, rtol=1e-5)
    flat = fit_weights(model, TOK, ds, harmful, harmless, prefixes, dataclasses.replace(cfg, init_from_file=False))
    torch.testing.assert_close(flat[0].weights, torch.ones_like(got))


def test_smoothness_penalty_smooths_the_weights():
    model = tiny_model("qwen2")
    ds = random_direction_set(model)
    ds = dataclasses.replace(ds, layer_weights=torch.ones(ds.n_layers))
    harmful, harmless = _prompts(10, 8), _prompts(40, 8)
    prefixes = [_greedy(model, ds, p, 1) for p in harmful]

    def roughness(smooth: float) -> float:
        cfg = FitConfig(lambdas=(1.0,), steps=15, batch=8, lr=0.3, smooth=smooth)
        w = fit_weights(model, TOK, ds, harmful, harmless, prefixes, cfg)[0].weights[1:]
        return float((w[:, 1:] - w[:, :-1]).pow(2).sum())

    assert roughness(10.0) < 0.5 * roughness(0.0)


@pytest.mark.parametrize("mode", ["shared", "per-layer"])
def test_fitting_the_direction_too(mode):
    """With the direction fitted as well, the rows stay unit, "shared" keeps one direction for every
    layer and "per-layer" does not, the refusal term drops further than with the weights alone (same
    steps and seed), the regulariser holds the rotation back, and the result serves through the
    server's hooks exactly as the differentiable edit computed it."""
    model = tiny_model("qwen2")
    ds = random_direction_set(model)
    # one direction for every layer, as the shipped refusal file
    ds = dataclasses.replace(
        ds, directions=ds.directions[:1].repeat(ds.n_layers, 1), layer_weights=torch.ones(ds.n_layers)
    )
    harmful, harmless = _prompts(10, 12), _prompts(40, 12)
    prefixes = [_greedy(model, ds, p, 2) for p in harmful]

    def fit(direction: str, reg: float = 0.0):
        cfg = FitConfig(
            lambdas=(0.0,), steps=20, batch=12, lr=0.2, direction=direction, direction_lr=0.05, direction_reg=reg
        )
        return fit_weights(model, TOK, ds, harmful, harmless, prefixes, cfg)[0]

    fixed, free, held = fit("none"), fit(mode), fit(mode, reg=100.0)
    assert fixed.directions is None
    d = free.directions
    assert d.shape == ds.directions.shape
    torch.testing.assert_close(d.norm(dim=-1), torch.ones(ds.n_layers))
    cos = (d * ds.directions).sum(-1)
    assert float(cos.min()) < 0.999  # it moved
    if mode == "shared":  # one offset for every layer: still one direction
        torch.testing.assert_close(d, d[:1].expand_as(d))
    else:
        assert not torch.allclose(d[0], d[1], atol=1e-4)
    held_cos = (held.directions * ds.directions).sum(-1)
    assert float((1 - held_cos).mean()) < 0.5 * float((1 - cos).mean())
    m_fixed, _ = _prob_and_kl(model, with_weights(ds, fixed.weights, {}), harmful, harmless, prefixes)
    served = with_weights(ds, free.weights, {}, free.directions)
    m_free, _ = _prob_and_kl(model, served, harmful, harmless, prefixes)
    assert m_free < m_fixed
    torch.testing.assert_close(served.directions, d)
    edit = DifferentiableEdit(model, d)
    try:
        edit.weights = served.writer_weights()
        got = last_logits(model, harmless, 0)
    finally:
        edit.remove()
    want, _ = forward_last(model, TOK, harmless, {"s": served}, {"s": [1.0] * len(harmless)}, batch_size=8)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_fit_rejects_empty_inputs():
    model = tiny_model("llama")
    ds = random_direction_set(model)
    with pytest.raises(ValueError, match="refusal prefix"):
        fit_weights(model, TOK, ds, _prompts(0, 2), _prompts(5, 2), [[3], []], FitConfig(steps=1))
    with pytest.raises(ValueError, match="harmful and harmless"):
        fit_weights(model, TOK, ds, [], _prompts(5, 2), [], FitConfig(steps=1))
    with pytest.raises(ValueError, match="direction must be one of"):
        fit_weights(model, TOK, ds, _prompts(0, 2), _prompts(5, 2), [[3], [4]], FitConfig(steps=1, direction="rows"))


def test_non_answer_openings_skip_clashes_with_refusal_prefixes(tmp_path):
    mod = load_script("fit_weights")
    f = tmp_path / "openings.txt"
    f.write_text("t5 t6\nt7 t8 t9\nt5 t6 t10\n")  # the tiny tokenizer's words
    glad = TOK.encode("t5 t6", add_special_tokens=False)
    assist = TOK.encode("t7 t8 t9", add_special_tokens=False)
    assert len(glad) == 2 and len(assist) == 3 and glad != assist
    # the third opening starts with the first: their probabilities would overlap, so it is left out
    assert mod.non_answer_openings(TOK, str(f), [[9, 9]]) == [glad, assist]
    # an opening that a refusal prefix starts with is left out too
    assert mod.non_answer_openings(TOK, str(f), [glad[:2]]) == [assist]
    assert mod.non_answer_openings(TOK, "none", [[9]]) == []


@pytest.mark.parametrize("fit_direction", ["none", "per-layer"])
def test_fit_weights_script(tmp_path, capsys, monkeypatch, fit_direction):
    mod = load_script("fit_weights")
    _, model_dir, data, ds, src = tiny_refusal_direction(tmp_path, n_val=8)
    files = {}
    for k, v in {"pos": data.pos_train, "neg": data.neg_train, "vpos": data.pos_val, "vneg": data.neg_val}.items():
        files[k] = tmp_path / f"{k}.txt"
        files[k].write_text("\n".join(v) + "\n")
    out_dir, out = tmp_path / "fit", tmp_path / "winner.safetensors"
    args = ["--model", model_dir, "--direction", str(src), "--out-dir", str(out_dir), "--out", str(out)]
    args += ["--positive", str(files["pos"]), "--negative", str(files["neg"])]
    args += ["--val-positive", str(files["vpos"]), "--val-negative", str(files["vneg"])]
    args += ["--lambdas", "1,10", "--steps", "2", "--batch", "4", "--confirm-tokens", "3", "--label-tokens", "3"]
    args += ["--fit-direction", fit_direction, "--direction-lr", "0.05", "--refusal-prefixes", "2"]
    # a random model's replies are noise: the plain model "refuses" every third harmful prompt
    verdicts = iter([True, False, False] * 10)
    monkeypatch.setattr(mod, "is_refusal", lambda text: next(verdicts, False))
    assert mod.main(args) == 0
    printed = capsys.readouterr().out
    assert "[lambda=10] step 2/2" in printed and "| source |" in printed
    assert "fitting on the 6 of 16 harmful train prompts" in printed
    assert "common refusal prefixes: " in printed and "compliance targets: " in printed
    res = json.loads((out_dir / "fit.json").read_text())
    assert [s["lambda"] for s in res["stages"]] == [1.0, 10.0]
    assert set(res["confirm"]) == {"source", "lam1", "lam10"}
    assert all(len(f["openings"]) >= 1 for f in res["confirm"].values())  # the commonest reply openings
    assert all(f["non_answers"] >= 0 for f in res["confirm"].values())
    assert res["non_answer_openings"] and "penalised non-answer openings: " in printed
    assert (out_dir / "fit.png").stat().st_size > 0
    for p in (out_dir / "fit-lam1.safetensors", out_dir / "fit-lam10.safetensors"):
        got = load_direction(p)
        assert got.component_weights is not None and got.has_condition
        assert got.detect_threshold == pytest.approx(ds.detect_threshold)
        # its own record, not the source's: what was fitted, and its own validation figures
        lam = json.loads(got.metadata["fit"])["lambda"]
        assert got.metadata["method"].startswith(
            f"writer weights{'' if fit_direction == 'none' else ' and directions'} fitted by "
            f"scripts/fit_weights.py (lambda {lam:g})"
        )
        ev = json.loads(got.metadata["eval"])
        assert ev["split"] == "val" and ev["first_token_kl"] == res["confirm"][f"lam{lam:g}"]["first_token_kl"]
        if fit_direction == "none":
            torch.testing.assert_close(got.directions, load_direction(src).directions)
            assert "direction_cos_to_source" not in json.loads(got.metadata["fit"])
        else:  # the fitted directions, unit rows, their cosines to the source recorded
            cos = (got.directions * load_direction(src).directions).sum(-1)
            assert float(cos.min()) < 0.9999
            torch.testing.assert_close(got.directions.norm(dim=-1), torch.ones(got.n_layers))
            rec = json.loads(got.metadata["fit"])["direction_cos_to_source"]
            assert rec == pytest.approx(cos.tolist(), abs=1e-4)
            assert "min cos to source" in printed
    assert res["winner"] == mod.pick(res["confirm"], 1)[0]
    if res["winner"] == "source":
        assert not out.exists() and "not written" in printed
        return
    rec = json.loads(load_direction(out).metadata["fit"])
    assert rec["chosen"] == res["winner"] and rec["confirm"] == res["confirm"][res["winner"]]
    won = res["stages"][[1.0, 10.0].index(rec["lambda"])]["weights"]
    torch.testing.assert_close(load_direction(out).component_weights, torch.tensor(won))
    torch.testing.assert_close(
        load_direction(out).directions, load_direction(out_dir / f"fit-{res['winner']}.safetensors").directions
    )
    assert load_direction(out).has_condition


def test_pick_rule():
    mod = load_script("fit_weights")
    f = lambda r, kl: {"refusals": r, "first_token_kl": kl}  # noqa: E731
    figs = {"source": f(1, 0.066), "lam1": f(2, 0.055), "lam3": f(2, 0.050), "lam10": f(8, 0.033)}
    assert mod.pick(figs, 1) == ("lam3", None)
    assert mod.pick(figs, 7)[0] == "lam10"
    assert mod.pick(figs, 0)[0] == "source" and "<= 1" in mod.pick(figs, 0)[1]
    # a candidate within the refusal limit but not below the source's KL does not win
    assert mod.pick({"source": f(1, 0.03), "lam1": f(1, 0.04)}, 1)[0] == "source"
