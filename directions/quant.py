"""Int8 weights for the torch engine on CPUs (``--weights int8``).

Weight-only quantization: each linear layer keeps its weight as int8 with one
fp scale per output channel (symmetric, round to nearest, the int8 range
[-127, 127]). The matmul is frankly's own ``torch.ops.frankly.int8_linear``
(:mod:`directions.kernels`: AVX2, activations rounded to int16 in blocks of 128
inside the kernel, exact int32 sums per block) where it builds, else
``torch.ops.aten._weight_int8pack_mm``, torch's own CPU kernel. Between layers
the activations are ``compute_dtype`` (:func:`directions.models.quantized_compute_dtype`:
fp32 on frankly's kernel, bf16 on torch's). Activations are not quantized to int8: dynamic int8
activations (fbgemm's ``quantize_dynamic``) were measured at first-token KL
0.15-1.5 against fp32 on the demo model (Qwen2 has large activation outliers),
weight-only int8 at about 0.001 (``scripts/int8_kernels.py``).

An :class:`Int8Linear` is a module of its own, so forward hooks on the residual
writers (attention and MLP output projections) see its output exactly as they
see an ``nn.Linear``'s: steering, conditional mode and the bake are unchanged.
"""

from __future__ import annotations

import threading

import torch
from torch import nn
from torch.nn import functional as F

from directions import kernels
from directions.edit import project_out_stacked

WEIGHT_FORMATS = ("float", "int8")


class QuantizationError(ValueError):
    """The requested weight format cannot run here (device or dtype); the message says why."""


def quantize_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: (int8 weight, fp32 scale per row); all-zero rows get scale 1."""
    w = w.detach().float()
    scale = w.abs().amax(dim=1) / 127.0
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


class Int8Linear(nn.Module):
    """A linear layer with int8 weights (per-channel scales); computes in ``compute_dtype``."""

    def __init__(self, weight_q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, compute_dtype):
        super().__init__()
        self.out_features, self.in_features = weight_q.shape
        self.compute_dtype = compute_dtype
        self.register_buffer("weight_q", weight_q.contiguous())
        self.register_buffer("scale", scale.to(compute_dtype).contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().to(compute_dtype).clone())
        # the steering edit done inside the kernel call (directions.hooks.SteeringHooks, on frankly's
        # kernel): owner id -> (r [D, out] fp32, c*r [B, D, out] fp32); empty: the plain layer
        self.steer: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.shared: tuple[SharedInput, int] | None = None  # set by fuse_shared_inputs

    def fused_steering(self) -> bool:
        """True when the steering edit can run inside this layer's matmul (frankly's kernel) instead of
        a forward hook: same arithmetic, in fp32, without the hook call and its two extra ops."""
        return kernels.current().name == "frankly"

    @classmethod
    def from_linear(cls, lin: nn.Linear, compute_dtype=torch.bfloat16) -> Int8Linear:
        q, s = quantize_rows(lin.weight)
        return cls(q, s, lin.bias, compute_dtype)

    def dequantized(self) -> torch.Tensor:
        """The weight this layer multiplies by, in fp32 (for checks and exports)."""
        return self.weight_q.float() * self.scale.float()[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if kernels.current().name == "frankly":
            if not self.steer and self.shared is not None:  # the siblings know the input as given
                return self.shared[0].output(self.shared[1], x, self.compute_dtype)
            x = x.to(self.compute_dtype)
            if not self.steer:
                return torch.ops.frankly.int8_linear(x, self.weight_q, self.scale, self.bias)
            edits = iter(self.steer.values())
            y = torch.ops.frankly.int8_linear(x, self.weight_q, self.scale, self.bias, *next(edits))
            for r, cr in edits:  # a second owner of hooks on this model (rare): the same edit in torch ops
                y = project_out_stacked(y, r, cr)
            return y
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).to(self.compute_dtype)
        y = torch.ops.aten._weight_int8pack_mm(x2, self.weight_q, self.scale)
        if self.bias is not None:
            y = y + self.bias
        y = y.reshape(*shape[:-1], self.out_features)
        for r, cr in self.steer.values():  # installed while frankly's kernel was current (tests switch)
            y = project_out_stacked(y, r, cr)
        return y

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-channel"


class SharedInput:
    """:class:`Int8Linear` siblings that read the same input, such as an attention's q/k/v projections
    or an MLP's gate and up projections, as one kernel call over their stacked rows.

    Each member's ``weight_q``/``scale``/``bias`` become row slices (views) of one stacked tensor, so
    nothing is stored twice. The first member called with an input computes every member's output
    for it; its siblings, called next with that same tensor object (as the model's forward does),
    take theirs. A sibling called with any other input computes again, so a caller that runs one
    member alone still gets the right result. Per thread, so two threads never swap outputs.

    On the demo model this is 3 calls a layer instead of 5 (each call costs 5-20 µs besides its
    weights: a parallel region, the int16 rounding of x, the output)."""

    def __init__(self, members: list[Int8Linear]):
        self.sizes = [m.out_features for m in members]
        dtype = members[0].scale.dtype
        self.weight_q = torch.cat([m.weight_q for m in members])
        self.scale = torch.cat([m.scale for m in members])
        if any(m.bias is not None for m in members):
            self.bias = torch.cat(
                [m.bias if m.bias is not None else torch.zeros(m.out_features, dtype=dtype) for m in members]
            )
        else:
            self.bias = None
        start = 0
        for i, (m, n) in enumerate(zip(members, self.sizes, strict=True)):
            m.weight_q = self.weight_q[start : start + n]
            m.scale = self.scale[start : start + n]
            if m.bias is not None:
                m.bias = self.bias[start : start + n]
            m.shared = (self, i)
            start += n
        self._local = threading.local()

    def output(self, i: int, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Member ``i``'s output for ``x`` (computed in ``dtype``)."""
        mine = self._local
        pending = getattr(mine, "pending", None)
        if pending is not None and mine.x is x and pending[i] is not None:
            y, pending[i] = pending[i], None
            if all(p is None for p in pending):
                mine.x = mine.pending = None
            return y
        y = torch.ops.frankly.int8_linear(x.to(dtype), self.weight_q, self.scale, self.bias)
        parts = list(y.split(self.sizes, dim=-1))
        mine_part, parts[i] = parts[i], None
        mine.x, mine.pending = x, parts  # holding x keeps its identity unique until the siblings are served
        return mine_part


SHARED_INPUT_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def fuse_shared_inputs(model: nn.Module, after_group=None) -> int:
    """Group the :class:`Int8Linear` siblings of ``model`` that read one input (:data:`SHARED_INPUT_GROUPS`,
    transformers' names) into :class:`SharedInput` s; returns how many groups were made. ``after_group``
    (no arguments) runs after each group, e.g. to hand the freed unstacked copies back to the system
    (the GGUF load does: otherwise they pile up on the heap, +97 MiB of peak RSS on the demo)."""
    n = 0
    for mod in list(model.modules()):
        for names in SHARED_INPUT_GROUPS:
            members = [getattr(mod, name, None) for name in names]
            if not all(isinstance(m, Int8Linear) and m.shared is None for m in members):
                continue
            if len({(m.in_features, m.compute_dtype, m.scale.dtype) for m in members}) != 1:
                continue
            SharedInput(members)
            n += 1
            if after_group is not None:
                after_group()
    return n


class Int8Embedding(nn.Embedding):
    """A token embedding whose table is int8 with one scale per token (row), in ``compute_dtype`` out.

    A tied LM head is an :class:`Int8Linear` over the same two tensors (:func:`int8_embedding`): per
    output channel of the head is per token of the table, so one int8 copy serves both, half the
    bytes of a bf16 table and read once per decoded token by the head. It stays an ``nn.Embedding``
    (without a ``weight``) so the steering hooks find it as the embedding writer."""

    def __init__(
        self,
        weight_q: torch.Tensor,
        scale: torch.Tensor,
        compute_dtype,
        padding_idx: int | None = None,
        embed_scale: float = 1.0,
    ):
        nn.Module.__init__(self)
        self.num_embeddings, self.embedding_dim = weight_q.shape
        self.padding_idx, self.max_norm, self.norm_type = padding_idx, None, 2.0
        self.scale_grad_by_freq = self.sparse = False
        self.compute_dtype = compute_dtype
        self.embed_scale = embed_scale  # Gemma's scaled embedding multiplies every row by sqrt(d)
        self.register_buffer("weight_q", weight_q.contiguous())
        self.register_buffer("scale", scale.to(compute_dtype).contiguous())

    def dequantized(self) -> torch.Tensor:
        """The table this layer looks rows up in, in fp32 (for checks and exports)."""
        return self.weight_q.float() * self.scale.float()[:, None]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = F.embedding(ids, self.weight_q).to(self.compute_dtype) * F.embedding(ids, self.scale.unsqueeze(-1))
        if self.embed_scale != 1.0:
            rows = rows * torch.tensor(self.embed_scale, dtype=self.compute_dtype)
        return rows

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, int8 per row"


def weights_to_huge_pages(model: nn.Module, after_each=None) -> int:
    """Move the quantized weights of ``model`` onto transparent huge pages (``frankly::to_huge_pages``);
    returns the bytes moved.

    A decode step streams every weight once, and on 4 KiB pages that is a TLB miss every 4 KiB: the
    kernel read a 136 MB matrix at 20 GB/s on 4 KiB pages and 28-29 GB/s on 2 MiB pages on this
    project's AVX2 machine. Storages under 2 MiB stay where they are; every view follows its storage
    (the stacked q/k/v rows, a tied head). Nothing moves when frankly's kernel is not loaded, when
    ``FRANKLY_HUGE_PAGES=0``, or where the system has no transparent huge pages (the advice is then
    ignored and the pages stay 4 KiB: the same speed as before, the same memory). ``after_each`` (no
    arguments) runs after each storage moved, e.g. to hand the old copy's heap pages back to the system
    (:func:`directions.gguf_load.release_freed_memory`)."""
    import os

    if os.environ.get("FRANKLY_HUGE_PAGES", "1") == "0" or kernels.current().name != "frankly":
        return 0
    seen: set[int] = set()
    moved = 0
    for m in model.modules():
        if not isinstance(m, (Int8Linear, Int8Embedding, Int4Linear)):
            continue
        for name in ("weight_q", "weight_packed"):
            t = getattr(m, name, None)
            if t is None or t.device.type != "cpu":
                continue
            key = t.untyped_storage().data_ptr()
            if key in seen:
                continue
            n = int(torch.ops.frankly.to_huge_pages(t))
            if n:
                moved += n
                if after_each is not None:
                    after_each()  # e.g. the old copy, freed onto the heap: back to the system before the next
            seen.add(t.untyped_storage().data_ptr())
            seen.add(key)
    return moved


def int8_embedding_scale(emb: nn.Module) -> float | None:
    """The factor an embedding module multiplies its rows by (1 for a plain ``nn.Embedding``, sqrt(d)
    for Gemma's scaled one), or None for a kind whose forward :class:`Int8Embedding` cannot stand in for."""
    if type(emb) is nn.Embedding:
        return 1.0
    if type(emb).__name__.endswith("ScaledWordEmbedding") and hasattr(emb, "scalar_embed_scale"):
        return float(emb.scalar_embed_scale)
    return None


def int8_embedding(
    model: nn.Module, weight_q: torch.Tensor, scale: torch.Tensor, compute_dtype, tie_head: bool
) -> bool:
    """Put an :class:`Int8Embedding` of (``weight_q``, ``scale``) in place of ``model``'s input embedding;
    with ``tie_head`` its output embedding (the LM head) becomes an :class:`Int8Linear` over the same
    two tensors, so a tied head stays tied. Returns False (and changes nothing) for an embedding kind
    :class:`Int8Embedding` cannot stand in for."""
    old = model.get_input_embeddings()
    factor = int8_embedding_scale(old)
    if factor is None:
        return False
    emb = Int8Embedding(weight_q, scale, compute_dtype, getattr(old, "padding_idx", None), factor)
    model.set_input_embeddings(emb)
    if tie_head:
        model.set_output_embeddings(Int8Linear(emb.weight_q, emb.scale, None, compute_dtype))
    return True


INT4_GROUP = 32  # the CPU kernel's group along the input dimension; one Q4_K / Q4_0 / Q4_1 sub-block


class Int4Linear(nn.Module):
    """A linear layer with 4-bit weights in groups of :data:`INT4_GROUP` inputs, one scale and one
    offset per group: ``w = (q - 8) * scale + zero``, ``q`` in 0..15; torch's CPU kernel
    ``aten._weight_int4pack_mm_for_cpu``. llama.cpp's Q4_K, Q4_1 and Q4_0 blocks are this form exactly
    (:func:`directions.gguf_load.int4_groups`), so a GGUF's 4-bit tensors load without a second rounding
    (in ``compute_dtype`` float32; bfloat16 rounds the scales)."""

    def __init__(
        self, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bias: torch.Tensor | None, compute_dtype
    ):
        super().__init__()
        self.out_features, self.in_features = q.shape
        self.compute_dtype = compute_dtype
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).contiguous(), 2)
        self.register_buffer("weight_packed", packed)
        # the kernel's layout: (in_features / group, out_features, 2) of (scale, zero)
        self.register_buffer("scale_zero", torch.stack([scale.T, zero.T], -1).to(compute_dtype).contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().to(compute_dtype).clone())

    def dequantized(self) -> torch.Tensor:
        """The weight this layer multiplies by, in fp32 (for checks)."""
        eye = torch.eye(self.in_features, dtype=self.compute_dtype)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(eye, self.weight_packed, INT4_GROUP, self.scale_zero)
        return y.float().T.contiguous()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).to(self.compute_dtype)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.weight_packed, INT4_GROUP, self.scale_zero)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int4 group {INT4_GROUP}"


def quantize_model(model: nn.Module, *, lm_head: bool = True, compute_dtype=torch.bfloat16, progress=None) -> int:
    """Replace every ``nn.Linear`` of ``model`` (the LM head too unless ``lm_head=False``) by an
    :class:`Int8Linear`, one layer at a time so the fp32 weight is freed as its int8 copy is made; the
    token embedding becomes an :class:`Int8Embedding` (int8 per row), and a head tied to it shares its
    int8 table (:func:`int8_embedding`). Returns how many linear layers were replaced (a tied head counts)."""
    if next(model.parameters()).device.type != "cpu":
        raise QuantizationError(
            "--weights int8 runs torch's CPU kernel; use --device cpu (on GPUs use --dtype bfloat16)"
        )
    tied = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    targets = [
        (name, mod)
        for name, mod in model.named_modules()
        if isinstance(mod, nn.Linear) and id(mod.weight) not in tied and (lm_head or name != "lm_head")
    ]
    for i, (name, mod) in enumerate(targets):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, Int8Linear.from_linear(mod, compute_dtype))
        if progress:
            progress(i + 1, len(targets))
    n = len(targets)
    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    tied_head = head is not None and getattr(head, "weight", None) is getattr(emb, "weight", False)
    if int8_embedding_scale(emb) is not None and (lm_head or not tied_head):
        q, s = quantize_rows(emb.weight)  # tied: one int8 table for the embedding and the head
        int8_embedding(model, q, s, compute_dtype, tie_head=tied_head)
        n += tied_head
    cast_parameters(model, compute_dtype)
    return n


def cast_parameters(model: nn.Module, dtype: torch.dtype) -> None:
    """Norms, embedding and biases into ``dtype``, in place (tied weights stay tied). Buffers are left
    alone: ``Module.to`` would round the rotary ``inv_freq`` to bf16, an angle error that grows with the
    position (about 0.7 rad at position 500 for a mid frequency)."""
    for p in model.parameters():
        if p.is_floating_point():
            p.data = p.data.to(dtype)
