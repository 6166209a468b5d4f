"""Lean decoder layers for int8 models on frankly's CPU kernel.

On a CPU, a decode step of the int8 demo model spends about 40% of its time outside the
matmuls: the ~60 small torch ops of each decoder layer (norms, the q/k/v split, the rotary
embedding, views, residual adds) and their Python. :func:`install` gives each eligible layer a
forward that does the same arithmetic with fewer calls:

- the input norm: one op (``frankly::rms_norm``);
- q/k/v: one kernel call over the stacked rows (:class:`directions.quant.SharedInput`), then one op
  (``frankly::qkv_rope``) that splits the heads and applies the rotary embedding;
- the cache update and attention: transformers' own (the registered attention function, so the
  bf16 KV cache and the masks work unchanged; for an int8 model that function runs a decode step's
  attention as one op, ``frankly::decode_attention``, see :func:`directions.models.set_kv_cache_dtype`);
- the output projection as a module call (its hooks and in-kernel steering act as before);
- the residual add and the next norm: one op (``frankly::add_rms_norm``);
- gate/up: one kernel call, then ``silu(gate) * up`` in one op (``frankly::silu_mul``); the down
  projection as a module call.

A layer takes the lean path only when nothing could observe the difference: frankly's kernel is
the current one, the activations are fp32, the layer is in eval mode, and no forward hook (the
module's own or a global one) and no steering sits on the modules the lean path does not call
(the attention and MLP blocks, the norms, q/k/v, gate/up). Otherwise it runs transformers' forward
as if nothing had been installed, so a capture hook or a kernel switch still sees every module.
The layer's own hooks (the engine's probe of a layer's input) fire either way.

Supported: transformers' Qwen2, Llama and Mistral decoder layers (the same block; Qwen2 and Mistral
pass a sliding window argument, Qwen2's from the attention module, Mistral's from the config). Results agree with transformers' forward to rounding (the norm's sum runs in
another order); ``tests/directions/test_lean.py`` checks both against each other.
"""

from __future__ import annotations

import sys
import types
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from directions import kernels
from directions.quant import Int8Linear, SharedInput

LAYER_CLASSES = ("Qwen2DecoderLayer", "LlamaDecoderLayer", "MistralDecoderLayer")
NORM_CLASSES = ("Qwen2RMSNorm", "LlamaRMSNorm", "MistralRMSNorm")
# where a layer's attention takes its sliding window from: Qwen2 sets it on the attention module,
# Mistral passes its config's (None when the model has no window), Llama has none
SLIDING_FROM_CONFIG = ("MistralDecoderLayer",)
SILU = ("silu", "swish")


@dataclass
class LeanSpec:
    qkv: SharedInput
    gate_up: SharedInput
    heads: int
    kv_heads: int
    eps_in: float
    eps_post: float
    eager: Any  # the model's eager attention, transformers' fallback for get_interface
    attention_functions: Any  # transformers' ALL_ATTENTION_FUNCTIONS, resolved once here rather than a layer call
    sliding: str  # "attn" (Qwen2: the module's sliding_window), "config" (Mistral: the config's), "" (none)
    quiet: tuple[nn.Module, ...]  # modules the lean path does not call: a hook on any of them means fallback
    readers: tuple[Int8Linear, ...]  # q/k/v and gate/up: steering on any of them means fallback
    children: tuple[
        tuple[nn.Module, str, nn.Module], ...
    ]  # (parent, name, module) as installed: a swapped one means fallback
    attn: nn.Module
    o_proj: nn.Module
    down_proj: nn.Module
    norm_in: torch.Tensor
    norm_post: torch.Tensor


def _group(mods: list[Any], n: int) -> SharedInput | None:
    if not all(isinstance(m, Int8Linear) and m.shared is not None for m in mods):
        return None
    shared = mods[0].shared[0]
    if any(m.shared[0] is not shared or m.shared[1] != i for i, m in enumerate(mods)) or len(shared.sizes) != n:
        return None
    return shared


def spec_for(layer: nn.Module) -> LeanSpec | None:
    """The lean path's description of ``layer``, or None where it cannot run it."""
    if type(layer).__name__ not in LAYER_CLASSES:
        return None
    attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    n1, n2 = getattr(layer, "input_layernorm", None), getattr(layer, "post_attention_layernorm", None)
    if attn is None or mlp is None or n1 is None or n2 is None:
        return None
    if type(n1).__name__ not in NORM_CLASSES or type(n2).__name__ not in NORM_CLASSES:
        return None
    config = attn.config
    if str(getattr(config, "hidden_act", "")) not in SILU:
        return None
    qkv = _group([attn.q_proj, attn.k_proj, attn.v_proj], 3)
    gate_up = _group([mlp.gate_proj, mlp.up_proj], 2)
    if qkv is None or gate_up is None or mlp.gate_proj.out_features != mlp.up_proj.out_features:
        return None
    head_dim = attn.head_dim
    heads, kv_heads = attn.q_proj.out_features // head_dim, attn.k_proj.out_features // head_dim
    if heads * head_dim != attn.q_proj.out_features or kv_heads * head_dim != attn.v_proj.out_features:
        return None
    module = sys.modules[type(attn).__module__]
    eager = getattr(module, "eager_attention_forward", None)
    if eager is None:
        return None
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    return LeanSpec(
        qkv=qkv,
        gate_up=gate_up,
        heads=heads,
        kv_heads=kv_heads,
        eps_in=float(n1.variance_epsilon),
        eps_post=float(n2.variance_epsilon),
        eager=eager,
        attention_functions=ALL_ATTENTION_FUNCTIONS,
        sliding="attn"
        if hasattr(attn, "sliding_window")
        else "config"
        if type(layer).__name__ in SLIDING_FROM_CONFIG
        else "",
        quiet=(attn, mlp, n1, n2, attn.q_proj, attn.k_proj, attn.v_proj, mlp.gate_proj, mlp.up_proj),
        readers=(attn.q_proj, attn.k_proj, attn.v_proj, mlp.gate_proj, mlp.up_proj),
        children=tuple(
            (parent, name, parent._modules[name])
            for parent, names in (
                (layer, ("self_attn", "mlp", "input_layernorm", "post_attention_layernorm")),
                (attn, ("q_proj", "k_proj", "v_proj", "o_proj")),
                (mlp, ("gate_proj", "up_proj", "down_proj")),
            )
            for name in names
        ),
        attn=attn,
        o_proj=attn.o_proj,
        down_proj=mlp.down_proj,
        norm_in=n1.weight,
        norm_post=n2.weight,
    )


def _observed(spec: LeanSpec) -> bool:
    g = nn.modules.module
    if g._global_forward_hooks or g._global_forward_pre_hooks:
        return True
    for m in spec.quiet:
        if m._forward_hooks or m._forward_pre_hooks:
            return True
    for parent, name, child in spec.children:  # e.g. an adapter wrapped around a projection since
        if parent._modules.get(name) is not child:
            return True
    return any(m.steer for m in spec.readers)


def lean_ready(layer: nn.Module, x: torch.Tensor) -> bool:
    """Whether ``layer`` takes the lean path for input ``x`` now."""
    spec = getattr(layer, "_frankly_lean", None)
    return (
        spec is not None
        and x.dtype == torch.float32
        and x.dim() == 3
        and not layer.training
        and spec.norm_in.dtype == torch.float32
        and spec.norm_post.dtype == torch.float32
        and kernels.current().name == "frankly"
        and not _observed(spec)
    )


def _lean_forward(
    self,
    hidden_states: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.LongTensor | None = None,
    cache=None,
    use_cache: bool | None = False,
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
    **kwargs,
) -> torch.Tensor:
    if cache is None and "past_key_values" in kwargs:  # the name transformers is deprecating
        cache = kwargs.pop("past_key_values")
    if position_embeddings is None or not lean_ready(self, hidden_states):
        return type(self).forward(
            self,
            hidden_states,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=use_cache,
            position_embeddings=position_embeddings,
            **kwargs,
        )
    spec: LeanSpec = self._frankly_lean
    ops, attn = torch.ops.frankly, spec.attn
    h = ops.rms_norm(hidden_states, spec.norm_in, spec.eps_in)
    qkv = ops.int8_linear(h, spec.qkv.weight_q, spec.qkv.scale, spec.qkv.bias)
    cos, sin = position_embeddings
    q, k, v = ops.qkv_rope(qkv, cos, sin, spec.heads, spec.kv_heads)
    akw = dict(kwargs, position_ids=position_ids, use_cache=use_cache)  # what the layer hands its attention
    if cache is not None:
        k, v = cache.update(k, v, attn.layer_idx, kwargs=akw)
    interface = spec.attention_functions.get_interface(attn.config._attn_implementation, spec.eager)
    if spec.sliding == "attn":
        akw["sliding_window"] = attn.sliding_window
    elif spec.sliding == "config":
        akw["sliding_window"] = getattr(attn.config, "sliding_window", None)
    out, _ = interface(attn, q, k, v, attention_mask, dropout=0.0, scaling=attn.scaling, **akw)
    out = spec.o_proj(out.reshape(*hidden_states.shape[:-1], -1).contiguous())
    x, h = ops.add_rms_norm(hidden_states, out, spec.norm_post, spec.eps_post)
    gu = ops.int8_linear(h, spec.gate_up.weight_q, spec.gate_up.scale, spec.gate_up.bias)
    return x + spec.down_proj(ops.silu_mul(gu))


def install(model: nn.Module) -> int:
    """Give each eligible decoder layer of ``model`` the lean forward; returns how many got it.
    Needs the stacked readers (:func:`directions.quant.fuse_shared_inputs`) and frankly's kernel
    built; a layer it cannot run keeps transformers' forward."""
    if kernels.current().name != "frankly":
        return 0
    n = 0
    for layer in model.modules():
        spec = spec_for(layer)
        if spec is None:
            continue
        layer._frankly_lean = spec
        layer.forward = types.MethodType(_lean_forward, layer)
        n += 1
    return n


def uninstall(model: nn.Module) -> int:
    """Undo :func:`install` (transformers' forward again); returns how many layers it reset."""
    n = 0
    for layer in model.modules():
        if getattr(layer, "_frankly_lean", None) is not None:
            del layer._frankly_lean
            del layer.forward
            n += 1
    return n
