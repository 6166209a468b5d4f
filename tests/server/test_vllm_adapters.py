"""The adapters ``--engine vllm`` writes: one per exported combination, strengths folded in, a
several-direction combination as one rank-k adapter equal to the sum of the rank-1 edits; the
model view without the GGUF quantization_config; the combination flags."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from directions.lora import lora_pairs
from server.engine.vllm_adapters import (
    adapter_name,
    combinations_for,
    ensure_adapters,
    parse_combination,
    stacked_pairs,
    vllm_model_dir,
)
from tests.tiny_models import random_direction_set, save_tiny_dir, tiny_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    model = tiny_model("qwen2")
    dirs = {"a": random_direction_set(model, "a", seed=1), "b": random_direction_set(model, "b", seed=2)}
    path = save_tiny_dir(model, tmp_path_factory.mktemp("tiny"))
    return model, dirs, path


def test_combinations_and_names(tiny):
    _, dirs, _ = tiny
    combos = combinations_for(dirs, [0.5, 1.0, 0.0], [parse_combination("b=0.5,a=1", dirs)])
    assert combos == [(("a", 0.5),), (("a", 1.0),), (("b", 0.5),), (("b", 1.0),), (("a", 1.0), ("b", 0.5))]
    assert [adapter_name(c) for c in combos][-1] == "a-1.0+b-0.5"
    assert parse_combination("a=1+b=-0.5", dirs) == (("a", 1.0), ("b", -0.5))
    for bad in ("a", "c=1", "a=0"):
        with pytest.raises(ValueError):
            parse_combination(bad, dirs)


def test_stacked_adapter_is_the_sum_of_the_edits(tiny):
    model, dirs, _ = tiny
    combo = (("a", 1.0), ("b", 0.5))
    pairs = {p.module: p for p in stacked_pairs(model, dirs, combo)}
    one = {n: {p.module: p for p in lora_pairs(model, dirs[n], scale=s)} for n, s in combo}
    assert not any(p.kind == "embed" for p in pairs.values())  # vLLM refuses embed_tokens targets
    assert set(pairs) == {m for d in one.values() for m, p in d.items() if p.kind != "embed"}
    for m, p in pairs.items():
        assert p.A.shape[0] == 2 and p.B.shape[1] == 2
        want = sum(d[m].B @ d[m].A for d in one.values() if m in d)
        torch.testing.assert_close(p.B @ p.A, want, rtol=0, atol=1e-6)


def test_peft_applies_the_written_adapter_at_scale_one(tiny, tmp_path):
    import peft  # the lora extra (scripts/ci.sh installs it)
    from transformers import AutoModelForCausalLM

    model, dirs, path = tiny
    combo = (("a", 1.0), ("b", 0.5))
    out = ensure_adapters(path, dirs, [(("a", 0.5),), combo], tmp_path)
    cfg = json.loads((out[combo] / "adapter_config.json").read_text())
    assert cfg["r"] == cfg["lora_alpha"] == 2
    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    merged = peft.PeftModel.from_pretrained(base, str(out[combo])).merge_and_unload()
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).state_dict()
    for p in stacked_pairs(model, dirs, combo):
        delta = merged.state_dict()[f"{p.module}.weight"] - ref[f"{p.module}.weight"]
        torch.testing.assert_close(delta, p.B @ p.A, rtol=0, atol=1e-5)
    again = ensure_adapters(path, dirs, [(("a", 0.5),), combo], tmp_path)  # cached: not written again
    assert (
        again == out
        and (out[combo] / "adapter_model.safetensors").stat().st_mtime_ns
        == (again[combo] / "adapter_model.safetensors").stat().st_mtime_ns
    )


def test_model_view_drops_the_gguf_quantization_config(tmp_path):
    src = tmp_path / "converted"
    src.mkdir()
    (src / "model.safetensors").write_bytes(b"x")
    (src / "config.json").write_text(json.dumps({"a": 1, "quantization_config": {"quant_method": "gguf"}}))
    view = vllm_model_dir(str(src), tmp_path / "cache")
    assert view != str(src) and json.loads((Path(view) / "config.json").read_text()) == {"a": 1}
    assert (Path(view) / "model.safetensors").resolve() == (src / "model.safetensors").resolve()
    (src / "config.json").write_text(json.dumps({"a": 1}))
    assert vllm_model_dir(str(src), tmp_path / "cache") == str(src)  # a plain directory is passed as it is
    assert vllm_model_dir("Qwen/Qwen2.5-0.5B-Instruct", tmp_path / "cache") == "Qwen/Qwen2.5-0.5B-Instruct"
