"""The edit as a rank-1 LoRA adapter per direction, for runtimes frankly does not own.

The edit is linear in the strength. For a writer with weight ``W`` (d_model
rows) at layer ``l`` and ``c = w_l``::

    W - s * c * r (r^T W)  =  W + s * B A        A = r^T W   (1 x in),  B = -c r   (d_model x 1)

and for the token embedding ``E`` (one row per token; the hooks edit each
row as an output)::

    E - s * c * (E r) r^T  =  E + s * (B A)^T    A = (E r)^T (1 x vocab), B = -c r

A writer's bias ``b`` goes to ``b - s c (r.b) r``, which is a LoRA-B bias
``-c r (r.b)`` scaled with the adapter (PEFT's ``lora_bias``; llama.cpp's
format has no place for it). So one adapter applied at adapter scale ``s``
computes the hooked model at strength ``s``, for every ``s``, on top of the
untouched base weights (quantized or not).

Several directions are several adapters. The hooks apply directions one
after the other (``P2 P1 W``), adapters add (``W + s1 B1 A1 + s2 B2 A2``):
the two agree exactly only when the directions are orthogonal.

:func:`lora_pairs` computes the factors, :func:`write_peft_adapter` and
:func:`write_gguf_adapter` write them; :mod:`directions.lora_export` exports
whole directories.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from directions.fileformat import DirectionSet
from directions.gguf_write import GGUFWriteError, gguf_name
from directions.writers import find_writers

Progress = Callable[[float, str], None]
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


class LoraExportError(ValueError):
    """A direction cannot be written as a LoRA adapter for this model or runtime; the message says why."""


@dataclass(frozen=True)
class LoraPair:
    """The rank-1 factors of one writer: its delta at adapter scale 1 is ``B @ A`` (+ ``bias``)."""

    module: str  # module name in the model, e.g. model.layers.3.mlp.down_proj
    kind: str  # "embed" | "attn" | "mlp"
    A: torch.Tensor  # (1, in_features); the embedding: (1, vocab), i.e. (E r)^T
    B: torch.Tensor  # (d_model, 1)
    bias: torch.Tensor | None = None  # (d_model,) LoRA-B bias, for writers that have a bias

    @property
    def param(self) -> str:
        return f"{self.module}.weight"


@torch.no_grad()
def lora_pairs(model: nn.Module, ds: DirectionSet, scale: float = 1.0) -> list[LoraPair]:
    """The rank-1 factors of direction ``ds`` for every writer of ``model`` whose layer weight is not zero.

    ``scale`` folds a strength into ``B`` (for runtimes that cannot scale an
    adapter per request). Factors are computed in float64 from the model's
    own weights and stored as float32.
    """
    names = {id(m): n for n, m in model.named_modules()}
    out = []
    for w in find_writers(model):
        c = float(scale) * ds.writer_weight(w.kind, w.layer)
        if c == 0.0:
            continue
        r = ds.directions[w.layer].to(torch.float64)
        weight = w.module.weight.detach().to("cpu", torch.float64)
        # embedding: (E r)^T, (1, vocab); a Linear: r^T W, (1, in)
        a = (weight @ r if w.kind == "embed" else r @ weight).unsqueeze(0)
        b = (-c * r).unsqueeze(1)  # (d, 1)
        bias = getattr(w.module, "bias", None)
        lb = None if bias is None else (-c * torch.dot(r, bias.detach().to("cpu", torch.float64))) * r
        out.append(
            LoraPair(
                names[id(w.module)],
                w.kind,
                a.to(torch.float32).contiguous(),
                b.to(torch.float32).contiguous(),
                None if lb is None else lb.to(torch.float32).contiguous(),
            )
        )
    return out


# --- PEFT --------------------------------------------------------------------------------------


def peft_config(pairs: list[LoraPair], base: str, embedding_names: Iterable[str] = ()) -> dict:
    """``adapter_config.json`` for ``pairs``: rank 1, alpha 1 (adapter scale 1.0 is strength 1.0)."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base,
        "r": 1,
        "lora_alpha": 1,
        "lora_dropout": 0.0,
        "bias": "none",
        "lora_bias": any(p.bias is not None for p in pairs),
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        # Full module names: PEFT matches a name exactly or as a dotted suffix, so exactly these modules get an adapter.
        "target_modules": sorted(p.module for p in pairs),
        "modules_to_save": None,
        "layers_to_transform": None,
        "revision": None,
    }


def peft_state(pairs: list[LoraPair]) -> dict[str, torch.Tensor]:
    """The tensors PEFT saves for these pairs (its key layout, adapter name stripped)."""
    sd = {}
    for p in pairs:
        key = f"base_model.model.{p.module}"
        if p.kind == "embed":
            # PEFT's embedding LoRA: lora_embedding_A is (r, num_embeddings), lora_embedding_B (embedding_dim, r).
            sd[f"{key}.lora_embedding_A"] = p.A
            sd[f"{key}.lora_embedding_B"] = p.B
        else:
            sd[f"{key}.lora_A.weight"] = p.A
            sd[f"{key}.lora_B.weight"] = p.B
            if p.bias is not None:
                sd[f"{key}.lora_B.bias"] = p.bias
    return sd


def write_peft_adapter(out_dir: Path, pairs: list[LoraPair], base: str, metadata: dict) -> Path:
    """Write a PEFT adapter directory (``adapter_config.json``, ``adapter_model.safetensors``)."""
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / ADAPTER_CONFIG).write_text(json.dumps(peft_config(pairs, base), indent=2))
    save_file(
        peft_state(pairs),
        str(out_dir / ADAPTER_WEIGHTS),
        metadata={"format": "pt", "frankly": json.dumps(metadata, sort_keys=True, default=str)},
    )
    return out_dir


# --- GGUF (llama.cpp) --------------------------------------------------------------------------


@dataclass(frozen=True)
class GGUFBase:
    """What the adapter writer needs to know of a base GGUF file."""

    path: str
    arch: str
    shapes: dict[str, tuple[int, ...]]  # tensor name -> torch-order shape

    @property
    def tied_output(self) -> bool:
        """No ``output.weight``: llama.cpp uses ``token_embd`` as the LM head too."""
        return "output.weight" not in self.shapes


def read_gguf_base(path: str | Path) -> GGUFBase:
    import gguf

    reader = gguf.GGUFReader(str(path), "r")
    arch = str(reader.get_field(gguf.Keys.General.ARCHITECTURE).contents())
    shapes = {t.name: tuple(int(x) for x in reversed(t.shape.tolist())) for t in reader.tensors}
    return GGUFBase(str(path), arch, shapes)


def gguf_tensors(pairs: list[LoraPair], base: GGUFBase) -> dict[str, np.ndarray]:
    """``<base tensor>.lora_a`` / ``.lora_b`` arrays in the layout llama.cpp's LoRA loader checks.

    numpy shapes (GGUF lists dimensions the other way round): a Linear's
    ``lora_a`` is (1, in) and ``lora_b`` (d_model, 1), so llama.cpp computes
    ``b @ (a @ x)``; for ``token_embd`` it takes rows of ``lora_a`` by token id
    and multiplies them by the non-transposed ``lora_b``, so there ``lora_a``
    is (vocab, 1) and ``lora_b`` (d_model, 1).
    """
    out = {}
    for p in pairs:
        if p.bias is not None:
            raise LoraExportError(
                f"{p.module} has a bias and llama.cpp's LoRA format cannot carry the bias edit "
                f"({base.arch}); use the PEFT adapter or a bake instead"
            )
        try:
            name = gguf_name(p.param)
        except GGUFWriteError as e:
            raise LoraExportError(str(e)) from e
        shape = base.shapes.get(name)
        want = (p.A.shape[1], p.B.shape[0]) if p.kind == "embed" else (p.B.shape[0], p.A.shape[1])
        if shape != want:
            raise LoraExportError(f"{base.path}: tensor {name} for {p.module} {want} not found or of shape {shape}")
        a = p.A.numpy().T if p.kind == "embed" else p.A.numpy()
        out[f"{name}.lora_a"] = np.ascontiguousarray(a, dtype=np.float32)
        out[f"{name}.lora_b"] = np.ascontiguousarray(p.B.numpy(), dtype=np.float32)
    return out


def write_gguf_adapter(path: Path, pairs: list[LoraPair], base: GGUFBase, metadata: dict) -> Path:
    """Write a llama.cpp LoRA adapter (``general.type = adapter``, ``adapter.type = lora``, alpha 1)."""
    import gguf

    tensors = gguf_tensors(pairs, base)
    writer = gguf.GGUFWriter(str(path), arch=base.arch)
    try:
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        # llama.cpp scales by adapter_scale * alpha / rank; rank 1 and alpha 1 make the scale the strength.
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, 1.0)
        writer.add_name(str(metadata.get("name", "frankly adapter")))
        writer.add_string("frankly.lora", json.dumps(metadata, sort_keys=True, default=str))
        for name, arr in tensors.items():
            writer.add_tensor(name, arr)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    return path
