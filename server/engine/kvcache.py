"""Batch KV cache operations: rows join (left-padded concat) and leave (index select).

The cache is transformers' DynamicCache made of full-attention layers, shape
(batch, kv_heads, length, head_dim) per layer, left padded; a (batch, length)
attention mask marks real positions. This is the layout of the early
text-generation-inference Python server.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer


class GrowableLayer(DynamicLayer):
    """A full-attention cache layer with spare capacity: a decode step writes one
    position in place instead of concatenating (copying) the whole cache.

    ``keys``/``values`` are views of the first ``length`` positions of larger
    buffers. Code that assigns ``keys``/``values`` directly (row joins and
    leaves in this module) is detected on the next update and the new tensors
    are adopted into fresh buffers, so the layer stays a drop-in DynamicLayer.
    """

    headroom = 128  # positions of spare room allocated when a buffer (re)grows
    store_dtype: torch.dtype | None = None  # keep keys/values in this dtype (None: the model's own)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self._kbuf = self._vbuf = None
        self._view = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        q = key_states.shape[2]
        old_k, old_v = (self.keys, self.values) if self.keys.dim() == 4 else (None, None)
        length = old_k.shape[2] if old_k is not None else 0
        kb = self._kbuf
        if self.keys is not self._view or kb is None or kb.shape[0] != key_states.shape[0] or length + q > kb.shape[2]:
            cap = length + q + max(self.headroom, (length + q) // 4)
            b, h, _, d = key_states.shape
            dt = self.store_dtype or key_states.dtype
            kb = key_states.new_empty((b, h, cap, d), dtype=dt)
            vb = value_states.new_empty((b, h, cap, value_states.shape[3]), dtype=dt)
            if length:
                kb[:, :, :length].copy_(old_k)
                vb[:, :, :length].copy_(old_v)
            self._kbuf, self._vbuf = kb, vb
        self._kbuf[:, :, length : length + q].copy_(key_states)
        self._vbuf[:, :, length : length + q].copy_(value_states)
        self.keys = self._kbuf[:, :, : length + q]
        self.values = self._vbuf[:, :, : length + q]
        self._view = self.keys
        return self.keys, self.values


def new_cache(store_dtype: torch.dtype | None = None) -> DynamicCache:
    """An empty batch cache; ``store_dtype`` keeps keys and values in that dtype (bf16 for an int8
    model computing in fp32: half the cache's bytes; attention widens them back per layer,
    :func:`directions.models.set_kv_cache_dtype`)."""
    # No config: every layer is a plain full-attention layer, so rows of
    # different lengths can be padded and concatenated. Sliding-window models
    # still get the right result, because their masks come from the 2D mask.
    cache = DynamicCache()
    cache.layer_class_to_replicate = _layer_class(store_dtype)
    return cache


_LAYER_CLASSES: dict[torch.dtype | None, type[GrowableLayer]] = {None: GrowableLayer}


def _layer_class(store_dtype: torch.dtype | None) -> type[GrowableLayer]:
    if store_dtype not in _LAYER_CLASSES:
        _LAYER_CLASSES[store_dtype] = type(
            f"GrowableLayer_{store_dtype}", (GrowableLayer,), {"store_dtype": store_dtype}
        )
    return _LAYER_CLASSES[store_dtype]


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


def replace_rows(cache: DynamicCache, rows: DynamicCache, idx: torch.Tensor) -> None:
    """Overwrite rows ``idx`` of ``cache`` in place with the rows of ``rows`` (same length and padding)."""
    for a, b in zip(cache.layers, rows.layers, strict=True):
        a.keys.index_copy_(0, idx, b.keys)
        a.values.index_copy_(0, idx, b.values)


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
