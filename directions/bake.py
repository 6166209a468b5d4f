"""Baking: writing the per-request edit into a copy of the weights.

``bake_model`` applies exactly the map the hooks apply (same functions of
:mod:`directions.edit`, same order: writers in forward order, and for each
writer the directions in the order of the strengths dict, which is the order
``SteeringHooks.set_strengths`` iterates), so a baked model and the hooked
model are the same function for every strength. ``bake_to_dir`` loads a
fresh copy of the source, bakes it and writes a complete Hugging Face
directory (and a GGUF when the source was one) atomically under a bake root
(the source and the output directory: :mod:`directions.bake_io`; the errors:
:mod:`directions.bake_errors`, importable from here too).
``BakeJobs`` (in :mod:`directions.bake_jobs`) runs bakes one at a time in a
background thread for the server.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import shutil
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from directions.bake_errors import (
    BakeBusyError,
    BakeError,
    BakeExistsError,
    BakeGGUFError,
    BakeNameError,
    BakeSourceError,
    BakeStorageError,
    BakeStrengthError,
    UnknownDirection,
)
from directions.bake_io import (
    NAME_RE,
    claim_output,
    load_source_model,
    output_path,
    source_of,
    staged_output,
    validate_name,
)
from directions.edit import bake_bias, bake_embedding_weight, bake_linear_weight
from directions.fileformat import DirectionFileError, DirectionSet
from directions.gguf_write import GGUFWriteError, bake_kv, estimate_size, write_baked_gguf
from directions.writers import Writer, find_writers, has_post_norm

__all__ = [
    "BAKE_FILE",
    "NAME_RE",
    "BakeBusyError",
    "BakeError",
    "BakeExistsError",
    "BakeGGUFError",
    "BakeNameError",
    "BakeReport",
    "BakeSourceError",
    "BakeStorageError",
    "BakeStrengthError",
    "Progress",
    "UnknownDirection",
    "bake_model",
    "bake_to_dir",
    "check_fits",
    "load_source_model",
    "source_of",
    "validate_name",
    "write_safetensors",
]

Progress = Callable[[float, str], None]
EMBED_CHUNK_ROWS = 16384  # rows edited at a time: bounds the temporaries for a 150k-token vocabulary
BAKE_FILE = "frankly_bake.json"


@dataclass
class BakeReport:
    """What ``bake_model`` changed."""

    edited: list[str] = field(default_factory=list)  # state-dict keys of the edited tensors
    untied: bool = False  # the LM head was tied to the embedding and now keeps the original
    post_norm: bool = False  # writers are normalised before the residual add (see note)
    note: str = ""


def _check_strengths(directions: dict[str, DirectionSet], strengths: dict[str, float]) -> dict[str, float]:
    if not strengths:
        raise BakeStrengthError("no strengths given: nothing to bake")
    out = {}
    for name, s in strengths.items():
        if name not in directions:
            known = ", ".join(sorted(directions)) or "none"
            raise UnknownDirection(f"unknown direction {name!r} (loaded: {known})")
        try:
            s = float(s)
        except (TypeError, ValueError):
            raise BakeStrengthError(f"strength of {name!r} is not a number: {s!r}") from None
        if not math.isfinite(s):
            raise BakeStrengthError(f"strength of {name!r} is not finite: {s}")
        out[name] = s
    return out


def check_fits(directions: dict[str, DirectionSet], names: Iterable[str], config) -> None:
    """Every named direction fits the model ``config``; one that does not is an :class:`UnknownDirection`."""
    for name in names:
        try:
            directions[name].check_fits(config)
        except DirectionFileError as e:
            raise UnknownDirection(str(e)) from e


# --- the edit ------------------------------------------------------------------------------------


@torch.no_grad()
def bake_model(
    model: nn.Module,
    directions: dict[str, DirectionSet],
    strengths: dict[str, float],
    progress: Progress | None = None,
) -> BakeReport:
    """Edit ``model`` in place so that it computes what the hooked model computes at ``strengths``.

    For each writer (forward order) and each direction (order of ``strengths``,
    zero strengths skipped like the hooks skip them), with ``c = s * w``
    (the embedding uses layer 0): ``W <- W - c r r^T W`` and ``b <- b - c (r.b) r``.
    A tied LM head is untied first (it keeps the original weight) and
    ``config.tie_word_embeddings`` is set to False.
    """
    strengths = _check_strengths(directions, strengths)
    check_fits(directions, strengths, model.config)
    active = [(directions[n], s) for n, s in strengths.items() if s != 0.0]
    writers = find_writers(model)
    module_names = {id(m): n for n, m in model.named_modules()}
    report = BakeReport(post_norm=has_post_norm(model))
    if report.post_norm:
        report.note = (
            f"{model.config.model_type} normalises each writer's output before the residual add: "
            "the bake equals the hooks (both edit the writer output before that norm), but the "
            "direction is not removed from the residual stream itself"
        )
    for k, w in enumerate(writers):
        edits = _writer_edits(active, w.kind, w.layer)
        if edits:
            _bake_writer(model, w, edits, module_names[id(w.module)], report)
        if progress is not None:
            progress((k + 1) / len(writers), f"baked {w.name}")
    return report


def _writer_edits(active: list[tuple[DirectionSet, float]], kind: str, layer: int) -> list[tuple[torch.Tensor, float]]:
    """(direction ``r_l``, coefficient ``c = s * w``) of each active direction for writer ``kind`` at ``layer``
    (``w`` from :meth:`DirectionSet.writer_weight`, as the hooks and LoRA export read it), zero ``c`` left out."""
    return [
        (ds.directions[layer], s * ds.writer_weight(kind, layer))
        for ds, s in active
        if s * ds.writer_weight(kind, layer) != 0.0
    ]


def _bake_writer(
    model: nn.Module, w: Writer, edits: list[tuple[torch.Tensor, float]], prefix: str, report: BakeReport
) -> None:
    """Apply ``edits`` to one writer's weight and bias, in order, and list the edited keys in ``report``."""
    if w.kind == "embed":
        _bake_embedding(model, w.module, edits, report)
    else:
        weight = w.module.weight.detach()
        for r, c in edits:
            weight = bake_linear_weight(weight, r, c)
        w.module.weight.data = weight
    report.edited.append(f"{prefix}.weight")
    bias = getattr(w.module, "bias", None)
    if bias is not None:
        b = bias.detach()
        for r, c in edits:
            b = bake_bias(b, r, c)
        bias.data = b
        report.edited.append(f"{prefix}.bias")


def _bake_embedding(
    model: nn.Module, emb: nn.Embedding, edits: list[tuple[torch.Tensor, float]], report: BakeReport
) -> None:
    # _edit_embedding gives the embedding a new tensor, so a head sharing the old one keeps
    # it; the config must stop saying "tied" or loading would re-tie the head to the edit.
    head = model.get_output_embeddings()
    text_cfg = model.config.get_text_config()
    report.untied = bool(
        (head is not None and head.weight is emb.weight) or getattr(text_cfg, "tie_word_embeddings", False)
    )
    _edit_embedding(emb, edits)
    if report.untied:
        model.config.tie_word_embeddings = False
        text_cfg.tie_word_embeddings = False


def _edit_embedding(emb: nn.Embedding, edits: list[tuple[torch.Tensor, float]]) -> None:
    # A fresh tensor, so a tied LM head keeps the original; filled by row blocks
    # (each row is an independent output y) to bound the temporaries.
    src = emb.weight.detach()
    new = torch.empty_like(src)
    for i in range(0, src.shape[0], EMBED_CHUNK_ROWS):
        block = src[i : i + EMBED_CHUNK_ROWS]
        for r, c in edits:
            block = bake_embedding_weight(block, r, c)
        new[i : i + EMBED_CHUNK_ROWS] = block
    emb.weight = nn.Parameter(new, requires_grad=False)


# --- writing a baked directory -------------------------------------------------------------------


def _unique_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict without the second name of still-tied tensors (transformers re-ties them on load)."""
    sd, seen = {}, set()
    for k, t in model.state_dict().items():
        if t.numel() and t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        sd[k] = t
    return sd


_ST_DTYPES = {
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float64: "F64",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


def write_safetensors(
    tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str], progress: Progress | None = None
) -> None:
    """Stream ``tensors`` into a safetensors file, one tensor's bytes at a time.

    Same format as ``safetensors.torch.save_file``, which took 6-9 s for the
    demo model's 2.5 GB here against about 2-3 s for these plain sequential
    writes from the (mmapped) tensors.
    """
    header, offset = {"__metadata__": metadata}, 0
    for name, t in tensors.items():
        n = t.numel() * t.element_size()
        header[name] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        done = 0
        for name, t in tensors.items():
            if t.numel():
                f.write(memoryview(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()))
                done += t.numel() * t.element_size()
            if progress is not None:
                progress(done / max(offset, 1), f"writing {name}")


def _save_hf_dir(model: nn.Module, tokenizer, tmp: Path, progress: Progress | None = None) -> None:
    write_safetensors(_unique_state(model), tmp / "model.safetensors", {"format": "pt"}, progress)
    cfg = json.loads(model.config.to_json_string(use_diff=False))
    cfg.pop("quantization_config", None)  # a dequantized GGUF load leaves it behind; the weights are plain now
    cfg["architectures"] = [type(model).__name__]
    cfg["dtype"] = str(next(model.parameters()).dtype).removeprefix("torch.")
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
    model.generation_config.save_pretrained(str(tmp))
    tokenizer.save_pretrained(str(tmp))


def _save_gguf(
    gguf: str, tmp: Path, state: dict[str, torch.Tensor], report: BakeReport, dtype: str, meta: dict, progress
) -> None:
    """``model.gguf``: the source GGUF with the edited tensors replaced, and the bake noted in ``meta``."""
    write_baked_gguf(
        gguf,
        tmp / "model.gguf",
        state,
        report.edited,
        dtype=dtype,
        extra_kv=bake_kv({k: meta[k] for k in ("source", "strengths", "created")}),
        progress=progress,
    )
    meta["gguf"] = {"file": "model.gguf", "edited_dtype": dtype}


def _check_space(
    root: Path, model: nn.Module, state: dict, report: BakeReport, gguf: str | None, gguf_dtype: str
) -> None:
    """Refuse before writing anything when ``root`` lacks the room for the copy (and the GGUF)."""
    need = sum(t.numel() * t.element_size() for t in _unique_state(model).values()) + (1 << 24)
    if gguf:
        need += estimate_size(gguf, sum(state[k].numel() for k in report.edited), gguf_dtype)
    free = shutil.disk_usage(root).free
    if free < need:
        raise BakeStorageError(
            f"not enough disk space under {root}: the bake needs about {need / 1e9:.2f} GB, {free / 1e9:.2f} GB free"
        )


def _bake_metadata(
    label: str, path: str, gguf: str | None, directions: dict[str, DirectionSet], strengths: dict, report: BakeReport
) -> dict:
    """The content of :data:`BAKE_FILE` (``seconds`` and ``gguf`` are added once written)."""
    return {
        "source": {"model": label, "path": str(path), "gguf": gguf},
        "strengths": strengths,
        "directions": {n: directions[n].public_metadata() for n in strengths},
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "edited_tensors": len(report.edited),
        "untied_lm_head": report.untied,
        "post_norm": report.post_norm,
        "note": report.note,
    }


def _sub(progress: Progress, lo: float, hi: float) -> Progress:
    """``progress`` for a step that spans ``lo``..``hi`` of the whole."""
    return lambda f, m: progress(lo + (hi - lo) * f, m)


def bake_to_dir(
    source,
    directions: dict[str, DirectionSet],
    strengths: dict[str, float],
    out_dir: str | Path,
    *,
    bake_root: str | Path | None = None,
    progress: Progress | None = None,
    overwrite: bool = False,
    write_gguf: bool = True,
    gguf_dtype: str = "q8_0",
) -> Path:
    """Bake ``strengths`` into a fresh copy of ``source`` and write it to ``bake_root/out_dir`` atomically.

    ``source`` is a ``LoadedModel`` (its directory is reloaded; the served
    model is never touched) or a model spec for ``directions.models.locate``.
    With ``bake_root`` given, ``out_dir`` is a bare name validated against
    :data:`NAME_RE`; without it, ``out_dir`` is a path and its parent is the
    root. Everything is written into a temporary directory inside the root
    and renamed into place at the end; on any error the temporary directory
    is removed. Returns the final directory.
    """
    t0 = time.monotonic()
    report_progress = progress or (lambda f, m: None)
    final = output_path(out_dir, bake_root)
    strengths = _check_strengths(directions, strengths)
    path, gguf, label = source_of(source)
    claim_output(final, (path, gguf), overwrite)

    report_progress(0.0, f"loading {label}")
    model, tok = load_source_model(path, label)
    report = bake_model(model, directions, strengths, progress=_sub(report_progress, 0.05, 0.3))
    write_gguf = bool(write_gguf and gguf)
    sd = model.state_dict()
    _check_space(final.parent, model, sd, report, gguf if write_gguf else None, gguf_dtype)

    meta = _bake_metadata(label, path, gguf, directions, strengths, report)
    try:
        with staged_output(final, overwrite) as tmp:
            _save_hf_dir(model, tok, tmp, _sub(report_progress, 0.3, 0.6 if write_gguf else 0.98))
            if write_gguf:
                _save_gguf(gguf, tmp, sd, report, gguf_dtype, meta, _sub(report_progress, 0.6, 0.98))
            meta["seconds"] = round(time.monotonic() - t0, 2)
            (tmp / BAKE_FILE).write_text(json.dumps(meta, indent=2, default=str))
    except GGUFWriteError as e:
        raise BakeGGUFError(f"{e} (bake without GGUF output to get the safetensors copy)") from e
    report_progress(1.0, f"done: {final}")
    return final
