"""What ``--engine vllm`` hands to ``vllm serve``: the model directory, and one LoRA adapter per
exported steering combination.

vLLM applies a LoRA adapter at scale 1 and has no per-request scale, so every strength a client
may ask for is its own adapter, with the strength folded into ``B`` (:func:`directions.lora.lora_pairs`).
A *combination* is the sorted tuple of ``(direction, strength)`` pairs with nonzero strength:
``(("refusal", 1.0),)`` is the adapter ``refusal-1.0``; ``(("refusal", 1.0), ("slop", 0.5))`` is
``refusal-1.0+slop-0.5``, a rank-2 adapter whose delta is the sum of the two rank-1 edits (exact
for orthogonal directions, like stacking the llama.cpp engine's adapters). ``()`` is the base model.

vLLM 0.32 refuses ``embed_tokens`` as a LoRA target, so these adapters leave the token
embedding's term out (every attention and MLP writer is in): that is not exactly the hooked
model, and it is why the engine's capabilities say so. Adapters are written once per
(model directory, directions, combinations) into the cache, like the llama.cpp engine's.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

import torch

from directions.fileformat import DirectionSet
from directions.files import file_key

log = logging.getLogger("frankly.engine.vllm")

Combination = tuple[tuple[str, float], ...]
BASE: Combination = ()


def combination(strengths: dict[str, float]) -> Combination:
    """The combination of a request's strengths (zeros dropped, sorted by name)."""
    return tuple(sorted((n, float(s)) for n, s in strengths.items() if float(s) != 0.0))


def combination_label(c: Combination) -> str:
    """``refusal=1.0``, ``refusal=1.0+slop=0.5`` (as in error messages and flags)."""
    return "+".join(f"{n}={s!r}" for n, s in c) or "none"


def adapter_name(c: Combination) -> str:
    """vLLM's model name of the adapter: ``refusal-1.0``, ``refusal-1.0+slop-0.5``."""
    return "+".join(f"{n}-{s!r}" for n, s in c)


def parse_combination(spec: str, directions: dict[str, DirectionSet]) -> Combination:
    """``refusal=1.0,slop=0.5`` (or ``+`` between pairs) -> a combination; ValueError says what is wrong."""
    out: dict[str, float] = {}
    for part in spec.replace("+", ",").split(","):
        name, sep, raw = part.strip().partition("=")
        if not sep or name not in directions:
            raise ValueError(
                f"bad vLLM combination {spec!r}: each part is NAME=STRENGTH with NAME one of {sorted(directions)}"
            )
        out[name] = float(raw)
    c = combination(out)
    if len(c) < 1:
        raise ValueError(f"vLLM combination {spec!r} has no nonzero strength")
    return c


def combinations_for(
    directions: dict[str, DirectionSet], strengths: list[float], extra: list[Combination]
) -> list[Combination]:
    """Every direction at every strength, then the extra combinations (duplicates dropped, order kept)."""
    out: list[Combination] = []
    for name in directions:
        for s in strengths:
            if float(s) != 0.0:
                out.append(((name, float(s)),))
    for c in extra:
        out.append(c)
    return list(dict.fromkeys(out))


# --- the model directory vLLM loads -------------------------------------------------------------


def vllm_model_dir(path: str, root: Path) -> str:
    """The directory (or hub id) to give ``vllm serve`` for ``path``.

    A directory converted from a GGUF carries transformers' ``quantization_config`` (method
    ``gguf``), which vLLM rejects ("Unknown quantization method: gguf") although the weights
    are plain: such a directory gets a view (symlinks, config.json without that key) in the
    cache. Anything else is passed unchanged."""
    src = Path(path)
    cfg_path = src / "config.json"
    if not cfg_path.is_file():
        return path  # a hub id: vLLM fetches it itself
    cfg = json.loads(cfg_path.read_text())
    if (cfg.get("quantization_config") or {}).get("quant_method") != "gguf":
        return path
    cfg.pop("quantization_config")
    view = root / "vllm-models" / f"{src.name}-{file_key(cfg_path)}"
    if not (view / "config.json").is_file():
        tmp = view.with_name(view.name + f".tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for f in src.iterdir():
            if f.name != "config.json":
                (tmp / f.name).symlink_to(f.resolve())
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
        shutil.rmtree(view, ignore_errors=True)
        tmp.rename(view)
    return str(view)


# --- adapters -------------------------------------------------------------------------------------


def adapter_cache_dir(
    model_path: str, directions: dict[str, DirectionSet], combos: list[Combination], root: Path
) -> Path:
    """One cache entry per (model directory, direction contents, combinations)."""
    cfg = Path(model_path) / "config.json"
    h = hashlib.sha256((file_key(cfg) if cfg.is_file() else model_path).encode())
    for name in sorted(directions):
        ds = directions[name]
        h.update(name.encode())
        h.update(ds.directions.numpy().tobytes())
        h.update(ds.layer_weights.numpy().tobytes())
    h.update(repr(sorted(combos)).encode())
    return root / "lora-vllm" / f"{Path(model_path).name}-{h.hexdigest()[:16]}"


def stacked_pairs(model, directions: dict[str, DirectionSet], combo: Combination) -> list:
    """The linear writers' LoRA pairs of ``combo``: per module, the rank-1 factors of each direction side
    by side (rank = number of directions), the embedding left out (see the module docstring)."""
    from directions.lora import LoraPair, lora_pairs

    per = [{p.module: p for p in lora_pairs(model, directions[n], scale=s) if p.kind != "embed"} for n, s in combo]
    out = []
    for module in sorted(set().union(*per)):
        first = next(d[module] for d in per if module in d)
        a = [d[module].A if module in d else torch.zeros_like(first.A) for d in per]
        b = [d[module].B if module in d else torch.zeros_like(first.B) for d in per]
        biases = [d[module].bias for d in per if module in d and d[module].bias is not None]
        bias = torch.stack(biases).sum(0) if biases else None
        out.append(LoraPair(module, first.kind, torch.cat(a, 0), torch.cat(b, 1), bias))
    return out


def write_adapter(out: Path, model, directions: dict[str, DirectionSet], combo: Combination, base: str) -> Path:
    """One PEFT adapter directory for ``combo``: rank k = alpha k, so vLLM's scale alpha/r is 1."""
    from directions.lora import ADAPTER_CONFIG, write_peft_adapter

    pairs = stacked_pairs(model, directions, combo)
    meta = {"name": adapter_name(combo), "combination": dict(combo), "embedding": "left out (vLLM)"}
    path = write_peft_adapter(out / adapter_name(combo), pairs, base, meta)
    cfg = json.loads((path / ADAPTER_CONFIG).read_text())
    cfg["r"] = cfg["lora_alpha"] = len(combo)
    (path / ADAPTER_CONFIG).write_text(json.dumps(cfg, indent=2))
    return path


def ensure_adapters(
    model_path: str, directions: dict[str, DirectionSet], combos: list[Combination], root: Path
) -> dict[Combination, Path]:
    """combination -> PEFT adapter directory, writing them once (a progress bar while it does)."""
    if not combos:
        return {}
    out = adapter_cache_dir(model_path, directions, combos, root)
    done = out / "frankly_vllm_adapters.json"
    if not done.is_file():
        from tqdm import tqdm

        from directions.bake_io import load_source_model

        log.info("writing %d LoRA adapter(s) for vLLM into %s (one-time)", len(combos), out)
        model, _tok = load_source_model(model_path, model_path)
        tmp = out.with_name(out.name + f".tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        for c in tqdm(combos, desc="vLLM adapters", unit="adapter"):
            write_adapter(tmp, model, directions, c, model_path)
        (tmp / done.name).write_text(json.dumps([adapter_name(c) for c in combos], indent=2))
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
    return {c: out / adapter_name(c) for c in combos}
