"""Batch KV cache operations: rows join (left-padded concat) and leave (index select).

The cache is transformers' DynamicCache made of full-attention layers, shape
(batch, kv_heads, length, head_dim) per layer, left padded; a (batch, length)
attention mask marks real positions. This is the layout of the early
text-generation-inference Python server.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicCache


def new_cache() -> DynamicCache:
    # No config: every layer is a plain full-attention DynamicLayer, so rows of
    # different lengths can be padded and concatenated. Sliding-window models
    # still get the right result, because their masks come from the 2D mask.
    return DynamicCache()


def _pad_left(t: torch.Tensor, n: int, dim: int) -> torch.Tensor:
    if n == 0:
        return t
    shape = list(t.shape)
    shape[dim] = n
    return torch.cat([t.new_zeros(shape), t], dim=dim)


def merge(
    cache: DynamicCache | None, mask: torch.Tensor | None, new_cache_: DynamicCache, new_mask: torch.Tensor
) -> tuple[DynamicCache, torch.Tensor]:
    """Append the rows of ``new_cache_`` to ``cache``, left-padding the shorter side."""
    if cache is None or mask is None or mask.shape[0] == 0:
        return new_cache_, new_mask
    la, lb = mask.shape[1], new_mask.shape[1]
    length = max(la, lb)
    for a, b in zip(cache.layers, new_cache_.layers, strict=True):
        a.keys = torch.cat([_pad_left(a.keys, length - la, 2), _pad_left(b.keys, length - lb, 2)], dim=0)
        a.values = torch.cat([_pad_left(a.values, length - la, 2), _pad_left(b.values, length - lb, 2)], dim=0)
    mask = torch.cat([_pad_left(mask, length - la, 1), _pad_left(new_mask, length - lb, 1)], dim=0)
    return cache, mask


def select(cache: DynamicCache, mask: torch.Tensor, keep: list[int]) -> tuple[DynamicCache, torch.Tensor]:
    """Keep only rows ``keep``; drop leading columns that no remaining row uses."""
    idx = torch.tensor(keep, dtype=torch.long, device=mask.device)
    mask = mask.index_select(0, idx)
    used = mask.any(dim=0).nonzero()
    first = int(used[0]) if used.numel() else mask.shape[1]
    for layer in cache.layers:
        layer.keys = layer.keys.index_select(0, idx)[:, :, first:, :]
        layer.values = layer.values.index_select(0, idx)[:, :, first:, :]
    return cache, mask[:, first:]
