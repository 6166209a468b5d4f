"""Exporting directions as LoRA adapters: one directory, written atomically like a bake.

Layout of an export (``OUT`` is a name under the bake directory, or a path)::

    OUT/frankly_lora.json           what was exported, from what, and what differs
    OUT/<name>/                     PEFT adapter: adapter scale s == frankly strength s
    OUT/<name>.gguf                 llama.cpp adapter: --lora-scaled / per-request "lora" scale s
    OUT/<name>-<s>/, <name>-<s>.gguf  the same with strength s folded in (vLLM, Ollama: no per-request scale)

The GGUF adapters need the base GGUF (the source model's own, or
``gguf_base``) to name and check tensors.
"""

from __future__ import annotations

import datetime as _dt
import json
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from directions.bake import Progress, check_fits
from directions.bake_errors import BakeError, BakeGGUFError, UnknownDirection
from directions.bake_io import claim_output, load_source_model, output_path, source_of, staged_output
from directions.fileformat import DirectionSet
from directions.gguf_write import write_baked_gguf
from directions.lora import (
    GGUFBase,
    LoraExportError,
    LoraPair,
    read_gguf_base,
    write_gguf_adapter,
    write_peft_adapter,
)
from directions.lora import lora_pairs as _pairs
from directions.writers import has_post_norm

MANIFEST = "frankly_lora.json"
FORMATS = ("peft", "gguf")
GGUF_EMBEDDING = ("auto", "include", "omit", "untie")
UNTIED_BASE = "base-untied.gguf"


class LoraUnsupportedError(BakeError):
    code = "lora_unsupported"


@dataclass
class ExportedAdapter:
    """One adapter of an export, as listed in the manifest."""

    name: str  # adapter name: the direction, or <direction>-<strength>
    direction: str
    folded_strength: float | None  # None: scale it per request; else the strength baked into B
    peft: str | None = None  # directory, relative to the export
    gguf: str | None = None  # file, relative to the export
    modules: int = 0
    gguf_embedding: bool | None = None  # whether token_embd is in the GGUF adapter
    notes: list[str] = field(default_factory=list)


def strength_label(s: float) -> str:
    """``1`` -> ``1.0``, ``0.5`` -> ``0.5``, ``-0.25`` -> ``-0.25`` (as in adapter names)."""
    return repr(float(s))


def _peft_pairs(pairs: list[LoraPair], model_type: str) -> list[LoraPair]:
    if any(p.bias is not None for p in pairs) and any(p.kind == "embed" for p in pairs):
        raise LoraUnsupportedError(
            f"{model_type}: its writers have biases, and PEFT cannot combine a LoRA-B bias (lora_bias) with an "
            "embedding adapter in one adapter; bake the direction instead (frankly bake)",
            param="direction",
        )
    return pairs


def _gguf_pairs(pairs: list[LoraPair], tied: bool, policy: str, notes: list[str]) -> tuple[list[LoraPair], bool]:
    """The pairs for the GGUF adapter and whether ``token_embd`` is among them.

    llama.cpp looks adapters up by tensor name, and a GGUF without
    ``output.weight`` uses ``token_embd`` as its LM head too: it would then
    apply the embedding adapter to the head's matmul, where the shapes do not
    fit, and abort (a ggml assertion; seen with llama.cpp from
    llama-cpp-python 0.3.36). ``untie`` writes a copy of the base with its own
    ``output.weight`` (see :func:`export_lora`), after which the embedding
    adapter is exact.
    """
    if not any(p.kind == "embed" for p in pairs):
        return pairs, False
    if policy == "include" and tied:
        raise LoraExportError(
            "the base GGUF ties its LM head to token_embd, and llama.cpp aborts when an adapter for "
            "token_embd meets a tied head: use gguf_embedding 'untie' (exact, writes an untied base copy) "
            "or 'omit' (drops the embedding term)"
        )
    if policy == "omit" or (policy == "auto" and tied):
        notes.append(
            "token_embd left out of the GGUF adapter"
            + (
                " because the base GGUF ties its LM head to it (llama.cpp would abort): the edit of the embedding "
                "output is missing (export with gguf_embedding 'untie' for the exact edit)"
                if tied
                else " on request"
            )
        )
        return [p for p in pairs if p.kind != "embed"], False
    return pairs, True


def export_lora(
    source,
    directions: dict[str, DirectionSet],
    out_dir: str | Path,
    *,
    names: Iterable[str] | None = None,
    strengths: Iterable[float] | Mapping[str, Iterable[float]] = (),
    formats: Iterable[str] = FORMATS,
    gguf_base: str | Path | None = None,
    gguf_embedding: str = "auto",
    peft_embedding: bool = True,
    bake_root: str | Path | None = None,
    overwrite: bool = False,
    progress: Progress | None = None,
) -> Path:
    """Write LoRA adapters for ``names`` (default: every direction) of ``source`` into ``out_dir``, atomically.

    ``source`` is a model spec (``demo``, a directory, a ``.gguf``) or a
    ``LoadedModel``; ``strengths`` adds one folded adapter per direction and
    strength (a list for every direction, or a mapping name -> list). ``formats`` picks ``peft`` and/or ``gguf`` (the latter needs a
    base GGUF: the source's own or ``gguf_base``). ``gguf_embedding`` says
    what to do with ``token_embd`` in the GGUF adapter when the base GGUF
    ties its LM head to it: ``auto``/``omit`` leave it out (noted in the
    manifest), ``untie`` writes ``base-untied.gguf`` beside the adapters
    (the base's bytes plus its own ``output.weight``) and keeps it, exactly;
    ``include`` refuses, since llama.cpp would abort. ``peft_embedding=False``
    leaves the embedding out of the PEFT adapters (vLLM 0.32 refuses an
    ``embed_tokens`` target; the manifest notes what is missing).
    Returns the final directory; raises a :class:`BakeError` subclass on bad input.
    """
    t0 = time.monotonic()
    report = progress or (lambda f, m: None)
    formats = _check_options(formats, gguf_embedding)
    names, jobs = _jobs(directions, names, strengths)
    final = output_path(out_dir, bake_root)
    path, src_gguf, label = source_of(source)
    gguf_path = _gguf_base_path(formats, gguf_base, src_gguf, label)
    claim_output(final, (path, gguf_path), overwrite)

    report(0.0, f"loading {label}")
    model, _tok = load_source_model(path, label)
    check_fits(directions, names, model.config)
    base = read_gguf_base(gguf_path) if "gguf" in formats else None
    untie = base is not None and base.tied_output and gguf_embedding == "untie"
    opts = _Options.of(model, label, formats, gguf_embedding, peft_embedding)
    try:
        with staged_output(final, overwrite) as tmp:
            if untie:
                report(0.02, f"writing {UNTIED_BASE} (the base with its own output.weight)")
                base = _write_untied_base(gguf_path, tmp, base)
            adapters = []
            for k, (dname, s) in enumerate(jobs):
                report(0.05 + 0.9 * k / len(jobs), f"adapter {_adapter_name(dname, s)}")
                adapters.append(_write_adapter(tmp, model, directions[dname], dname, s, base, opts))
            manifest = _manifest(label, path, gguf_path, untie, formats, adapters, time.monotonic() - t0)
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str))
    except LoraExportError as e:
        raise LoraUnsupportedError(str(e), param="direction") from e
    report(1.0, f"done: {final}")
    return final


@dataclass
class _Options:
    """What every adapter of one export is written with."""

    label: str  # the source, as the user called it
    formats: tuple[str, ...]
    gguf_embedding: str
    peft_embedding: bool
    model_type: str
    post_norm: bool

    @classmethod
    def of(cls, model, label: str, formats: tuple[str, ...], gguf_embedding: str, peft_embedding: bool) -> _Options:
        model_type = getattr(model.config, "model_type", type(model).__name__)
        return cls(label, formats, gguf_embedding, peft_embedding, model_type, has_post_norm(model))


def _check_options(formats: Iterable[str], gguf_embedding: str) -> tuple[str, ...]:
    formats = tuple(dict.fromkeys(formats))
    if not formats or any(f not in FORMATS for f in formats):
        raise BakeError(f"formats must be some of {', '.join(FORMATS)}, not {formats!r}", param="format")
    if gguf_embedding not in GGUF_EMBEDDING:
        raise BakeError(f"gguf_embedding must be one of {', '.join(GGUF_EMBEDDING)}", param="gguf_embedding")
    return formats


def _jobs(
    directions: dict[str, DirectionSet],
    names: Iterable[str] | None,
    strengths: Iterable[float] | Mapping[str, Iterable[float]],
) -> tuple[list[str], list[tuple[str, float | None]]]:
    """The directions to export (checked), and the adapters to write: (direction, None) for each,
    then (direction, strength) for each strength folded in."""
    names = list(dict.fromkeys(names)) if names is not None else list(directions)
    if not names:
        raise UnknownDirection("no direction to export")
    for n in names:
        if n not in directions:
            raise UnknownDirection(f"unknown direction {n!r} (loaded: {', '.join(sorted(directions)) or 'none'})")
    if isinstance(strengths, Mapping):
        folded = {n: [float(s) for s in strengths.get(n, ())] for n in names}
    else:
        every = tuple(float(s) for s in strengths)
        folded = dict.fromkeys(names, every)
    return names, [(n, None) for n in names] + [(n, s) for n in names for s in dict.fromkeys(folded[n])]


def _gguf_base_path(formats: tuple[str, ...], gguf_base, src_gguf: str | None, label: str) -> str | None:
    """The base GGUF of the llama.cpp adapters: ``gguf_base``, else the source's own (needed for ``gguf``)."""
    gguf_path = str(gguf_base) if gguf_base else src_gguf
    if "gguf" in formats and not gguf_path:
        raise BakeGGUFError(
            f"{label} is not a GGUF model: pass a base GGUF to write llama.cpp adapters", param="format"
        )
    return gguf_path


def _write_untied_base(gguf_path: str, tmp: Path, base: GGUFBase) -> GGUFBase:
    """:data:`UNTIED_BASE` in ``tmp``: the base GGUF with its own ``output.weight``; returns it as the new base."""
    write_baked_gguf(gguf_path, tmp / UNTIED_BASE, {}, [], untie=True)
    return GGUFBase(
        str(tmp / UNTIED_BASE), base.arch, {**base.shapes, "output.weight": base.shapes["token_embd.weight"]}
    )


def _adapter_name(direction: str, s: float | None) -> str:
    return direction if s is None else f"{direction}-{strength_label(s)}"


def _write_adapter(
    tmp: Path, model, ds: DirectionSet, dname: str, s: float | None, base: GGUFBase | None, opts: _Options
) -> ExportedAdapter:
    """One adapter (``s`` None: scaled per request; else folded in) in each format asked for."""
    aname = _adapter_name(dname, s)
    pairs = _pairs(model, ds, 1.0 if s is None else s)
    ad = ExportedAdapter(aname, dname, s, modules=len(pairs))
    meta = {
        "direction": dname,
        "folded_strength": s,
        "source": opts.label,
        "direction_metadata": ds.public_metadata(),
    }
    if opts.post_norm:
        ad.notes.append(
            f"{opts.model_type} normalises each writer's output before the residual add: the adapter equals "
            "frankly's hooks (both edit the writer output before that norm), not an edit of the residual stream"
        )
    if "peft" in opts.formats:
        ppairs = _peft_pairs(pairs, opts.model_type)
        if not opts.peft_embedding and any(p.kind == "embed" for p in ppairs):
            ppairs = [p for p in ppairs if p.kind != "embed"]
            ad.notes.append("embed_tokens left out of the PEFT adapter on request (for vLLM)")
        write_peft_adapter(tmp / aname, ppairs, opts.label, {**meta, "adapter": aname})
        ad.peft = aname
    if base is not None:
        gpairs, ad.gguf_embedding = _gguf_pairs(pairs, base.tied_output, opts.gguf_embedding, ad.notes)
        write_gguf_adapter(tmp / f"{aname}.gguf", gpairs, base, {**meta, "adapter": aname, "name": aname})
        ad.gguf = f"{aname}.gguf"
    return ad


def _manifest(
    label: str, path: str, gguf_path: str | None, untie: bool, formats, adapters: list[ExportedAdapter], seconds: float
) -> dict:
    """The content of :data:`MANIFEST`."""
    return {
        "source": {"model": label, "path": str(path), "gguf": gguf_path},
        # the GGUF adapters' base: the source's GGUF, or the untied copy written here
        "gguf_base": UNTIED_BASE if untie else gguf_path,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "formats": list(formats),
        "rank": 1,
        "alpha": 1,
        "scale_is_strength": True,
        "stacking": "several adapters add their deltas; frankly applies directions one after another: "
        "the two agree exactly only for orthogonal directions",
        "adapters": [a.__dict__ for a in adapters],
        "seconds": round(seconds, 2),
    }
