"""Selection on tiny random models: a given layer writes a loadable file; the full three stages run through the engine."""

from __future__ import annotations

import torch

from directions import extract, selection
from directions.fileformat import load_direction, save_direction
from server.engine.offline import engine_generate
from tests.tiny_models import tiny_extract_data, tiny_model, tiny_tokenizer


def test_extract_given_layer_writes_a_loadable_file(tmp_path):
    model, tok = tiny_model("qwen2"), tiny_tokenizer()
    cfg = selection.SelectConfig(layers=[1, 2], batch_size=4)
    ds = selection.select_and_build(model, tok, tiny_extract_data(), "refusal", cfg, [extract.Candidate("single", 1)])
    path = save_direction(ds, tmp_path / "tiny.safetensors", config=model.config)
    back = load_direction(path)
    back.check_fits(model.config, str(path))
    assert back.name == "refusal" and back.n_layers == model.config.num_hidden_layers
    assert back.has_condition and back.detect_layer in (1, 2)
    md = back.public_metadata()
    assert md["selection"]["chosen"] == "single@1" and md["selection"]["detection"]["val_fire_neg"] <= 0.05
    torch.testing.assert_close(back.directions, ds.directions)
    # the stored threshold keeps validation negatives at or under 5%
    states = extract.collect_states(model, tok, extract.build_prompts(tok, tiny_extract_data().neg_val))
    scores = states[:, back.detect_layer] @ back.detect_vector
    assert float((scores > back.detect_threshold).float().mean()) <= 0.05


def test_full_selection_runs_through_the_engine(tmp_path):
    """Stage 1, stage 2 variants and confirm on a tiny model (tiny prompt counts and token limits)."""
    model, tok = tiny_model("llama"), tiny_tokenizer()
    data = tiny_extract_data()
    data.capability = [{"question": "t5 t6", "answer": "t7", "accept": ["t7"]}]
    cfg = selection.SelectConfig(
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
    ds = selection.select_and_build(
        model, tok, data, "refusal", cfg, generate=engine_generate(model, tok, batch_size=4)
    )
    sel = ds.metadata["selection"]
    assert set(sel["stage1_proxy"]) == {"base", "single@1", "single@2"}
    assert {"orth", "kernel", "perlayer"} <= {k.split("@")[0] for k in sel["stage2_proxy"]}
    assert sel["chosen"] in sel["confirm"]
    for f in sel["confirm"].values():
        assert {"refusal", "first_token_kl", "capability"} <= set(f)
    save_direction(ds, tmp_path / "x.safetensors", config=model.config)
    load_direction(tmp_path / "x.safetensors").check_fits(model.config)
