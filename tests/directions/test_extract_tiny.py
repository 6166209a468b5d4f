"""Extraction on tiny random models: means, candidates, convention, detection, a loadable file."""

from __future__ import annotations

import random

import pytest
import torch

from directions import extract
from directions.fileformat import CONVENTION, load_direction, save_direction
from directions.writers import decoder_layers
from tests.tiny_models import save_tiny_dir, tiny_model, tiny_tokenizer


def _prompts(lo: int, hi: int, n: int, seed: int) -> list[str]:
    rnd = random.Random(seed)
    return [" ".join(f"t{rnd.randrange(lo, hi)}" for _ in range(rnd.randrange(3, 9))) for _ in range(n)]


def _data(n_train=12, n_val=10) -> extract.ExtractData:
    return extract.ExtractData(
        pos_train=_prompts(3, 40, n_train, 1),
        neg_train=_prompts(60, 100, n_train, 2),
        pos_val=_prompts(3, 40, n_val, 3),
        neg_val=_prompts(60, 100, n_val, 4),
    )


def test_states_follow_the_file_convention():
    """states[:, i] is the input of decoder layer i at the last prompt token, also under left padding."""
    model, tok = tiny_model("llama"), tiny_tokenizer()
    prompts = extract.build_prompts(tok, ["t5 t6 t7 t8 t9", "t10"])
    captured = {}
    layers = decoder_layers(model)
    handles = [
        layers[i].register_forward_pre_hook(
            lambda m, a, k, i=i: captured.__setitem__(i, (a[0] if a else k["hidden_states"])[0, -1].clone()),
            with_kwargs=True,
        )
        for i in range(len(layers))
    ]
    try:
        states = extract.collect_states(model, tok, prompts, batch_size=2)  # batch: prompt 1 is left padded
        assert states.shape == (2, len(layers), model.config.hidden_size)
        for j, p in enumerate(prompts):
            captured.clear()
            with torch.no_grad():
                model(torch.tensor([p]))
            for i in range(len(layers)):
                torch.testing.assert_close(states[j, i], captured[i], atol=1e-4, rtol=1e-4)
    finally:
        for h in handles:
            h.remove()
    assert "input of decoder layer i" in CONVENTION


def test_means_and_candidate_kinds():
    g = torch.Generator().manual_seed(0)
    pos, neg = torch.randn(5, 4, 16, generator=g) + 2.0, torch.randn(7, 4, 16, generator=g)
    m = extract.Means.from_states(pos, neg)
    assert m.pos.dtype == torch.float64 and m.n_pos == 5 and m.n_neg == 7
    torch.testing.assert_close(m.diff, pos.double().mean(0) - neg.double().mean(0))

    d, w = extract.candidate_tensors(m, extract.Candidate("single", 2))
    r = m.diff[2] / m.diff[2].norm()
    assert d.shape == (4, 16) and torch.equal(w, torch.ones(4))
    for row in d:
        torch.testing.assert_close(row, r.float())

    d, _ = extract.candidate_tensors(m, extract.Candidate("orth", 2))
    assert abs(float(d[0].double() @ m.neg[2])) < 1e-4 * float(m.neg[2].norm())
    assert torch.allclose(d.norm(dim=-1), torch.ones(4))

    d, w = extract.candidate_tensors(m, extract.Candidate("kernel", 1, sigma=1.0))
    assert float(w[1]) == 1.0 and w[0] == w[2] and w[3] < w[2] < 1.0

    d, w = extract.candidate_tensors(m, extract.Candidate("perlayer", 0))
    for i in range(4):
        torch.testing.assert_close(d[i], (m.diff[i] / m.diff[i].norm()).float())


def test_threshold_at_fpr():
    neg = [float(x) for x in range(100)]  # 0..99
    thr = extract.threshold_at_fpr(neg, 0.05)
    assert sum(x > thr for x in neg) == 5 and 94 < thr < 95
    assert sum(x > extract.threshold_at_fpr(neg[:10], 0.05) for x in neg[:10]) == 0  # floor(0.5) = 0 may fire
    assert extract.parse_layers("1-3,5,7-11:2", 12) == [1, 2, 3, 5, 7, 9, 11]
    with pytest.raises(ValueError):
        extract.parse_layers("12", 12)


def test_lda_detection_beats_the_mean_difference_when_spread_hides_the_gap():
    """Constructed data with a known answer: the classes differ by 1 on axes 0 and 1, but axis 1
    carries a within-class spread of sd 5. LDA must find ~axis 0 (Sigma^-1 dmu) and separate the
    classes; the mean difference, half on the noisy axis, cannot."""
    g = torch.Generator().manual_seed(0)
    d, n = 6, 400

    def sample(mu):
        x = torch.randn(n, d, generator=g) * 0.2
        x[:, 1] *= 25.0
        return x + torch.tensor(mu)

    pos, neg = sample([1.0, 1.0, 0, 0, 0, 0]), sample([0.0] * d)
    w = extract.lda_vector(pos, neg, shrinkage=1e-3)
    assert abs(float(w[0])) > 0.99 and float(w[0]) > 0  # the clean axis, pointing to the positives
    states = lambda x: x.unsqueeze(1)  # noqa: E731  (N, 1 layer, d)
    half = n // 2
    det = extract.calibrate_detection(
        pos.mean(0) - neg.mean(0),
        states(pos[half:]),
        states(neg[half:]),
        [0],
        fpr=0.02,
        check=(states(pos[:half]), states(neg[:half])),
        shrinkages=(1e-3,),
    )
    kinds = {c["kind"]: c for c in det.record["candidates"]}
    assert kinds["mean-diff"]["fire_pos"] < 0.5 < 0.95 < kinds["lda/0.001"]["fire_pos"]
    assert det.record["chosen_kind"] == "lda/0.001" and det.record["val_fire_neg"] <= 0.02
    assert det.record["train_fire_pos"] > 0.95


def test_extract_given_layer_writes_a_loadable_file(tmp_path):
    model, tok = tiny_model("qwen2"), tiny_tokenizer()
    cfg = extract.SelectConfig(layers=[1, 2], batch_size=4)
    ds = extract.select_and_build(model, tok, _data(), "refusal", cfg, [extract.Candidate("single", 1)])
    path = save_direction(ds, tmp_path / "tiny.safetensors", config=model.config)
    back = load_direction(path)
    back.check_fits(model.config, str(path))
    assert back.name == "refusal" and back.n_layers == model.config.num_hidden_layers
    assert back.has_condition and back.detect_layer in (1, 2)
    md = back.public_metadata()
    assert md["selection"]["chosen"] == "single@1" and md["selection"]["detection"]["val_fire_neg"] <= 0.05
    torch.testing.assert_close(back.directions, ds.directions)
    # the stored threshold keeps validation negatives at or under 5%
    states = extract.collect_states(model, tok, extract.build_prompts(tok, _data().neg_val))
    scores = states[:, back.detect_layer] @ back.detect_vector
    assert float((scores > back.detect_threshold).float().mean()) <= 0.05


def test_full_selection_runs_through_the_engine(tmp_path):
    """Stage 1, stage 2 variants and confirm on a tiny model (tiny prompt counts and token limits)."""
    model, tok = tiny_model("llama"), tiny_tokenizer()
    data = _data()
    data.capability = [{"question": "t5 t6", "answer": "t7", "accept": ["t7"]}]
    cfg = extract.SelectConfig(
        layers=[1, 2],
        proxy_n=4,
        proxy_tokens=3,
        confirm_top=2,
        confirm_n=4,
        confirm_tokens=4,
        capability_tokens=2,
        kl_budget=100.0,
        batch_size=4,
    )
    ds = extract.select_and_build(model, tok, data, "refusal", cfg)
    sel = ds.metadata["selection"]
    assert set(sel["stage1_proxy"]) == {"base", "single@1", "single@2"}
    assert {"orth", "kernel", "perlayer"} <= {k.split("@")[0] for k in sel["stage2_proxy"]}
    assert sel["chosen"] in sel["confirm"]
    for f in sel["confirm"].values():
        assert {"refusal", "first_token_kl", "capability"} <= set(f)
    save_direction(ds, tmp_path / "x.safetensors", config=model.config)
    load_direction(tmp_path / "x.safetensors").check_fits(model.config)


def test_cli_extract_on_a_tiny_model_directory(tmp_path):
    from server.cli import main

    model_dir = save_tiny_dir(tiny_model("llama"), tmp_path / "model")
    data = _data()
    files = {}
    for k in ("pos_train", "neg_train", "pos_val", "neg_val"):
        files[k] = tmp_path / f"{k}.txt"
        files[k].write_text("\n".join(getattr(data, k)) + "\n")
    cap = tmp_path / "cap.jsonl"
    cap.write_text('{"question": "t5", "answer": "t6", "accept": ["t6"]}\n')
    out = tmp_path / "out.safetensors"
    rc = main(
        [
            "extract",
            "--model",
            model_dir,
            "--positive",
            str(files["pos_train"]),
            "--negative",
            str(files["neg_train"]),
            "--val-positive",
            str(files["pos_val"]),
            "--val-negative",
            str(files["neg_val"]),
            "--name",
            "refusal",
            "--out",
            str(out),
            "--layer",
            "1",
            "--capability",
            str(cap),
        ]
    )
    assert rc == 0
    ds = load_direction(out)
    md = ds.public_metadata()
    assert md["objective"] == "refusal" and md["chosen_layer"] == "1"
    assert set(md["prompt_hashes"]) >= {"positive", "negative", "val_positive", "val_negative"}
    assert len(md["prompt_hashes"]["positive"]["sha256"]) == 64
    ds.check_fits(tiny_model("llama").config)


def test_cli_eval_on_a_tiny_model_directory(tmp_path):
    """``frankly eval`` end to end (always + auto rows, JSON, PNG) with tiny limits."""
    import json

    from server.cli import main

    model = tiny_model("llama")
    model_dir = save_tiny_dir(model, tmp_path / "model")
    tok = tiny_tokenizer()
    ds = extract.select_and_build(
        model, tok, _data(), "refusal", extract.SelectConfig(layers=[1], batch_size=4), [extract.Candidate("single", 1)]
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
            "--out-dir",
            str(out),
        ]
    )
    assert rc == 0
    res = json.loads((out / "eval.json").read_text())
    assert (out / "eval.png").stat().st_size > 1000
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


def test_cli_calibrate_rewrites_only_the_condition(tmp_path):
    from server.cli import main

    model = tiny_model("llama")
    model_dir = save_tiny_dir(model, tmp_path / "model")
    tok = tiny_tokenizer()
    data = _data(n_train=16, n_val=12)
    ds = extract.select_and_build(
        model,
        tok,
        data,
        "refusal",
        extract.SelectConfig(layers=[1], batch_size=4, detect=False),
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
