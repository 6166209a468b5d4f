"""Baking: writing the per-request edit into a copy of the weights.

``bake_model`` applies exactly the map the hooks apply (same functions of
:mod:`directions.edit`, same order: writers in forward order, and for each
writer the directions in the order of the strengths dict, which is the order
``SteeringHooks.set_strengths`` iterates), so a baked model and the hooked
model are the same function for every strength. ``bake_to_dir`` loads a
fresh copy of the source, bakes it and writes a complete Hugging Face
directory (and a GGUF when the source was one) atomically under a bake root.
``BakeJobs`` (in :mod:`directions.bake_jobs`) runs bakes one at a time in a
background thread for the server.
"""

from __future__ import annotations

import datetime as _dt
import errno
import json
import math
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from directions.edit import bake_bias, bake_embedding_weight, bake_linear_weight
from directions.fileformat import DirectionFileError, DirectionSet
from directions.gguf_write import GGUFWriteError, bake_kv, estimate_size, write_baked_gguf
from directions.writers import find_writers, has_post_norm

Progress = Callable[[float, str], None]
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
EMBED_CHUNK_ROWS = 16384  # rows edited at a time: bounds the temporaries for a 150k-token vocabulary
BAKE_FILE = "frankly_bake.json"


class BakeError(Exception):
    """A bake could not be done; ``param`` names the request field at fault (None: not the caller's fault)."""

    param: str | None = None
    code: str = "bake_failed"

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        if param is not None:
            self.param = param


class BakeNameError(BakeError):
    param, code = "name", "invalid_name"


class BakeExistsError(BakeError):
    param, code = "name", "bake_exists"


class UnknownDirection(BakeError):
    param, code = "steering", "unknown_direction"


class BakeStrengthError(BakeError):
    param, code = "steering", "invalid_strength"


class BakeSourceError(BakeError):
    code = "source_unavailable"


class BakeStorageError(BakeError):
    code = "storage_error"


class BakeBusyError(BakeError):
    code = "bake_busy"


class BakeGGUFError(BakeError):
    code = "gguf_unsupported"


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


@torch.no_grad()
def bake_model(
    model: nn.Module,
    directions: dict[str, DirectionSet],
    strengths: dict[str, float],
    progress: Progress | None = None,
) -> BakeReport:
    """Edit ``model`` in place so that it computes what the hooked model computes at ``strengths``.

    For each writer (forward order) and each direction (order of ``strengths``,
    zero strengths skipped like the hooks skip them), with ``c = s * w_l``
    (the embedding uses layer 0): ``W <- W - c r r^T W`` and ``b <- b - c (r.b) r``.
    A tied LM head is untied first (it keeps the original weight) and
    ``config.tie_word_embeddings`` is set to False.
    """
    strengths = _check_strengths(directions, strengths)
    for name in strengths:
        try:
            directions[name].check_fits(model.config)
        except DirectionFileError as e:
            raise UnknownDirection(str(e)) from e
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
        edits = [
            (ds.directions[w.layer], s * float(ds.layer_weights[w.layer]))
            for ds, s in active
            if s * float(ds.layer_weights[w.layer]) != 0.0
        ]
        if edits:
            prefix = module_names[id(w.module)]
            if w.kind == "embed":
                # _edit_embedding gives the embedding a new tensor, so a head sharing the old one keeps
                # it; the config must stop saying "tied" or loading would re-tie the head to the edit.
                head = model.get_output_embeddings()
                text_cfg = model.config.get_text_config()
                report.untied = bool(
                    (head is not None and head.weight is w.module.weight)
                    or getattr(text_cfg, "tie_word_embeddings", False)
                )
                _edit_embedding(w.module, edits)
                if report.untied:
                    model.config.tie_word_embeddings = False
                    text_cfg.tie_word_embeddings = False
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
        if progress is not None:
            progress((k + 1) / len(writers), f"baked {w.name}")
    return report


# --- writing a baked directory -------------------------------------------------------------------


def validate_name(name: str, bake_root: str | Path) -> Path:
    """The final directory for ``name`` under ``bake_root``; raises :class:`BakeNameError` if it could escape."""
    if not isinstance(name, str) or not NAME_RE.match(name) or name in (".", ".."):
        raise BakeNameError(
            f"invalid bake name {name!r}: 1-64 characters of letters, digits, '.', '_', '-', starting with a letter or digit"
        )
    root = Path(bake_root).resolve()
    final = (root / name).resolve()
    if final.parent != root:
        raise BakeNameError(f"bake name {name!r} resolves outside the bake directory {root}")
    return final


def _source_of(source) -> tuple[str, str | None, str]:
    """(directory or hub id to load, original GGUF or None, what the user called it)."""
    if isinstance(source, str | Path):
        from directions.models import ModelLoadError, locate

        try:
            path, gguf = locate(str(source))
        except ModelLoadError as e:
            raise BakeSourceError(str(e), param="model") from e
        return path, gguf, str(source)
    return source.path, source.gguf, getattr(source, "source", source.path)


def load_source_model(path: str, label: str):
    """A fresh CPU copy of the source model (eval mode, no grad) and its tokenizer; never the served one."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype="auto", use_safetensors=True)
    except OSError as e:
        raise BakeSourceError(f"could not load the source model {label!r} from {path}: {e}", param="model") from e
    model.eval()
    model.requires_grad_(False)
    return model, tok


def output_path(out_dir: str | Path, bake_root: str | Path | None) -> Path:
    """The final directory: ``bake_root/out_dir`` for a bare name, else the path ``out_dir`` itself."""
    if bake_root is None:
        out = Path(out_dir).expanduser().absolute()
        bake_root, out_dir = out.parent, out.name
    return validate_name(str(out_dir), bake_root)


def claim_output(final: Path, sources, overwrite: bool) -> None:
    """Refuse to write over or inside a source, or over an existing output without ``overwrite``;
    create the parent directory."""
    for src in filter(None, sources):
        p = Path(src).expanduser()
        if p.exists() and (_inside(p.resolve(), final) or _inside(final, p.resolve())):
            raise BakeExistsError(f"refusing to write {final}: it is or contains the source model {p}")
    if final.exists() and not overwrite:
        raise BakeExistsError(f"{final} already exists (pass overwrite to replace it)")
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _storage_error(e, final.parent) from e


def _inside(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def _storage_error(e: OSError, where: Path) -> BakeStorageError:
    if e.errno == errno.ENOSPC:
        return BakeStorageError(f"no space left on the device of {where} while writing the baked model")
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return BakeStorageError(f"no permission to write the baked model under {where}: {e.strerror}")
    return BakeStorageError(f"could not write the baked model under {where}: {e}")


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
    model is never touched) or a model spec for ``server.modelio.locate``.
    With ``bake_root`` given, ``out_dir`` is a bare name validated against
    :data:`NAME_RE`; without it, ``out_dir`` is a path and its parent is the
    root. Everything is written into a temporary directory inside the root
    and renamed into place at the end; on any error the temporary directory
    is removed. Returns the final directory.
    """
    t0 = time.monotonic()
    report_progress = progress or (lambda f, m: None)
    final = output_path(out_dir, bake_root)
    root, name = final.parent, final.name
    strengths = _check_strengths(directions, strengths)
    path, gguf, label = _source_of(source)
    claim_output(final, (path, gguf), overwrite)

    report_progress(0.0, f"loading {label}")
    model, tok = load_source_model(path, label)

    def sub(lo: float, hi: float) -> Progress:
        return lambda f, m: report_progress(lo + (hi - lo) * f, m)

    report = bake_model(model, directions, strengths, progress=sub(0.05, 0.3))
    write_gguf = bool(write_gguf and gguf)
    sd = model.state_dict()
    need = sum(t.numel() * t.element_size() for t in _unique_state(model).values()) + (1 << 24)
    if write_gguf:
        need += estimate_size(gguf, sum(sd[k].numel() for k in report.edited), gguf_dtype)
    free = shutil.disk_usage(root).free
    if free < need:
        raise BakeStorageError(
            f"not enough disk space under {root}: the bake needs about {need / 1e9:.2f} GB, {free / 1e9:.2f} GB free"
        )

    meta = {
        "source": {"model": label, "path": str(path), "gguf": gguf},
        "strengths": strengths,
        "directions": {n: directions[n].public_metadata() for n in strengths},
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "edited_tensors": len(report.edited),
        "untied_lm_head": report.untied,
        "post_norm": report.post_norm,
        "note": report.note,
    }
    tmp = None
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=root))
        _save_hf_dir(model, tok, tmp, sub(0.3, 0.6 if write_gguf else 0.98))
        if write_gguf:
            write_baked_gguf(
                gguf,
                tmp / "model.gguf",
                sd,
                report.edited,
                dtype=gguf_dtype,
                extra_kv=bake_kv({k: meta[k] for k in ("source", "strengths", "created")}),
                progress=sub(0.6, 0.98),
            )
            meta["gguf"] = {"file": "model.gguf", "edited_dtype": gguf_dtype}
        meta["seconds"] = round(time.monotonic() - t0, 2)
        (tmp / BAKE_FILE).write_text(json.dumps(meta, indent=2, default=str))
        _move_into_place(tmp, final, overwrite)
        tmp = None
    except OSError as e:
        raise _storage_error(e, root) from e
    except GGUFWriteError as e:
        raise BakeGGUFError(f"{e} (bake without GGUF output to get the safetensors copy)") from e
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    report_progress(1.0, f"done: {final}")
    return final


def _move_into_place(tmp: Path, final: Path, overwrite: bool) -> None:
    if not final.exists():
        os.replace(tmp, final)
        return
    if not overwrite:
        raise BakeExistsError(f"{final} already exists (pass overwrite to replace it)")
    # A directory cannot be renamed over a non-empty one: park the old one, swap, then delete it.
    old = Path(tempfile.mkdtemp(prefix=f".old-{final.name}-", dir=final.parent))
    os.replace(final, old / final.name)
    try:
        os.replace(tmp, final)
    except OSError:
        os.replace(old / final.name, final)
        os.rmdir(old)
        raise
    shutil.rmtree(old, ignore_errors=True)
