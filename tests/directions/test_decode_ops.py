"""frankly's small decode-step ops (``directions/kernels/int8_linear.cpp``) against torch's own:
``decode_attention`` (a decode step's attention over a bf16 or fp32 cache), ``silu_mul`` (the MLP's
activation), ``argmax_rows`` (greedy tokens), and where the engine and the model use them."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from directions import models


def _sdpa(q, k, v, keep, scale):
    """transformers' SDPA result layout [B, 1, H, D] from torch's own SDPA in fp32."""
    out = F.scaled_dot_product_attention(q, k.float(), v.float(), attn_mask=keep, scale=scale, enable_gqa=True)
    return out.transpose(1, 2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize(("b", "h", "kv", "length", "d"), [(1, 14, 2, 37, 64), (3, 4, 4, 9, 16), (2, 6, 3, 150, 20)])
def test_decode_attention_matches_sdpa_on_cache_views_with_padding(built, dtype, b, h, kv, length, d):
    g = torch.Generator().manual_seed(length + d)
    q = torch.randn(b, h, 1, d, generator=g)
    # the engine's cache hands attention views of larger buffers: the first `length` of `length + 7` positions
    kb = torch.randn(b, kv, length + 7, d, generator=g).to(dtype)
    vb = torch.randn(b, kv, length + 7, d, generator=g).to(dtype)
    k, v = kb[:, :, :length], vb[:, :, :length]
    keep = torch.ones(b, 1, 1, length, dtype=torch.bool)
    keep[0, ..., : length // 3] = False  # row 0 left-padded
    for mask in (keep, None, keep[:1]):
        want = _sdpa(q, k, v, mask, 0.3)
        got = torch.ops.frankly.decode_attention(q, k, v, mask, 0.3)
        assert got.shape == (b, 1, h, d)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-6)


def test_decode_attention_ignores_whatever_sits_in_masked_positions(built):
    """A left-padded row gives exactly its unpadded result: masked positions add nothing, even NaN."""
    g = torch.Generator().manual_seed(1)
    q = torch.randn(1, 4, 1, 8, generator=g)
    k, v = torch.randn(1, 2, 10, 8, generator=g), torch.randn(1, 2, 10, 8, generator=g)
    alone = torch.ops.frankly.decode_attention(q, k[:, :, 3:], v[:, :, 3:], None, 0.5)
    k[:, :, :3], v[:, :, :3] = float("nan"), 1e30
    keep = torch.ones(1, 1, 1, 10, dtype=torch.bool)
    keep[..., :3] = False
    assert torch.equal(torch.ops.frankly.decode_attention(q, k, v, keep, 0.5), alone)


def test_decode_attention_refuses_shapes_it_cannot_run(built):
    q, k = torch.randn(1, 4, 1, 8), torch.randn(1, 2, 5, 8)
    with pytest.raises(RuntimeError, match="q must be float32"):
        torch.ops.frankly.decode_attention(torch.randn(1, 4, 2, 8), k, k, None, 1.0)
    with pytest.raises(RuntimeError, match="do not match"):
        torch.ops.frankly.decode_attention(torch.randn(1, 3, 1, 8), k, k, None, 1.0)
    with pytest.raises(RuntimeError, match="mask must be bool"):
        torch.ops.frankly.decode_attention(q, k, k, torch.ones(1, 1, 1, 4, dtype=torch.bool), 1.0)


def test_the_int8_models_attention_takes_the_one_pass_op_only_where_it_is_sdpa(built):
    q, k = torch.randn(2, 4, 1, 8), torch.randn(2, 2, 5, 8).bfloat16()
    keep = torch.ones(2, 1, 1, 5, dtype=torch.bool)
    assert models._one_pass_decode(q, k, None, {"dropout": 0.0, "scaling": 0.3})
    assert models._one_pass_decode(q, k, keep, {})
    # a prompt (several query positions), bf16 queries, dropout, a sliding window, a float or odd mask: SDPA
    assert not models._one_pass_decode(torch.randn(2, 4, 3, 8), k, None, {})
    assert not models._one_pass_decode(q.bfloat16(), k, None, {})
    assert not models._one_pass_decode(q, k, None, {"dropout": 0.1})
    assert not models._one_pass_decode(q, k, None, {"sliding_window": 4})
    assert not models._one_pass_decode(q, k, keep.float(), {})
    assert not models._one_pass_decode(q, k, torch.ones(2, 1, 1, 6, dtype=torch.bool), {})
    assert not models._one_pass_decode(q.requires_grad_(), k, None, {})
    # and through the registered attention function the result is SDPA's
    attn = type("Attn", (), {"is_causal": True, "training": False})()
    v = torch.randn(2, 2, 5, 8).bfloat16()
    q = torch.randn(2, 4, 1, 8)
    out, _ = models._mixed_sdpa(attn, q, k, v, keep, dropout=0.0, scaling=0.3)
    torch.testing.assert_close(out, _sdpa(q, k, v, keep, 0.3), rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("shape", [(1, 1, 2 * 4864), (3, 2, 2 * 20), (5, 2 * 7)])
def test_silu_mul_matches_torch(built, shape):
    g = torch.Generator().manual_seed(0)
    gu = torch.randn(*shape, generator=g) * 6
    n = shape[-1] // 2
    torch.testing.assert_close(torch.ops.frankly.silu_mul(gu), F.silu(gu[..., :n]) * gu[..., n:], rtol=2e-6, atol=1e-6)


def test_silu_mul_is_accurate_far_into_both_tails(built):
    x = torch.linspace(-120, 120, 24001)
    got = torch.ops.frankly.silu_mul(torch.cat([x, torch.ones_like(x)]).view(1, -1))[0]
    want = F.silu(x.double())
    big = want.abs() > 1e-30
    assert ((got.double() - want).abs()[big] / want.abs()[big]).max() < 1e-6
    assert got[~big].abs().max() < 1e-30
    with pytest.raises(RuntimeError, match="2n"):
        torch.ops.frankly.silu_mul(torch.randn(3, 5))


@pytest.mark.parametrize(("m", "n"), [(1, 151936), (8, 1000), (3, 13), (2, 7), (1, 1)])
def test_argmax_rows_matches_torch(built, m, n):
    x = torch.randn(m, n, generator=torch.Generator().manual_seed(n))
    assert torch.equal(torch.ops.frankly.argmax_rows(x), x.argmax(-1))
    assert torch.equal(torch.ops.frankly.argmax_rows(x.t().contiguous().t()), x.argmax(-1))  # strided rows


def test_argmax_rows_takes_the_first_of_ties_in_any_lane(built):
    x = torch.zeros(3, 100)
    x[0, 17] = x[0, 40] = 5  # different lanes
    x[1, 90] = x[1, 98] = 3  # the same lane
    x[2, 99] = x[2, 3] = 1  # the scalar tail and the vector part
    assert torch.ops.frankly.argmax_rows(x).tolist() == [17, 90, 3] == x.argmax(-1).tolist()
    assert torch.ops.frankly.argmax_rows(torch.full((1, 20), -float("inf"))).tolist() == [0]


def test_greedy_sampling_uses_the_op_and_agrees_with_torch(built):
    from server.engine.sampling import greedy_tokens, sample_rows
    from server.engine.types import SamplingParams

    x = torch.randn(4, 5000, generator=torch.Generator().manual_seed(3))
    assert torch.equal(greedy_tokens(x), x.argmax(-1))
    assert torch.equal(greedy_tokens(x.bfloat16()), x.bfloat16().argmax(-1))  # other dtypes: torch's
    greedy = SamplingParams(temperature=0.0)
    assert torch.equal(sample_rows(x, [greedy] * 4, [None] * 4), x.argmax(-1))
