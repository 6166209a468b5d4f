"""LoRA export on tiny random models: PEFT's adapter at scale s is frankly's hooked model at strength s."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer

from directions.bake import BakeExistsError, UnknownDirection
from directions.hooks import SteeringHooks
from directions.lora import (
    ADAPTER_CONFIG,
    GGUFBase,
    LoraExportError,
    gguf_tensors,
    lora_pairs,
    read_gguf_base,
    write_gguf_adapter,
    write_peft_adapter,
)
from directions.lora_export import MANIFEST, LoraUnsupportedError, export_lora, strength_label
from tests.tiny_models import ARCHS, random_direction_set, save_tiny_dir, tiny_model, tokens

# fp32: B(Ax) and the hook's (y.r) r round differently; over 2-3 layers the logits stay within this.
TOL = 1e-4
SCALES = (0.5, 1.0, -0.5)
NO_BIAS_ARCHS = [a for a in ARCHS if a != "llama_bias"]


def _hooked(model, dirs, strengths, ids):
    hooks = SteeringHooks(model, dirs)
    hooks.set_strengths({n: [s] * ids.shape[0] for n, s in strengths.items()})
    try:
        with torch.no_grad():
            return model(ids).logits
    finally:
        hooks.remove()


def _set_scale(peft_model, scale: float) -> None:
    for m in peft_model.modules():
        if isinstance(m, LoraLayer):
            for name in m.scaling:
                m.scaling[name] = scale


def _peft(arch, path):
    return PeftModel.from_pretrained(tiny_model(arch), str(path)).eval()


@pytest.mark.parametrize("arch", NO_BIAS_ARCHS)
def test_peft_adapter_is_the_hooked_model(arch, tmp_path):
    model = tiny_model(arch)
    ds = random_direction_set(model)
    pairs = lora_pairs(model, ds)
    write_peft_adapter(tmp_path, pairs, "tiny", {"direction": "test"})
    pm = _peft(arch, tmp_path)
    ids = tokens(seed=3, batch=2, length=9)
    with torch.no_grad():
        plain = model(ids).logits
    for s in SCALES:
        _set_scale(pm, s)
        with torch.no_grad():
            got = pm(ids).logits
        want = _hooked(model, {"d": ds}, {"d": s}, ids)
        assert (got - want).abs().max().item() < TOL, (arch, s)
        assert (want - plain).abs().max().item() > 100 * TOL  # the edit does something
    _set_scale(pm, 0.0)
    with torch.no_grad():
        assert torch.equal(pm(ids).logits, plain)


def test_adapter_targets_exactly_the_weighted_writers(tmp_path):
    model = tiny_model("llama")  # 3 layers; random_direction_set zeroes the last layer's weight
    ds = random_direction_set(model)
    pairs = lora_pairs(model, ds)
    cfg = json.loads(write_peft_adapter(tmp_path, pairs, "tiny", {}).joinpath(ADAPTER_CONFIG).read_text())
    assert cfg["r"] == 1 and cfg["lora_alpha"] == 1 and cfg["peft_type"] == "LORA"
    assert set(cfg["target_modules"]) == {
        "model.embed_tokens",
        *(f"model.layers.{i}.self_attn.o_proj" for i in range(2)),
        *(f"model.layers.{i}.mlp.down_proj" for i in range(2)),
    }
    pm = _peft("llama", tmp_path)
    wrapped = {n.removeprefix("base_model.model.") for n, m in pm.named_modules() if isinstance(m, LoraLayer)}
    assert wrapped == set(cfg["target_modules"])


def test_folded_strength_is_the_hooked_model_at_that_strength(tmp_path):
    model = tiny_model("qwen2")
    ds = random_direction_set(model)
    write_peft_adapter(tmp_path, lora_pairs(model, ds, scale=0.7), "tiny", {})
    ids = tokens(seed=4, batch=1, length=8)
    with torch.no_grad():
        got = _peft("qwen2", tmp_path)(ids).logits
    assert (got - _hooked(model, {"d": ds}, {"d": 0.7}, ids)).abs().max().item() < TOL


def test_tied_lm_head_keeps_the_original_weight(tmp_path):
    model = tiny_model("llama_tied")
    ds = random_direction_set(model)
    write_peft_adapter(tmp_path, lora_pairs(model, ds), "tiny", {})
    pm = _peft("llama_tied", tmp_path)
    assert torch.equal(pm.get_output_embeddings().weight, model.get_output_embeddings().weight)


def test_writer_biases_go_to_lora_b_bias(tmp_path):
    model = tiny_model("llama_bias")
    ds = random_direction_set(model)
    with pytest.raises(LoraUnsupportedError, match="llama"):
        from directions.lora_export import _peft_pairs

        _peft_pairs(lora_pairs(model, ds), "llama")
    # Without the embedding (layer 0 weight zero) PEFT can carry the bias edit exactly.
    ds.layer_weights[0] = 0.0
    pairs = lora_pairs(model, ds)
    assert pairs and all(p.bias is not None for p in pairs)
    write_peft_adapter(tmp_path, pairs, "tiny", {})
    assert json.loads((tmp_path / ADAPTER_CONFIG).read_text())["lora_bias"] is True
    pm = _peft("llama_bias", tmp_path)
    ids = tokens(seed=6, batch=2, length=7)
    for s in SCALES:
        _set_scale(pm, s)
        with torch.no_grad():
            got = pm(ids).logits
        assert (got - _hooked(model, {"d": ds}, {"d": s}, ids)).abs().max().item() < TOL
    base = GGUFBase("x.gguf", "llama", {})
    with pytest.raises(LoraExportError, match="bias"):
        gguf_tensors(pairs, base)


def _fake_base_gguf(model, path, tied: bool):
    """A GGUF holding zero tensors under the names and shapes llama.cpp would have for ``model``."""
    import gguf

    cfg = model.config
    w = gguf.GGUFWriter(str(path), arch="llama")
    w.add_tensor("token_embd.weight", np.zeros((cfg.vocab_size, cfg.hidden_size), np.float32))
    if not tied:
        w.add_tensor("output.weight", np.zeros((cfg.vocab_size, cfg.hidden_size), np.float32))
    for i in range(cfg.num_hidden_layers):
        heads = cfg.num_attention_heads * (cfg.hidden_size // cfg.num_attention_heads)
        w.add_tensor(f"blk.{i}.attn_output.weight", np.zeros((cfg.hidden_size, heads), np.float32))
        w.add_tensor(f"blk.{i}.ffn_down.weight", np.zeros((cfg.hidden_size, cfg.intermediate_size), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return read_gguf_base(path)


def test_gguf_adapter_layout(tmp_path):
    import gguf

    model = tiny_model("llama")
    ds = random_direction_set(model)
    pairs = lora_pairs(model, ds)
    base = _fake_base_gguf(model, tmp_path / "base.gguf", tied=False)
    write_gguf_adapter(tmp_path / "a.gguf", pairs, base, {"name": "t"})
    r = gguf.GGUFReader(str(tmp_path / "a.gguf"))
    assert r.get_field("general.type").contents() == "adapter"
    assert r.get_field("adapter.type").contents() == "lora"
    assert r.get_field("adapter.lora.alpha").contents() == pytest.approx(1.0)
    assert r.get_field("general.architecture").contents() == "llama"
    t = {x.name: x for x in r.tensors}
    # GGUF lists dimensions fastest-first: ne = [in, 1] for lora_a, [1, d_model] for lora_b.
    assert t["blk.0.attn_output.weight.lora_a"].shape.tolist() == [64, 1]
    assert t["blk.0.ffn_down.weight.lora_a"].shape.tolist() == [128, 1]
    assert t["blk.1.ffn_down.weight.lora_b"].shape.tolist() == [1, 64]
    assert t["token_embd.weight.lora_a"].shape.tolist() == [1, 128]  # rows picked by token id
    assert t["token_embd.weight.lora_b"].shape.tolist() == [1, 64]
    assert "blk.2.ffn_down.weight.lora_a" not in t  # layer weight 0: no adapter
    # The values: lora_b @ lora_a is the weight delta at scale 1, in GGUF's numpy layout.
    emb = model.get_input_embeddings().weight
    delta = (
        torch.from_numpy(np.array(t["token_embd.weight.lora_a"].data))
        @ torch.from_numpy(np.array(t["token_embd.weight.lora_b"].data)).T
    )
    r0, c0 = ds.directions[0], float(ds.layer_weights[0])
    assert torch.allclose(delta, -c0 * torch.outer(emb @ r0, r0), atol=1e-6)


def test_export_directory(tmp_path):
    model = tiny_model("llama")
    src = save_tiny_dir(model, tmp_path / "src")
    dirs = {"a": random_direction_set(model, "a", seed=1), "b": random_direction_set(model, "b", seed=2)}
    base = _fake_base_gguf(model, tmp_path / "base.gguf", tied=True)
    seen = []
    out = export_lora(
        src,
        dirs,
        tmp_path / "out",
        strengths=[0.5, 1],
        gguf_base=base.path,
        progress=lambda f, m: seen.append(f),
    )
    man = json.loads((out / MANIFEST).read_text())
    names = [a["name"] for a in man["adapters"]]
    assert names == ["a", "b", "a-0.5", "a-1.0", "b-0.5", "b-1.0"]
    for a in man["adapters"]:
        assert (out / a["peft"] / "adapter_model.safetensors").is_file()
        assert (out / a["gguf"]).is_file()
        # the fake base ties its LM head to token_embd: auto leaves the embedding out and says so
        assert a["gguf_embedding"] is False and any("token_embd" in n for n in a["notes"])
    assert seen[0] == 0.0 and seen[-1] == 1.0 and seen == sorted(seen)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]
    with pytest.raises(BakeExistsError):
        export_lora(src, dirs, tmp_path / "out", formats=["peft"])
    with pytest.raises(UnknownDirection):
        export_lora(src, dirs, tmp_path / "out2", names=["nope"], formats=["peft"])
    assert strength_label(1) == "1.0" and strength_label(-0.25) == "-0.25"
