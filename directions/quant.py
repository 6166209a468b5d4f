"""Int8 weights for the torch engine on CPUs (``--weights int8``).

Weight-only quantization: each linear layer keeps its weight as int8 with one
fp scale per output channel (symmetric, round to nearest, the int8 range
[-127, 127]) and runs ``torch.ops.aten._weight_int8pack_mm``, torch's own CPU
kernel, on bf16 activations. Activations are not quantized: dynamic int8
activations (fbgemm's ``quantize_dynamic``) were measured at first-token KL
0.15-1.5 against fp32 on the demo model (Qwen2 has large activation outliers),
weight-only int8 at about 0.001 (``scripts/int8_kernels.py``).

An :class:`Int8Linear` is a module of its own, so forward hooks on the residual
writers (attention and MLP output projections) see its output exactly as they
see an ``nn.Linear``'s: steering, conditional mode and the bake are unchanged.
"""

from __future__ import annotations

import torch
from torch import nn

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

    @classmethod
    def from_linear(cls, lin: nn.Linear, compute_dtype=torch.bfloat16) -> Int8Linear:
        q, s = quantize_rows(lin.weight)
        return cls(q, s, lin.bias, compute_dtype)

    def dequantized(self) -> torch.Tensor:
        """The weight this layer multiplies by, in fp32 (for checks and exports)."""
        return self.weight_q.float() * self.scale.float()[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).to(self.compute_dtype)
        y = torch.ops.aten._weight_int8pack_mm(x2, self.weight_q, self.scale)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-channel"


def quantize_model(model: nn.Module, *, lm_head: bool = True, compute_dtype=torch.bfloat16, progress=None) -> int:
    """Replace every ``nn.Linear`` of ``model`` (the LM head too unless ``lm_head=False``; a head
    tied to the embedding is left alone) by an :class:`Int8Linear`, one layer at a time so the
    fp32 weight is freed as its int8 copy is made. Returns how many layers were replaced."""
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
    # norms, embedding and attention run in the compute dtype; Module.to(dtype) leaves the int8 buffers as they are
    model.to(compute_dtype)
    return len(targets)
