"""Reading GGUF files without gguf's ``GGUFReader``: the tensor table, memory-mapped tensor data, and
each tensor dequantized (``gguf.quants``) or unpacked a block of rows at a time into the forms
:mod:`directions.gguf_load` builds the model from: int8 rows, float tensors, 4-bit groups."""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from directions.quant import quantize_rows

CHUNK_ROWS = 4096  # rows dequantized at once: bounds the fp32 scratch (4096 x 896 x 4 B = 14 MiB for the demo)


class GGUFLoadError(RuntimeError):
    """A GGUF file cannot be read or loaded into int8 form (unknown architecture, missing tensor, ...);
    :func:`directions.models.load_model` raises it as a ``ModelLoadError``."""


_SCALAR_FMT = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9
_FLOAT_DTYPES = {"F32": np.float32, "F16": np.float16}


class GGUFTensor(NamedTuple):
    name: str
    tensor_type: object  # gguf.GGMLQuantizationType
    shape: tuple[int, ...]  # ggml's order: the row length first
    data: np.ndarray  # memory-mapped; (rows, bytes per row) uint8 for block formats, (rows, cols) for F32/F16


@dataclass
class GGUFIndex:
    """The tensor table and the scalar metadata of one GGUF file; tensor data stays memory-mapped.
    (gguf's ``GGUFReader`` builds numpy objects for every metadata item: 450 MiB of RSS for the
    demo's 151k-token vocabulary, more than the model's int8 MLP weights.)"""

    metadata: dict[str, object]  # scalars and strings; arrays are skipped
    tensors: list[GGUFTensor]
    mapping: mmap.mmap

    def drop_pages(self) -> None:
        """Drop the file's pages from this process's RSS (they stay in the page cache, and a block already
        converted is not read again); without this the whole file would count as resident by the end."""
        if hasattr(mmap, "MADV_DONTNEED"):
            self.mapping.madvise(mmap.MADV_DONTNEED)


class _Cursor:
    def __init__(self, buf):
        self.buf, self.pos = buf, 0

    def read(self, fmt: str):
        v = struct.unpack_from("<" + fmt, self.buf, self.pos)[0]
        self.pos += struct.calcsize("<" + fmt)
        return v

    def string(self) -> str:
        n = self.read("Q")
        self.pos += n
        return bytes(self.buf[self.pos - n : self.pos]).decode("utf-8", "replace")

    def value(self, vtype: int):
        """A scalar or string value; arrays are skipped (None)."""
        if vtype == _STRING:
            return self.string()
        if vtype != _ARRAY:
            return self.read(_SCALAR_FMT[vtype])
        etype, count = self.read("I"), self.read("Q")
        if etype in _SCALAR_FMT:
            self.pos += count * struct.calcsize("<" + _SCALAR_FMT[etype])
        else:
            for _ in range(count):
                self.value(etype)
        return None


def open_gguf(path: str | Path) -> GGUFIndex:
    """The tensor table of ``path`` (nothing but the header is read until a tensor is used)."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    try:
        with open(path, "rb") as f:
            mapping = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        mm = np.frombuffer(mapping, dtype=np.uint8)
        c = _Cursor(mm)
        if c.read("I") != 0x46554747 or c.read("I") not in (2, 3):
            raise ValueError("not a little-endian GGUF v2/v3 file")
        n_tensors, n_kv = c.read("Q"), c.read("Q")
        meta = {}
        for _ in range(n_kv):
            key = c.string()
            meta[key] = c.value(c.read("I"))
        infos = []
        for _ in range(n_tensors):
            name, nd = c.string(), c.read("I")
            dims = tuple(c.read("Q") for _ in range(nd))
            infos.append((name, dims, GGMLQuantizationType(c.read("I")), c.read("Q")))
    except (OSError, ValueError, struct.error) as e:
        raise GGUFLoadError(f"could not read GGUF file {path}: {e}") from e
    align = int(meta.get("general.alignment") or 32)
    start = -(-c.pos // align) * align
    tensors = []
    for name, dims, qtype, off in infos:
        block, size = GGML_QUANT_SIZES[qtype]
        rows = tuple(reversed(dims))
        n_bytes = int(np.prod(dims)) * size // block
        raw = mm[start + off : start + off + n_bytes]
        if qtype.name in _FLOAT_DTYPES:
            data = raw.view(_FLOAT_DTYPES[qtype.name]).reshape(rows)
        else:
            data = raw.reshape(*rows[:-1], rows[-1] // block * size)
        tensors.append(GGUFTensor(name, qtype, dims, data))
    return GGUFIndex(meta, tensors, mapping)


def gguf_architecture(index: GGUFIndex) -> str:
    arch = index.metadata.get("general.architecture")
    if not isinstance(arch, str):
        raise GGUFLoadError("GGUF file has no general.architecture")
    return arch


def dequantize_rows(t, start: int = 0, stop: int | None = None) -> np.ndarray:
    """fp32 rows ``[start, stop)`` of a 2-D GGUF tensor (all of a 1-D one), in transformers' (rows, cols) layout."""
    from gguf.quants import dequantize

    data = t.data if t.data.ndim == 1 else t.data[start:stop]
    out = np.asarray(dequantize(data, t.tensor_type), dtype=np.float32)
    return out if out.flags.writeable else out.copy()  # F32 comes back as a view of the read-only map


def int8_rows(t, release=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 weight, fp32 per-row scale) of a 2-D GGUF tensor, dequantized ``CHUNK_ROWS`` rows at a time
    (``release()`` after each block)."""
    rows, cols = int(t.shape[1]), int(t.shape[0])  # ggml lists the row length first
    q = torch.empty(rows, cols, dtype=torch.int8)
    s = torch.empty(rows, dtype=torch.float32)
    for a in range(0, rows, CHUNK_ROWS):
        w = torch.from_numpy(dequantize_rows(t, a, a + CHUNK_ROWS))
        q[a : a + len(w)], s[a : a + len(w)] = quantize_rows(w)
        del w
        if release:
            release()
    return q, s


def float_tensor(t, dtype: torch.dtype, release=None) -> torch.Tensor:
    """A GGUF tensor in ``dtype``, transformers' shape, converted ``CHUNK_ROWS`` rows at a time."""
    if len(t.shape) == 1:
        return torch.from_numpy(dequantize_rows(t)).to(dtype)
    rows, cols = int(t.shape[1]), int(t.shape[0])
    out = torch.empty(rows, cols, dtype=dtype)
    for a in range(0, rows, CHUNK_ROWS):
        w = torch.from_numpy(dequantize_rows(t, a, a + CHUNK_ROWS))
        out[a : a + len(w)] = w
        del w
        if release:
            release()
    return out


INT4_TYPES = ("Q4_K", "Q4_0", "Q4_1")  # llama.cpp block formats that are (q - 8) * scale + zero per 32 exactly


def _f16(b: np.ndarray) -> np.ndarray:
    """Little-endian fp16 fields (last axis 2 bytes) as fp32, without the trailing axis."""
    return np.ascontiguousarray(b).view(np.float16)[..., 0].astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """Bytes (..., n) -> 4-bit values (..., 2n): the n low nibbles first, then the n high ones (ggml's order)."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def int4_groups(t, start: int = 0, stop: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows ``[start, stop)`` of a Q4_K / Q4_0 / Q4_1 tensor as (q uint8 0..15 (rows, cols), scale and zero
    fp32 (rows, cols / 32)) with ``w = (q - 8) * scale + zero``: the file's own 4-bit values, no rounding."""
    kind = t.tensor_type.name
    raw = np.asarray(t.data[start:stop])
    rows = raw.shape[0]
    if kind == "Q4_K":  # 256-value super-blocks: fp16 d, dmin; 8 six-bit (scale, min) pairs; 128 bytes of nibbles
        from gguf.quants import Q4_K

        b = raw.reshape(rows, -1, 144)
        nb = b.shape[1]
        sc, mn = Q4_K.get_scale_min(np.ascontiguousarray(b[..., 4:16]).reshape(-1, 12))
        scale = _f16(b[..., 0:2])[..., None] * sc.reshape(rows, nb, 8).astype(np.float32)
        zero = 8 * scale - _f16(b[..., 2:4])[..., None] * mn.reshape(rows, nb, 8).astype(np.float32)
        q = _nibbles(b[..., 16:].reshape(rows, nb, 4, 32))  # pair i: sub-blocks 2i (low) and 2i + 1 (high)
    elif kind in ("Q4_0", "Q4_1"):  # 32-value blocks: fp16 d (and fp16 m for Q4_1), 16 bytes of nibbles
        off = 2 if kind == "Q4_0" else 4
        b = raw.reshape(rows, -1, 16 + off)
        scale = _f16(b[..., 0:2])
        zero = np.zeros_like(scale) if kind == "Q4_0" else _f16(b[..., 2:4]) + 8 * scale
        q = _nibbles(b[..., off:])
    else:
        raise GGUFLoadError(f"{t.name}: {kind} is not a 4-bit group format ({', '.join(INT4_TYPES)})")
    return (
        torch.from_numpy(q.reshape(rows, -1)),
        torch.from_numpy(scale.reshape(rows, -1)),
        torch.from_numpy(zero.reshape(rows, -1)),
    )


def bytes_per_token(gguf: str | Path) -> dict[str, int]:
    """Weight bytes one decode step reads, from the tensor table alone: ``gguf`` as llama.cpp runs the file
    (every tensor but the embedding, whose one row is gathered; a tied head reads the embedding) and
    ``int8`` as ``--weights int8`` holds it (1 byte per weight and a bf16 scale per row, a tied head
    included: it shares the embedding's int8 table)."""
    index = open_gguf(gguf)
    names = {t.name for t in index.tensors}
    tied = "output.weight" not in names
    out = {"gguf": 0, "int8": 0}
    for t in index.tensors:
        embed = t.name == "token_embd.weight"
        if len(t.shape) == 2 and (not embed or tied):
            out["gguf"] += t.data.nbytes
            rows, cols = int(t.shape[1]), int(t.shape[0])
            out["int8"] += rows * (cols + 2)
        elif not embed:
            out["gguf"] += t.data.nbytes
            out["int8"] += t.data.size * 2
    return out
