"""The lean decoder layers (``directions.lean``) and their ops: each against transformers' own
modules, the fallbacks that keep every hook and kernel switch exact, and steering through them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import DynamicCache

from directions import kernels, lean
from directions.quant import fuse_shared_inputs, quantize_model
from tests.tiny_models import random_direction_set, tiny_model, tokens


def _int8(arch: str, seed: int = 0):
    model = tiny_model(arch, seed=seed)
    quantize_model(model, compute_dtype=torch.float32)
    fuse_shared_inputs(model)
    return model


def _decode(model, ids, steps: int = 6):
    """Greedy tokens and the last logits through a KV cache (prefill, then one token a step)."""
    cache = DynamicCache()
    out = model(ids, cache=cache, use_cache=True)
    toks = [out.logits[:, -1].argmax(-1)]
    for _ in range(steps):
        out = model(toks[-1][:, None], cache=cache, use_cache=True)
        toks.append(out.logits[:, -1].argmax(-1))
    return torch.stack(toks, 1), out.logits


def test_rms_norm_ops_match_transformers_norm(built):
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm

    norm = Qwen2RMSNorm(200, eps=1e-5)
    norm.weight.data = torch.randn(200)
    x, a = torch.randn(2, 3, 200) * 40, torch.randn(2, 3, 200)
    torch.testing.assert_close(torch.ops.frankly.rms_norm(x, norm.weight.data, 1e-5), norm(x).detach())
    s, n = torch.ops.frankly.add_rms_norm(x, a, norm.weight.data, 1e-5)
    assert torch.equal(s, x + a)
    torch.testing.assert_close(n, norm(x + a).detach())
    with pytest.raises(RuntimeError, match="w must be float32"):
        torch.ops.frankly.rms_norm(x, torch.randn(199), 1e-5)
    with pytest.raises(RuntimeError, match="x must be float32"):
        torch.ops.frankly.rms_norm(x.bfloat16(), norm.weight.data, 1e-5)


@pytest.mark.parametrize("cos_batch", [1, 2])
def test_qkv_rope_splits_heads_and_rotates_like_transformers(built, cos_batch):
    from transformers.models.qwen2.modeling_qwen2 import apply_rotary_pos_emb

    B, T, H, KV, D = 2, 5, 6, 2, 16
    qkv = torch.randn(B, T, (H + 2 * KV) * D)
    cos, sin = torch.randn(cos_batch, T, D), torch.randn(cos_batch, T, D)
    q, k, v = torch.ops.frankly.qkv_rope(qkv, cos, sin, H, KV)
    qs, ks, vs = qkv.split([H * D, KV * D, KV * D], -1)
    qs, ks, vs = (t.view(B, T, -1, D).transpose(1, 2) for t in (qs, ks, vs))
    want_q, want_k = apply_rotary_pos_emb(qs, ks, cos, sin)
    torch.testing.assert_close(q, want_q)
    torch.testing.assert_close(k, want_k)
    assert torch.equal(v, vs)
    with pytest.raises(RuntimeError, match="do not split"):
        torch.ops.frankly.qkv_rope(qkv, cos, sin, H + 1, KV)
    with pytest.raises(RuntimeError, match="cos and sin"):
        torch.ops.frankly.qkv_rope(qkv, cos[:, :-1], sin[:, :-1], H, KV)


@pytest.mark.parametrize("arch", ["qwen2", "llama", "llama_bias", "mistral", "mistral_window"])
def test_lean_layers_decode_like_transformers_forward(built, arch):
    model = _int8(arch.removesuffix("_window"))
    if arch == "mistral_window":  # Mistral reads its window from the config at each call: 7 prompt + 6 steps pass it
        model.config.sliding_window = 5
    ids = tokens(seed=5, batch=3)
    with torch.no_grad():
        want_toks, want = _decode(model, ids)
        assert lean.install(model) == model.config.num_hidden_layers
        assert all(lean.lean_ready(layer, torch.zeros(1, 1, 64)) for layer in model.model.layers)
        got_toks, got = _decode(model, ids)
    torch.testing.assert_close(got, want, atol=2e-4, rtol=2e-4)
    assert torch.equal(got_toks, want_toks)
    if arch == "mistral_window":  # the window was in force: without it the same model decodes otherwise
        model.config.sliding_window = None
        with torch.no_grad():
            assert not torch.allclose(_decode(model, ids)[1], got, atol=1e-3)
    assert lean.uninstall(model) == model.config.num_hidden_layers
    assert "forward" not in vars(model.model.layers[0])


def test_lean_layers_skip_what_they_cannot_run(built):
    assert lean.install(_int8("gemma")) == 0  # another block (GeGLU, scaled embeddings): transformers' forward
    plain = tiny_model("qwen2")
    quantize_model(plain, compute_dtype=torch.float32)
    assert lean.install(plain) == 0  # q/k/v not stacked: nothing to call in one go
    with kernels.using("aten"):
        assert lean.install(_int8("qwen2")) == 0


def test_a_hook_or_a_kernel_switch_sends_a_layer_back_to_transformers_forward(built):
    model = _int8("qwen2")
    ids = tokens(seed=9, batch=2)
    with torch.no_grad():
        hf = model(ids).logits
        lean.install(model)
        fast = model(ids).logits
        assert not torch.equal(fast, hf)  # the lean path ran (its sums round differently)
        seen = []
        handle = model.model.layers[1].mlp.register_forward_hook(lambda m, i, o: seen.append(o.shape))
        try:
            hooked = model(ids).logits
        finally:
            handle.remove()
        assert seen == [(2, ids.shape[1], 64)]  # the hook saw its module, and the layer went the long way
        layer1 = model.model.layers[1]
        assert lean.lean_ready(layer1, torch.zeros(1, 1, 64))
        assert not torch.equal(hooked, fast) and not torch.equal(hooked, hf)  # only layer 1 went back
        handle = torch.nn.modules.module.register_module_forward_hook(lambda m, i, o: None)
        try:
            assert torch.equal(model(ids).logits, hf)  # a global hook: every layer is transformers'
        finally:
            handle.remove()
        with kernels.using("aten"):
            assert not lean.lean_ready(layer1, torch.zeros(1, 1, 64))
        down = layer1.mlp.down_proj
        layer1.mlp.down_proj = torch.nn.Sequential(down)  # a module swapped in since (an adapter, say)
        assert not lean.lean_ready(layer1, torch.zeros(1, 1, 64))
        layer1.mlp.down_proj = down
        model.train()
        assert not lean.lean_ready(layer1, torch.zeros(1, 1, 64))
        model.eval()
        assert torch.equal(model(ids).logits, fast)


def test_steering_and_the_probe_work_through_lean_layers(built):
    from directions.hooks import SteeringHooks

    model = _int8("qwen2")
    dirs = {"a": random_direction_set(model, "a", seed=1)}
    ids = tokens(seed=3, batch=3)
    strengths = {"a": [1.0, 0.0, -0.5]}

    def steered():
        hooks = SteeringHooks(model, dirs)
        hooks.set_strengths(strengths)
        try:
            with torch.no_grad(), hooks.probe({1}) as captured:
                logits = model(ids).logits
            return logits, {k: v.clone() for k, v in captured.items()}
        finally:
            hooks.remove()

    with torch.no_grad():
        plain_hf = model(ids).logits
    want, want_cap = steered()
    assert lean.install(model) == model.config.num_hidden_layers
    with torch.no_grad():
        plain = model(ids).logits
    got, got_cap = steered()
    torch.testing.assert_close(got, want, atol=2e-4, rtol=2e-4)
    torch.testing.assert_close(got_cap[1], want_cap[1], atol=2e-4, rtol=2e-4)  # the layer's pre-hook still fires
    assert torch.equal(got[1], plain[1])  # strength 0: the lean plain model's row, bit for bit
    assert (got[0] - plain[0]).abs().max() > 1e-2
    assert not torch.equal(plain, plain_hf)  # (the lean path did run)


def _huge_kib_at(address: int) -> int | None:
    """AnonHugePages (KiB) of this process's mapping that holds address; None when none does.

    Per mapping, not the process total: other tests' huge pages come and go (freed tensors,
    khugepaged), so a process-wide difference can go down while this mapping's pages went up.
    """
    holds = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split(maxsplit=1)[0]
        if "-" in head and not head.endswith(":"):
            lo, hi = (int(x, 16) for x in head.split("-"))
            holds = lo <= address < hi
        elif holds and line.startswith("AnonHugePages:"):
            return int(line.split()[1])
    return None


def _thp_available() -> bool:
    try:
        mode = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return False
    return "[never]" not in mode


def test_to_huge_pages_moves_a_storage_and_every_view_follows(built):
    w = torch.randint(-127, 128, (5000, 896), dtype=torch.int8)  # 4.3 MiB
    rows, copy = w[100:200], w.clone()
    x, s = torch.randn(2, 896), torch.rand(5000)
    want = torch.ops.frankly.int8_linear(x, w, s, None)
    before = w.data_ptr()
    assert torch.ops.frankly.to_huge_pages(w) == w.numel()
    assert w.data_ptr() != before and w.data_ptr() % (2 << 20) == 0
    assert rows.data_ptr() == w.data_ptr() + 100 * 896  # the view shares the moved storage
    assert torch.equal(w, copy) and torch.equal(rows, copy[100:200])
    assert torch.equal(torch.ops.frankly.int8_linear(x, w, s, None), want)
    moved = w.data_ptr()
    if _thp_available():  # two whole 2 MiB stretches advised: the kernel backs them with huge pages
        assert (_huge_kib_at(moved) or 0) >= 4096
    small = torch.zeros(1000, 1000, dtype=torch.int8)
    assert torch.ops.frankly.to_huge_pages(small) == 0  # under 2 MiB: left where it is
    del rows, w  # the mapping is unmapped with its last tensor
    assert not _huge_kib_at(moved)  # unmapped (None), or the address reused without huge pages


def test_weights_to_huge_pages_moves_each_quantized_storage_once(built, monkeypatch):
    from directions.quant import Int8Linear, weights_to_huge_pages

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        Int8Linear.from_linear(torch.nn.Linear(1024, 3072), compute_dtype=torch.float32),
        Int8Linear.from_linear(torch.nn.Linear(3072, 64), compute_dtype=torch.float32),  # 192 KiB
    )
    x = torch.randn(3, 1024)
    with torch.no_grad():
        want = model(x)
    monkeypatch.setenv("FRANKLY_HUGE_PAGES", "0")
    assert weights_to_huge_pages(model) == 0
    monkeypatch.delenv("FRANKLY_HUGE_PAGES")
    with kernels.using("aten"):
        assert weights_to_huge_pages(model) == 0  # frankly's library is what moves them
    assert weights_to_huge_pages(model) == 3072 * 1024
    assert model[0].weight_q.data_ptr() % (2 << 20) == 0
    with torch.no_grad():
        assert torch.equal(model(x), want)
