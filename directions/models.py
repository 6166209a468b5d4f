"""Loading models: a hub id, a local directory, a .gguf file, or ``demo``.

GGUF files are dequantized by transformers once and cached as a plain
safetensors directory (transformers refuses ``save_pretrained`` on a GGUF
load, and re-dequantizing costs a minute on two cores every start).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from directions.demo import DemoModelError, ensure_demo_gguf
from directions.files import cache_root, file_key

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger("frankly.model")


class ModelLoadError(RuntimeError):
    """A model could not be found, verified or loaded; the message says which and why."""


def resolve_dtype(name: str, device: str) -> torch.dtype:
    """``auto`` is fp32 on CPUs (no fast bf16 on most), bf16 on CUDA with bf16 support, fp16 else."""
    if name != "auto":
        table = {
            "float32": torch.float32,
            "fp32": torch.float32,
            "bfloat16": torch.bfloat16,
            "bf16": torch.bfloat16,
            "float16": torch.float16,
            "fp16": torch.float16,
        }
        if name not in table:
            raise ModelLoadError(f"unknown dtype {name!r}; choose one of auto, {', '.join(table)}")
        return table[name]
    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device == "mps":
        return torch.float16
    return torch.float32


def resolve_device(name: str) -> str:
    """``auto`` is cuda when available, then mps, then cpu; anything else is taken as given."""
    if name != "auto":
        return name
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def _gguf_cache_dir(gguf: Path) -> Path:
    return cache_root() / "converted" / f"{gguf.stem}-{file_key(gguf)}"


def convert_gguf(gguf: Path, out_dir: Path | None = None) -> Path:
    """Dequantize a GGUF file once into a safetensors directory (atomic); return the directory."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = Path(gguf)
    if not gguf.is_file():
        raise ModelLoadError(f"GGUF file not found: {gguf}")
    out_dir = Path(out_dir) if out_dir else _gguf_cache_dir(gguf)
    if (out_dir / "config.json").is_file():
        return out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    log.info("converting %s to a safetensors directory at %s (one-time, about a minute)", gguf, out_dir)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=out_dir.parent))
    try:
        try:
            tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        except Exception as e:  # transformers raises many types for a bad file
            raise ModelLoadError(f"could not read GGUF file {gguf}: {e}") from e
        sd = {k: v.contiguous() for k, v in model.state_dict().items()}
        if getattr(model.config, "tie_word_embeddings", False):
            sd.pop("lm_head.weight", None)
        save_file(sd, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        cfg = model.config.to_dict()
        cfg["architectures"] = [type(model).__name__]
        cfg["dtype"] = "float32"
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
        model.generation_config.save_pretrained(str(tmp))
        tok.save_pretrained(str(tmp))
        (tmp / "frankly_source.json").write_text(json.dumps({"gguf": str(gguf.resolve())}))
        os.replace(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


@dataclass
class LoadedModel:
    """A model ready for inference, and where it came from (bakes reload ``path``)."""

    model: torch.nn.Module
    tokenizer: PreTrainedTokenizerBase
    source: str  # what the user asked for
    path: str  # the directory actually loaded
    device: str
    dtype: torch.dtype
    gguf: str | None = None  # original GGUF file, if any


def locate(spec: str) -> tuple[str, str | None]:
    """Turn a model spec into (directory or hub id, original gguf path or None)."""
    gguf = locate_gguf(spec)
    if gguf is not None:
        return str(convert_gguf(gguf)), str(gguf)
    p = Path(spec).expanduser()
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise ModelLoadError(f"model directory {p} has no config.json")
        return str(p), None
    if p.exists():
        raise ModelLoadError(f"{p} is neither a model directory nor a .gguf file (pickle checkpoints are not loaded)")
    if spec.startswith((".", "/", "~")):
        raise ModelLoadError(f"model path not found: {spec}")
    return spec, None  # a hub id


def load_model(
    spec: str,
    device: str = "auto",
    dtype: str = "auto",
    weights: str = "float",
    int8_kernel: str | None = None,
    kv_dtype: str = "auto",
) -> LoadedModel:
    """Load a causal LM and its tokenizer for inference (eval mode, no grad).

    ``dtype``: ``auto`` (see :func:`resolve_dtype`), a dtype name, or ``stored`` for the
    checkpoint's own dtype (what a bake edits and writes back). ``weights="int8"``: every linear
    layer int8 per channel, float32 activations on frankly's kernel and bfloat16 on torch's
    (:func:`quantized_compute_dtype`; CPU only; :mod:`directions.quant`); a GGUF source
    is then read tensor by tensor (:mod:`directions.gguf_load`), never as a whole fp32 model.
    ``weights="int4"`` (GGUF only): its Q4_K / Q4_0 / Q4_1 tensors as they are, the rest int8.
    ``int8_kernel``: auto / frankly / aten (:func:`directions.kernels.choose`; default the
    ``FRANKLY_INT8_KERNEL`` environment variable, else auto), resolved here for quantized weights.
    ``kv_dtype``: the engine's KV cache (:func:`set_kv_cache_dtype`)."""
    if kv_dtype not in KV_DTYPES:
        raise ModelLoadError(f"unknown KV cache dtype {kv_dtype!r}; choose one of {', '.join(KV_DTYPES)}")
    if weights in ("int8", "int4"):
        from directions import kernels

        try:
            kernels.choose(int8_kernel)
        except kernels.KernelError as e:
            raise ModelLoadError(str(e)) from e
        lm = _load_quantized(spec, device, weights, dtype)
    elif weights != "float":
        raise ModelLoadError(f"unknown weights format {weights!r}; choose float, int8 or int4")
    else:
        lm = _load_float(spec, device, dtype)
    if kv_dtype == "auto":  # bf16 keys and values under an int8 model's fp32 activations (SDPA), else as computed
        sdpa = lm.model.config._attn_implementation == "sdpa"
        kv = torch.bfloat16 if weights != "float" and lm.dtype == torch.float32 and sdpa else None
    else:
        kv = {"float32": torch.float32, "bfloat16": torch.bfloat16}[kv_dtype]
    set_kv_cache_dtype(lm.model, None if kv == lm.dtype else kv)
    return lm


KV_DTYPES = ("auto", "float32", "bfloat16")
_MIXED_ATTENTION = "frankly_sdpa_stored_kv"


def _mixed_sdpa(module, query, key, value, attention_mask, **kwargs):
    """transformers' SDPA attention when the cache keeps keys and values in another dtype than the
    activations: the layer's keys and values are widened to the activations' dtype for the call (one
    layer at a time). Attention in bf16 instead ran 1.5x slower on an AVX2 CPU at 8 rows x 290 positions."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if _one_pass_decode(query, key, attention_mask, kwargs):
        scaling = kwargs.get("scaling")
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        return torch.ops.frankly.decode_attention(query, key, value, attention_mask, scale), None
    if key.dtype == query.dtype:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    return sdpa_attention_forward(module, query, key.to(query.dtype), value.to(query.dtype), attention_mask, **kwargs)


def _one_pass_decode(query, key, attention_mask, kwargs) -> bool:
    """Whether frankly's ``decode_attention`` can stand in for SDPA: one fp32 query position per row
    (a decode step) on the CPU, no autograd, grouped heads, plain attention (no dropout, sliding
    window, soft cap or sinks), and no mask or transformers' bool [B or 1, 1, 1, L] mask. Measured on
    an AVX2 EPYC at 150 cached bf16 positions: 35 us a layer against 115 us for widening the cache and
    SDPA."""
    from directions import kernels

    qs = query.shape
    if len(qs) != 4 or qs[2] != 1 or query.dtype != torch.float32 or query.device.type != "cpu":
        return False
    if not kernels.loaded() or query.requires_grad or qs[1] % key.shape[1] or kwargs.get("dropout"):
        return False
    get = kwargs.get
    if get("sliding_window") is not None or get("softcap") is not None or get("s_aux") is not None:
        return False
    m = attention_mask
    if m is None:
        return True
    ms = m.shape
    return (
        m.dtype == torch.bool and len(ms) == 4 and ms[0] in (1, qs[0]) and ms[1] == ms[2] == 1 and ms[3] == key.shape[2]
    )


def set_kv_cache_dtype(model: torch.nn.Module, dtype: torch.dtype | None) -> None:
    """Make the engine keep ``model``'s keys and values in ``dtype`` (None: the activations' own dtype).

    With a dtype of its own the cache (:func:`server.engine.kvcache.new_cache`) stores keys and values
    rounded to it, and attention widens each layer's back for its call: for an int8 model computing in
    fp32, a bf16 cache is half the cache's bytes (RSS under many long streams); the arithmetic stays fp32."""
    if dtype is None:
        model.frankly_kv_dtype = None
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    if model.config._attn_implementation not in ("sdpa", _MIXED_ATTENTION):
        raise ModelLoadError(
            f"a {dtype} KV cache needs SDPA attention; this model uses {model.config._attn_implementation}"
        )
    AttentionInterface.register(_MIXED_ATTENTION, _mixed_sdpa)
    ALL_MASK_ATTENTION_FUNCTIONS.register(_MIXED_ATTENTION, sdpa_mask)
    model.config._attn_implementation = _MIXED_ATTENTION
    model.frankly_kv_dtype = dtype


def kv_cache_dtype(model: torch.nn.Module) -> torch.dtype | None:
    """The dtype the engine's KV cache keeps for ``model`` (None: its activations' dtype)."""
    return getattr(model, "frankly_kv_dtype", None)


def quantized_compute_dtype(weights: str, dtype: str = "auto") -> torch.dtype:
    """The activations' dtype of a quantized model (``dtype``: auto, float32 or bfloat16). auto:
    float32 for int8 on frankly's kernel (it widens every activation itself, so fp32 costs it nothing
    and removes bf16's rounding between layers: first-token KL against fp32 0.0017 instead of 0.0023
    at the same speed, measured on the demo; the KV cache doubles), bfloat16 on torch's kernels
    (``_weight_int8pack_mm`` and the int4 kernel are fast only on bf16)."""
    from directions import kernels

    if dtype in ("float32", "fp32"):
        return torch.float32
    if dtype in ("bfloat16", "bf16"):
        return torch.bfloat16
    if dtype != "auto":
        raise ModelLoadError(f"--weights {weights} computes in float32 or bfloat16 (--dtype), not {dtype}")
    return torch.float32 if weights == "int8" and kernels.current().name == "frankly" else torch.bfloat16


def _load_quantized(spec: str, device: str, weights: str, dtype: str = "auto") -> LoadedModel:
    from directions import lean
    from directions.quant import QuantizationError, fuse_shared_inputs, quantize_model, weights_to_huge_pages

    dev = resolve_device(device)
    if dev != "cpu":
        raise QuantizationError(
            f"--weights {weights} runs torch's CPU kernels; use --device cpu (on GPUs use --dtype bfloat16)"
        )
    gguf = locate_gguf(spec)
    if gguf is None and weights == "int4":
        raise QuantizationError("--weights int4 loads a GGUF's own 4-bit tensors: give a .gguf model (or demo)")
    cdt = quantized_compute_dtype(weights, dtype)
    if gguf is None:  # safetensors / hub: load in fp32, then quantize layer by layer
        lm = _load_float(spec, dev, "float32")
        quantize_model(lm.model, compute_dtype=cdt)
        fuse_shared_inputs(lm.model)
        lm.model.frankly_lean_layers = lean.install(lm.model)  # fewer small ops a layer (directions/lean.py)
        from directions.gguf_load import release_freed_memory

        lm.model.frankly_huge_page_bytes = weights_to_huge_pages(lm.model, after_each=release_freed_memory)
        release_freed_memory()  # the fp32 weights and the unstacked int8 copies
        lm.dtype = cdt
        return lm
    from transformers import AutoConfig, AutoTokenizer

    from directions.gguf_load import GGUFLoadError, load_quantized_from_gguf, meta_dir

    try:
        cfg_dir = meta_dir(gguf, _gguf_cache_dir(gguf))
        tok = AutoTokenizer.from_pretrained(str(cfg_dir))
        model = load_quantized_from_gguf(gguf, AutoConfig.from_pretrained(str(cfg_dir)), cdt, weights)
    except GGUFLoadError as e:
        raise ModelLoadError(str(e)) from e
    model.generation_config = _generation_config(cfg_dir, model.config)
    model.requires_grad_(False)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    # path: where the fp32 copy lives (a bake loads it from there; convert_gguf makes it on first use)
    return LoadedModel(model, tok, spec, str(_gguf_cache_dir(gguf)), dev, cdt, str(gguf))


def _generation_config(path: Path, config):
    from transformers import GenerationConfig

    try:
        return GenerationConfig.from_pretrained(str(path))
    except OSError:
        return GenerationConfig.from_model_config(config)


def locate_gguf(spec: str) -> Path | None:
    """The GGUF file a model spec names (the demo's, once installed), or None for a directory or hub id."""
    if spec == "demo":
        try:
            return ensure_demo_gguf()
        except DemoModelError as e:
            raise ModelLoadError(str(e)) from e
    p = Path(spec).expanduser()
    if p.suffix != ".gguf":
        return None
    if not p.is_file():
        raise ModelLoadError(f"GGUF file not found: {p}")
    return p


def _load_float(spec: str, device: str, dtype: str) -> LoadedModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, gguf = locate(spec)
    dev = resolve_device(device)
    dt = "auto" if dtype == "stored" else resolve_dtype(dtype, dev)  # transformers' "auto" is the stored dtype
    try:
        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dt, use_safetensors=True)
    except OSError as e:
        raise ModelLoadError(f"could not load model {spec!r}: {e}") from e
    dt = next(model.parameters()).dtype
    model.to(dev)
    model.eval()
    model.requires_grad_(False)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return LoadedModel(model=model, tokenizer=tok, source=spec, path=path, device=dev, dtype=dt, gguf=gguf)


def read_configs(spec: str, path: str):
    """(tokenizer, config, generation config) of the model directory ``path`` (what ``spec`` resolved
    to), for engines that load the weights themselves (llama.cpp, vLLM)."""
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    try:
        tok = AutoTokenizer.from_pretrained(path)
        config = AutoConfig.from_pretrained(path)
    except OSError as e:
        raise ModelLoadError(f"could not read the tokenizer or config of {spec!r}: {e}") from e
    try:
        gen = GenerationConfig.from_pretrained(path)
    except OSError:
        gen = GenerationConfig.from_model_config(config)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok, config, gen
