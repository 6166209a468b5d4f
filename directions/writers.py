"""Finding the modules that write into the residual stream.

For decoder-only transformers in transformers' layout the writers are the
token embedding, each layer's attention output projection and each layer's
MLP down projection. Writers are identified by structure, not by model
type, so llama, qwen2, mistral, gemma and phi3 share one code path.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from directions.quant import Int8Linear

# Architectures that normalise a writer's output before the residual add; for
# these, hooks on o_proj/down_proj and the bake are not the same function as
# an edit of the residual stream itself (DESIGN.md asks us to say so).
POST_NORM_TYPES = {"gemma2", "gemma3", "gemma3_text", "olmo2"}

ATTN_OUT_NAMES = ("o_proj", "out_proj", "dense", "c_proj")
MLP_OUT_NAMES = ("down_proj", "fc2", "c_proj", "dense_4h_to_h")


class UnsupportedModelError(ValueError):
    """The model's layout is not one whose residual writers we can find."""


@dataclass(frozen=True)
class Writer:
    name: str  # qualified module name, e.g. model.layers.3.mlp.down_proj
    layer: int  # which layer's direction/weight applies (the embedding uses 0)
    kind: str  # "embed" | "attn" | "mlp"
    module: nn.Module


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a transformers causal LM (``model.model.layers``)."""
    base = getattr(model, "model", model)
    layers = getattr(base, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise UnsupportedModelError(f"cannot find decoder layers in {type(model).__name__}")
    return layers


def _child(parent: nn.Module, names: tuple[str, ...]) -> tuple[str, nn.Module] | None:
    for n in names:
        m = getattr(parent, n, None)
        if isinstance(m, (nn.Linear, Int8Linear)):
            return n, m
    return None


def find_writers(model: nn.Module) -> list[Writer]:
    """All residual-stream writers of ``model`` in forward order."""
    base = getattr(model, "model", model)
    prefix = "model." if base is not model else ""
    emb = model.get_input_embeddings()
    if not isinstance(emb, nn.Embedding):
        raise UnsupportedModelError("input embedding is not an nn.Embedding")
    out = [Writer(f"{prefix}embed_tokens", 0, "embed", emb)]
    for i, layer in enumerate(decoder_layers(model)):
        attn = getattr(layer, "self_attn", None) or getattr(layer, "attn", None)
        mlp = getattr(layer, "mlp", None)
        a = _child(attn, ATTN_OUT_NAMES) if attn is not None else None
        m = _child(mlp, MLP_OUT_NAMES) if mlp is not None else None
        if a is None or m is None:
            raise UnsupportedModelError(
                f"layer {i} of {type(model).__name__}: attention or MLP output projection not found"
            )
        out.append(Writer(f"{prefix}layers.{i}.self_attn.{a[0]}", i, "attn", a[1]))
        out.append(Writer(f"{prefix}layers.{i}.mlp.{m[0]}", i, "mlp", m[1]))
    return out


def has_post_norm(model: nn.Module) -> bool:
    """True for architectures that normalise a writer's output before the residual add."""
    return getattr(model.config, "model_type", "") in POST_NORM_TYPES


def num_layers(model: nn.Module) -> int:
    """How many decoder layers ``model`` has."""
    return len(decoder_layers(model))
