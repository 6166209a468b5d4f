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
