"""Loading a GGUF file straight into ``--weights int8`` serving form, one tensor at a time.

The fp32 path (:func:`directions.models.convert_gguf`) dequantizes the whole
model through transformers and caches it as safetensors; loading that for int8
serving peaks at about the fp32 size. Here the model skeleton is built on the
meta device, the GGUF's tensor table is read and its data memory-mapped
(:mod:`directions.gguf_read`), and each tensor is dequantized (``gguf.quants``) a block of rows at a
time, quantized per output channel by the same :func:`~directions.quant.quantize_rows`
that :func:`~directions.quant.quantize_model` uses, and put in place. The
result equals quantizing the fp32 load (tests/directions/test_gguf_load.py
checks it tensor by tensor); the embedding and norms are kept in the compute
dtype, the rotary buffers in fp32.

llama.cpp stores the Q and K projections of ``llama``-architecture files with
the rows of each head reordered for its rope layout; transformers' GGUF loader
puts them back (only for that architecture) and so does :func:`unpermute_rows`.
qwen2 files are stored in transformers' order.
"""

from __future__ import annotations

import ctypes
import json
import logging
import subprocess
import sys
import threading
from collections import OrderedDict
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from torch import nn

from directions import lean
from directions.files import cache_root, file_key
from directions.gguf_read import (
    INT4_TYPES,
    GGUFIndex,
    GGUFLoadError,
    GGUFTensor,
    bytes_per_token,
    float_tensor,
    gguf_architecture,
    int4_groups,
    int8_rows,
    open_gguf,
)
from directions.quant import (
    Int4Linear,
    Int8Linear,
    fuse_shared_inputs,
    int8_embedding,
    int8_embedding_scale,
    weights_to_huge_pages,
)

__all__ = ["GGUFLoadError", "bytes_per_token", "load_quantized_from_gguf", "meta_dir", "open_gguf", "unpermute_rows"]

log = logging.getLogger("frankly.gguf_load")

PERMUTED_QK_ARCHS = frozenset({"llama"})  # what transformers' GGUF loader un-permutes


def _libc():
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


def release_freed_memory() -> None:
    """Hand the heap's freed pages back to the system (glibc ``malloc_trim``; a no-op elsewhere)."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


@contextmanager
def _returned_memory(index: GGUFIndex):
    """Yield a ``release()`` to call after each block of rows: it drops the file's pages and hands freed
    heap pages back (``malloc_trim``; gguf's dequantizers leave many small scratch arrays on the heap).
    While converting, glibc's mmap threshold is fixed at 256 KiB (its dynamic one keeps freed blocks of
    up to 32 MiB on the heap); afterwards at 64 KiB, fixed, with the trim threshold at 128 KiB, so a
    freed activation goes back to the system instead of raising the serving process's RSS (-96 MiB
    at the peak of 8 x 512 tokens of int8 serving, measured with the benchmark's rss section). Only
    the page drop off glibc."""
    libc = _libc()
    if libc is not None:
        libc.mallopt(-3, 256 << 10)  # M_MMAP_THRESHOLD

    def release() -> None:
        index.drop_pages()
        if libc is not None:
            libc.malloc_trim(0)

    try:
        yield release
    finally:
        if libc is not None:
            libc.mallopt(-3, 64 << 10)  # M_MMAP_THRESHOLD
            libc.mallopt(-1, 128 << 10)  # M_TRIM_THRESHOLD
            libc.malloc_trim(0)


class GGUFEmbedding(nn.Embedding):
    """A token embedding gathered from the GGUF file's own pages: the rows a forward looks up are
    dequantized there and then (exact to the file, no second rounding), and the table is never copied
    into the process. Only the pages of tokens seen become resident, as shared, reclaimable file
    pages (the demo's Q5_0 table is 89 MiB on disk, 130 MiB as int8, 260 MiB as bf16). A writer like
    any embedding: the steering hooks see its output."""

    def __init__(self, tensor: GGUFTensor, compute_dtype, padding_idx: int | None = None, embed_scale: float = 1.0):
        nn.Module.__init__(self)
        self.num_embeddings, self.embedding_dim = int(tensor.shape[1]), int(tensor.shape[0])
        self.padding_idx, self.max_norm, self.norm_type = padding_idx, None, 2.0
        self.scale_grad_by_freq = self.sparse = False
        self.compute_dtype, self.embed_scale = compute_dtype, embed_scale
        self.tensor = tensor  # its data is a view of the file's read-only map, which it keeps open
        self._recent: OrderedDict[int, torch.Tensor] = OrderedDict()  # token id -> its fp32 row
        self._recent_lock = threading.Lock()

    # Rows of the last tokens decode steps looked up, kept dequantized: a decode step looks up one
    # token a row, and dequantizing it through the gguf package costs about 0.5 ms (1.5% of an
    # int8 step of the demo on an AVX2 EPYC). 1024 rows of the demo are 3.5 MiB.
    RECENT_ROWS = 1024
    RECENT_LOOKUP = 64  # lookups of at most this many tokens go through the kept rows

    def _dequantize(self, ids: np.ndarray) -> np.ndarray:
        from gguf.quants import dequantize

        table = np.asarray(dequantize(self.tensor.data[ids], self.tensor.tensor_type), dtype=np.float32)
        return table.reshape(len(ids), self.embedding_dim)

    def rows(self, ids) -> torch.Tensor:
        """fp32 rows of these token ids (a 1-D sequence), in order."""
        flat = np.asarray(ids, dtype=np.int64).reshape(-1)
        if flat.size and (flat.min() < 0 or flat.max() >= self.num_embeddings):
            raise IndexError(f"token id out of range for an embedding of {self.num_embeddings} rows")
        if 0 < flat.size <= self.RECENT_LOOKUP:
            return self._recent_rows(flat.tolist())
        uniq, inverse = np.unique(flat, return_inverse=True)
        return torch.from_numpy(self._dequantize(uniq))[torch.from_numpy(inverse)]

    def _recent_rows(self, ids: list[int]) -> torch.Tensor:
        with self._recent_lock:
            recent = self._recent
            missing = [i for i in dict.fromkeys(ids) if i not in recent]
            if missing:
                table = torch.from_numpy(self._dequantize(np.asarray(missing)))
                for i, row in zip(missing, table, strict=True):
                    recent[i] = row.clone()  # its own storage: an evicted row frees its memory
            for i in ids:
                recent.move_to_end(i)
            out = torch.stack([recent[i] for i in ids])
            while len(recent) > self.RECENT_ROWS:
                recent.popitem(last=False)
            return out

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out = self.rows(ids.detach().cpu().numpy()).to(self.compute_dtype)
        if self.embed_scale != 1.0:
            out = out * torch.tensor(self.embed_scale, dtype=self.compute_dtype)
        return out.reshape(*ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, {self.tensor.tensor_type.name} rows from the GGUF file"


def tensor_map(reader: GGUFIndex, model: nn.Module) -> dict[str, GGUFTensor]:
    """{HF parameter name: the GGUF tensor that holds it} for every parameter the file has."""
    import gguf

    arch = gguf_architecture(reader)
    arch_id = next((k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch), None)
    if arch_id is None:
        raise GGUFLoadError(f"GGUF architecture {arch!r} is unknown to the installed gguf package")
    names = gguf.get_tensor_name_map(arch_id, model.config.num_hidden_layers)
    tensors = {t.name: t for t in reader.tensors}
    out = {}
    for pname in model.state_dict():
        base, _, suffix = pname.rpartition(".")
        g = names.get_name(base)
        if g is not None and f"{g}.{suffix}" in tensors:
            out[pname] = tensors[f"{g}.{suffix}"]
    return out


def unpermute_rows(x: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's per-head Q/K row order: within each head, rows (0, 2, 4, .., 1, 3, ..) go back
    to (first half, second half) of the rotary dimensions. Works on weights, scales and biases alike."""
    half = x.shape[0] // n_head // 2
    return x.reshape(n_head, half, 2, *x.shape[1:]).transpose(1, 2).reshape(x.shape).contiguous()


def _qk_heads(name: str, config, arch: str) -> int | None:
    """How many heads to un-permute the rows of module ``name`` by (None: stored in transformers' order)."""
    if arch not in PERMUTED_QK_ARCHS:
        return None
    if name.endswith("q_proj"):
        return config.num_attention_heads
    if name.endswith("k_proj"):
        return getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return None


def _set_param(model: nn.Module, pname: str, value: torch.Tensor) -> None:
    mod_name, _, attr = pname.rpartition(".")
    mod = model.get_submodule(mod_name) if mod_name else model
    setattr(mod, attr, nn.Parameter(value, requires_grad=False))


def _quantized_linear(name: str, lin: nn.Linear, by_param: dict, config, arch: str, dtype, weights: str, release):
    t = by_param.get(f"{name}.weight")
    if t is None:
        raise GGUFLoadError(f"GGUF file has no tensor for {name}.weight")
    want = (lin.out_features, lin.in_features)
    if (int(t.shape[1]), int(t.shape[0])) != want:
        raise GGUFLoadError(f"{name}: GGUF tensor {t.name} is {tuple(reversed(t.shape))}, the config says {want}")
    bias = None
    if lin.bias is not None:
        if f"{name}.bias" not in by_param:
            raise GGUFLoadError(f"GGUF file has no tensor for {name}.bias")
        bias = float_tensor(by_param[f"{name}.bias"], torch.float32)
    heads = _qk_heads(name, config, arch)
    fix = (lambda x: unpermute_rows(x, heads)) if heads else (lambda x: x)
    bias = None if bias is None else fix(bias)
    if weights == "int4" and t.tensor_type.name in INT4_TYPES:
        q, scale, zero = int4_groups(t)
        return Int4Linear(fix(q), fix(scale), fix(zero), bias, dtype)
    q, s = int8_rows(t, release)
    return Int8Linear(fix(q), fix(s), bias, dtype)


def load_quantized_from_gguf(
    gguf_path: str | Path, config, compute_dtype=torch.bfloat16, weights: str = "int8", progress: bool = True
):
    """The causal LM of ``gguf_path`` with every linear layer int8 per channel (``weights="int4"``: the
    file's 4-bit tensors as :class:`Int4Linear`, the others int8), the token embedding int8
    per row (a tied head shares its table), the rest in ``compute_dtype``; never more than one tensor block in fp32 at a time."""
    from accelerate import init_empty_weights
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM

    reader = open_gguf(gguf_path)
    arch = gguf_architecture(reader)
    with init_empty_weights():  # parameters on meta, buffers (rotary frequencies) real and fp32
        model = AutoModelForCausalLM.from_config(config)
    by_param = tensor_map(reader, model)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and not (tied and n == "lm_head")]
    done = {f"{n}.{p}" for n, _ in linears for p in ("weight", "bias")}
    emb_name = next(n for n, m in model.named_modules() if m is model.get_input_embeddings())
    int8_emb = int8_embedding_scale(model.get_input_embeddings()) is not None
    if int8_emb:  # an int8 table, shared by a tied head (directions.quant.int8_embedding)
        done.add(f"{emb_name}.weight")
    others = [p for p, _ in model.named_parameters() if p not in done and not (tied and p == "lm_head.weight")]
    desc = f"loading GGUF as {weights}"
    bar = tqdm(total=len(linears) + len(others) + int8_emb, desc=desc, unit="tensor", disable=not progress)
    with bar, _returned_memory(reader) as release:
        for name, lin in linears:
            parent, _, child = name.rpartition(".")
            q = _quantized_linear(name, lin, by_param, config, arch, compute_dtype, weights, release)
            setattr(model.get_submodule(parent) if parent else model, child, q)
            bar.update()
        for pname in others:
            if pname not in by_param:
                raise GGUFLoadError(f"GGUF file has no tensor for {pname}")
            _set_param(model, pname, float_tensor(by_param[pname], compute_dtype, release))
            bar.update()
        if int8_emb:
            t = by_param.get(f"{emb_name}.weight")
            if t is None:
                raise GGUFLoadError(f"GGUF file has no tensor for {emb_name}.weight")
            if tied:  # the head reads the whole table every token: one int8 copy for both
                q, s = int8_rows(t, release)
                int8_embedding(model, q, s, compute_dtype, tie_head=True)
            else:  # gathered a few rows per pass: straight from the file
                old = model.get_input_embeddings()
                pad = getattr(old, "padding_idx", None)
                model.set_input_embeddings(GGUFEmbedding(t, compute_dtype, pad, int8_embedding_scale(old)))
            bar.update()
        # q/k/v and gate/up stacked for one kernel call each (directions.quant.SharedInput), handing
        # each group's freed copies back at once: stacking after the load left ~100 MiB of them on the
        # heap, and trimming only at the end still raised the load's peak by as much
        fuse_shared_inputs(model, after_group=release_freed_memory)
        release()
        model.frankly_lean_layers = lean.install(model)  # fewer small ops a layer (directions/lean.py)
        model.frankly_huge_page_bytes = weights_to_huge_pages(
            model, after_each=release_freed_memory
        )  # fewer TLB misses
    if tied and not int8_emb:  # an embedding kind Int8Embedding cannot stand in for: bf16, tied
        model.get_output_embeddings().weight = model.get_input_embeddings().weight
    left = [n for n, p in [*model.named_parameters(), *model.named_buffers()] if p.device.type == "meta"]
    if left:
        raise GGUFLoadError(f"GGUF load left tensors unset: {', '.join(left[:5])}")
    del reader, by_param  # unmaps the file
    model.eval()
    return model


def meta_dir(gguf: Path, converted: Path | None = None) -> Path:
    """A directory with the config, generation config and tokenizer of ``gguf`` and no weights (one-time,
    seconds to a minute), written by a child process: transformers' GGUF tokenizer conversion peaks at
    over 3 GiB for the demo's 151k-token vocabulary, which would otherwise stay in the serving process's
    peak RSS. ``converted``: the fp32 conversion's directory, used when it exists."""
    if converted is not None and (converted / "config.json").is_file():
        return converted
    out = cache_root() / "converted" / f"{gguf.stem}-{file_key(gguf)}-config"
    if (out / "config.json").is_file():
        return out
    log.info("reading the config and tokenizer of %s (one-time)", gguf)
    r = subprocess.run(
        [sys.executable, "-m", "directions.gguf_load", str(gguf), str(out)], capture_output=True, text=True
    )
    if r.returncode != 0:
        raise GGUFLoadError(f"could not read the config or tokenizer of GGUF file {gguf}: {r.stderr.strip()[-2000:]}")
    return out


def _write_meta_dir(gguf: Path, out: Path) -> None:
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".partial")
    config = AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    config.save_pretrained(str(tmp))
    GenerationConfig.from_model_config(config).save_pretrained(str(tmp))
    tok.save_pretrained(str(tmp))
    (tmp / "frankly_source.json").write_text(json.dumps({"gguf": str(gguf.resolve()), "weights": None}))
    tmp.replace(out)


if __name__ == "__main__":  # the child process of meta_dir
    _write_meta_dir(Path(sys.argv[1]), Path(sys.argv[2]))
