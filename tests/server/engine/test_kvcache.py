"""Batch KV cache: rows join (left-padded concat) and leave (index select); growable layers."""

from __future__ import annotations

import torch

from server.engine import kvcache


def test_kvcache_join_and_leave():
    def cache(b, t, fill):
        c = kvcache.new_cache()
        c.update(torch.full((b, 2, t, 3), fill), torch.full((b, 2, t, 3), fill), 0)
        return c, torch.ones(b, t, dtype=torch.long)

    a, ma = cache(2, 5, 1.0)
    b, mb = cache(1, 3, 2.0)
    c, m = kvcache.merge(a, ma, b, mb)
    assert c.layers[0].keys.shape == (3, 2, 5, 3)
    assert m.tolist()[2] == [0, 0, 1, 1, 1]
    assert torch.all(c.layers[0].keys[2, :, :2] == 0) and torch.all(c.layers[0].keys[2, :, 2:] == 2.0)
    c, m = kvcache.select(c, m, [2])  # only the short row left: padding columns dropped
    assert m.tolist() == [[1, 1, 1]] and c.layers[0].keys.shape == (1, 2, 3, 3)


def test_kvcache_growable_layer_matches_concatenation():
    """In-place appends give the same tensors as DynamicLayer's concatenation, across
    regrowth and after a row leave replaced the tensors from outside."""
    from transformers.cache_utils import DynamicLayer

    kvcache.GrowableLayer.headroom = 4
    try:
        g, ref = kvcache.GrowableLayer(), DynamicLayer()
        gen = torch.Generator().manual_seed(0)
        for step, q in enumerate([5, 1, 1, 1, 1, 1, 1, 3, 1]):
            k, v = torch.randn(2, 2, q, 3, generator=gen), torch.randn(2, 2, q, 3, generator=gen)
            gk, gv = g.update(k, v)
            rk, rv = ref.update(k, v)
            assert torch.equal(gk, rk) and torch.equal(gv, rv), step
        assert g.keys.shape[2] == 15 and g._kbuf.shape[2] > 15  # spare room left
        buf = g._kbuf
        g.update(torch.zeros(2, 2, 1, 3), torch.zeros(2, 2, 1, 3))
        assert g._kbuf is buf  # a decode step writes in place
        g.keys, g.values = g.keys[1:, :, 2:], g.values[1:, :, 2:]  # what kvcache.select does
        expect_k, expect_v = g.keys.clone(), g.values.clone()
        k = torch.ones(1, 2, 1, 3)
        gk, gv = g.update(k, 2 * k)
        assert g._kbuf is not buf and gk.shape == (1, 2, 15, 3)
        assert torch.equal(gk[:, :, :-1], expect_k) and torch.equal(gv[:, :, :-1], expect_v)
        assert torch.equal(gk[:, :, -1:], k) and torch.equal(gv[:, :, -1:], 2 * k)
    finally:
        kvcache.GrowableLayer.headroom = 128


def test_a_bf16_cache_stores_bf16_and_survives_joins_and_leaves():
    def cache(b, t, fill):
        c = kvcache.new_cache(torch.bfloat16)
        c.update(torch.full((b, 2, t, 3), fill), torch.full((b, 2, t, 3), fill), 0)
        return c, torch.ones(b, t, dtype=torch.long)

    a, ma = cache(2, 5, 1.0 / 3)
    b, mb = cache(1, 3, 2.0)
    assert a.layers[0].keys.dtype == torch.bfloat16
    assert a.layers[0].keys[0, 0, 0, 0] == torch.tensor(1.0 / 3).to(torch.bfloat16)  # rounded once
    c, m = kvcache.merge(a, ma, b, mb)
    k, _ = c.layers[0].update(torch.ones(3, 2, 1, 3), torch.ones(3, 2, 1, 3))  # a decode step after the join
    assert k.dtype == torch.bfloat16 and k.shape == (3, 2, 6, 3)
    c, m = kvcache.select(c, m, [0])
    assert c.layers[0].keys.dtype == torch.bfloat16
    assert type(kvcache.new_cache(torch.bfloat16).layer_class_to_replicate) is type(
        kvcache.new_cache(torch.bfloat16).layer_class_to_replicate
    )


def test_a_bf16_cache_under_fp32_activations_decodes_like_the_fp32_cache():
    """set_kv_cache_dtype: keys and values stored in bf16, everything computed in fp32; a tiny model's
    next-token distributions stay within bf16 rounding of the fp32 cache's."""
    from directions.models import kv_cache_dtype, set_kv_cache_dtype
    from tests.tiny_models import tiny_model, tokens

    model = tiny_model("qwen2")
    ids = tokens(seed=2, batch=2, length=9)

    def decode(kv):
        set_kv_cache_dtype(model, kv)
        cache = kvcache.new_cache(kv_cache_dtype(model))
        logps = []
        with torch.no_grad():
            out = model(input_ids=ids, past_key_values=cache, use_cache=True)
            for _ in range(6):
                lp = out.logits[:, -1].float().log_softmax(-1)
                logps.append(lp)
                out = model(input_ids=lp.argmax(-1, keepdim=True), past_key_values=cache, use_cache=True)
        return torch.stack(logps), cache

    ref, c32 = decode(None)
    got, c16 = decode(torch.bfloat16)
    assert c32.layers[0].keys.dtype == torch.float32 and c16.layers[0].keys.dtype == torch.bfloat16
    kl = (ref.exp() * (ref - got)).sum(-1)
    assert 0 < kl.max() < 1e-3  # changed (keys and values rounded), but only by that
    assert model.config._attn_implementation == "frankly_sdpa_stored_kv"


def test_load_model_refuses_an_unknown_kv_dtype():
    import pytest

    from directions.models import ModelLoadError, load_model

    with pytest.raises(ModelLoadError, match="KV cache dtype"):
        load_model("demo", kv_dtype="float16")
