"""Writing a baked model back into GGUF, next to the safetensors copy.

The original GGUF is copied key by key and tensor by tensor; only the
residual writers the bake edited (``token_embd``, ``blk.N.attn_output``,
``blk.N.ffn_down``, and their biases where present) are replaced, as Q8_0
(the default: about a quarter of F32's size), F16 or F32 (exact). Biases and
tensors whose rows are not a multiple of Q8_0's block of 32 stay F32.
Untouched quantized tensors keep their original bytes and type. None of these tensors is permuted by the GGUF
converters (only ``attn_q``/``attn_k`` are, for llama-style models), and a
GGUF tensor's numpy shape is the torch shape (its ``shape`` field lists the
dimensions in the reverse order).

If the source GGUF has no ``output.weight`` the model ties its LM head to
the embedding; the bake unties it, so the original ``token_embd`` bytes are
written as ``output.weight`` (llama.cpp and transformers both pick it up).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch

_NAME_MAP = [
    (re.compile(r"^(?:model\.)?embed_tokens\.weight$"), "token_embd.weight"),
    (re.compile(r"^(?:model\.)?layers\.(\d+)\.self_attn\.o_proj\.(weight|bias)$"), "blk.{0}.attn_output.{1}"),
    (re.compile(r"^(?:model\.)?layers\.(\d+)\.mlp\.down_proj\.(weight|bias)$"), "blk.{0}.ffn_down.{1}"),
]
_NP_DTYPES = {"f32": np.float32, "f16": np.float16}
GGUF_DTYPES = ("q8_0", "f16", "f32")
_Q8_BLOCK = 32


class GGUFWriteError(RuntimeError):
    """The baked model cannot be mapped onto the source GGUF's tensors."""


def gguf_name(hf_name: str) -> str:
    """GGUF tensor name of a residual-writer parameter (``model.layers.3.mlp.down_proj.weight`` -> ``blk.3.ffn_down.weight``)."""
    for pattern, template in _NAME_MAP:
        m = pattern.match(hf_name)
        if m:
            return template.format(*m.groups())
    raise GGUFWriteError(f"no GGUF tensor name known for parameter {hf_name!r}")


def estimate_size(src_gguf: str | Path, edited_numel: int, dtype: str = "f32") -> int:
    """Upper bound of the output size in bytes: the source plus the edited tensors at full width."""
    per = 34 / 32 if dtype == "q8_0" else np.dtype(_NP_DTYPES[dtype]).itemsize
    return Path(src_gguf).stat().st_size + int(edited_numel * per) + 1


def _encode(t: torch.Tensor, dtype: str):
    """(array to write, GGML type or None for a plain numpy dtype) for one edited tensor."""
    import gguf

    arr = t.detach().to("cpu", torch.float32).contiguous().numpy()
    if dtype == "q8_0" and arr.ndim == 2 and arr.shape[-1] % _Q8_BLOCK == 0:
        return gguf.quants.quantize(arr, gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0
    if dtype == "f16" and arr.ndim == 2:
        return arr.astype(np.float16), None
    return arr, None


def _copy_metadata(reader, writer, extra_kv: dict[str, str]) -> None:
    import gguf

    for field in reader.fields.values():
        # Virtual GGUF.* fields and the architecture are written by GGUFWriter itself.
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue
        if field.name == gguf.Keys.General.ALIGNMENT:
            writer.add_custom_alignment(int(field.contents()))
            continue
        vtype = field.types[0]
        sub_type = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), vtype, sub_type=sub_type)
    for key, value in extra_kv.items():
        writer.add_string(key, value)


def write_baked_gguf(
    src_gguf: str | Path,
    dst: str | Path,
    state: dict[str, torch.Tensor],
    edited: Iterable[str],
    *,
    dtype: str = "q8_0",
    extra_kv: dict[str, str] | None = None,
    progress: Callable[[float, str], None] | None = None,
    untie: bool = False,
) -> Path:
    """Copy ``src_gguf`` to ``dst``, replacing the tensors of the ``edited`` parameters with ``state[name]``.

    ``state`` maps Hugging Face parameter names to the baked tensors; ``edited``
    lists which of them the bake changed. ``dtype`` is ``q8_0`` (a quarter of
    F32's size), ``f16`` or ``f32`` (exact). A tied LM head (no
    ``output.weight``) gets the original ``token_embd`` bytes as its own
    tensor when the embedding is edited, or always with ``untie``. Raises
    :class:`GGUFWriteError` if an edited parameter has no tensor of the same
    shape in the source file.
    """
    import gguf

    if dtype not in GGUF_DTYPES:
        raise GGUFWriteError(f"GGUF dtype must be one of {', '.join(GGUF_DTYPES)}, not {dtype!r}")
    reader = gguf.GGUFReader(str(src_gguf), "r")
    plan = _plan(reader, _replacements(reader, src_gguf, state, edited), untie)
    arch = str(reader.get_field(gguf.Keys.General.ARCHITECTURE).contents())
    writer = gguf.GGUFWriter(str(dst), arch=arch, endianess=reader.endianess)
    try:
        _copy_metadata(reader, writer, extra_kv or {})
        total = _add_tensor_infos(writer, plan, dtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        _write_tensor_data(writer, reader, plan, dtype, total, progress)
    finally:
        writer.close()
    return Path(dst)


# (name, source tensor to copy raw, replacement or None)
_Plan = list[tuple[str, object, torch.Tensor | None]]


def _replacements(reader, src_gguf, state: dict[str, torch.Tensor], edited: Iterable[str]) -> dict[str, torch.Tensor]:
    """GGUF tensor name -> baked tensor, each checked against the source tensor's shape."""
    by_name = {t.name: t for t in reader.tensors}
    replace: dict[str, torch.Tensor] = {}
    for hf in edited:
        name = gguf_name(hf)
        t = by_name.get(name)
        want = tuple(state[hf].shape)
        if t is None or tuple(int(x) for x in reversed(t.shape.tolist())) != want:
            found = None if t is None else tuple(int(x) for x in reversed(t.shape.tolist()))
            raise GGUFWriteError(f"{src_gguf}: tensor {name} for {hf} {want} not found or of another shape ({found})")
        replace[name] = state[hf]
    return replace


def _plan(reader, replace: dict[str, torch.Tensor], untie: bool) -> _Plan:
    """Every tensor of the output in order: the source's, plus ``output.weight`` when the head is untied."""
    names = {t.name for t in reader.tensors}
    plan: _Plan = []
    for t in reader.tensors:
        plan.append((t.name, t, replace.get(t.name)))
        if t.name == "token_embd.weight" and (untie or t.name in replace) and "output.weight" not in names:
            plan.append(("output.weight", t, None))  # keep the original head; the baked copy is untied
    return plan


def _add_tensor_infos(writer, plan: _Plan, dtype: str) -> int:
    """Declare every tensor of ``plan`` to ``writer``; returns the bytes of tensor data to come."""
    sizes = []
    for name, src, new in plan:
        if new is None:
            writer.add_tensor_info(name, src.data.shape, src.data.dtype, src.data.nbytes, src.tensor_type)
            sizes.append(src.n_bytes)
        else:
            # The info needs the encoded size; encoding twice keeps at most one tensor's copy in memory.
            arr, qtype = _encode(new, dtype)
            writer.add_tensor_info(name, arr.shape, arr.dtype, arr.nbytes, qtype)
            sizes.append(arr.nbytes)
            del arr
    return sum(sizes)


def _write_tensor_data(writer, reader, plan: _Plan, dtype: str, total: int, progress) -> None:
    """Write the tensors' bytes: the source's raw, the replacements encoded as ``dtype``."""
    done = 0
    for name, src, new in plan:
        if new is None:
            writer.write_tensor_data(src.data, tensor_endianess=reader.endianess)
            done += src.n_bytes
        else:
            arr, _ = _encode(new, dtype)
            writer.write_tensor_data(arr)
            done += arr.nbytes
            del arr
        if progress is not None:
            progress(done / max(total, 1), f"writing GGUF tensor {name}")


def bake_kv(meta: dict) -> dict[str, str]:
    """The metadata key frankly adds to a baked GGUF (one JSON string; llama.cpp ignores unknown keys)."""
    return {"frankly.bake": json.dumps(meta, sort_keys=True)}
