"""Direction files: safetensors tensors + string metadata (nothing executable).

Tensors: ``directions`` (n_layers, d_model) or (d_model,), ``layer_weights``
(n_layers,). Metadata: name, model fingerprint, hook sites, the extraction
convention, prompt hashes, method, chosen layers, eval figures, creation time.
Optional detection for conditional ablation: ``detect_vector`` (d_model,) with
metadata ``detect_layer`` and ``detect_threshold``, and optionally a term on the
unedited model's next-token distribution at the last prompt token: metadata
``detect_logit_tokens`` (a JSON list of token ids) and ``detect_logit_weight``;
the score is then ``h . detect_vector + weight * log P(any of those tokens)``
(:func:`directions.detection.condition_score`).

Optional per-component weights: ``component_weights`` (3, n_layers), rows in
:data:`COMPONENTS` order (embedding, attention output, MLP down projection). The
weight of writer (kind, l) is ``layer_weights[l] * component_weights[kind, l]``
(the embedding reads column 0); a file without the tensor means all ones, so
older files load unchanged and mean what they meant. :meth:`DirectionSet.writer_weight`
is the one accessor the hooks, the bake and the LoRA export share.

Optional firing-case edit for conditional mode: ``auto_directions`` (n_layers, d_model),
``auto_layer_weights`` (n_layers,) and optionally ``auto_component_weights`` (3, n_layers),
with metadata ``auto_edit`` (JSON: where it came from and what it measured). A ``when: auto``
request whose condition fires gets this edit instead of the file's own; ``when: always`` and
the bake keep the file's own. Damage on harmless prompts in ``auto`` mode comes only from the
condition's false positives, so the firing case can use an edit that removes more refusals at
a higher KL than the ``always`` edit could afford. Engines load it as one more direction named
``NAME@auto`` (:func:`edit_sets`); '@' cannot occur in a direction name.

Optional output-based condition: metadata ``auto_lookahead`` (JSON ``{"tokens": K, "judge":
"refusal"}``). A ``when: auto`` request of such a file decodes its first K tokens with the
direction off, holding them back from the client, and the named judge
(:data:`directions.detection.LOOKAHEAD_JUDGES`) reads their text: where it flags them the
row restarts from its prompt with the direction (its firing-case edit) on, same seed; else
the held tokens are released and the row goes on unedited. The prefill probe is then not
consulted (the file may keep it: removing the lookahead restores it).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

FORMAT_VERSION = "1"
FORMAT_VERSION_COMPONENTS = "2"  # written only when a file carries component_weights
AUTO_EDIT_SUFFIX = "@auto"  # engines' name for a file's firing-case edit: NAME@auto
COMPONENTS = ("embed", "attn", "mlp")  # rows of component_weights; Writer.kind values
HOOK_SITES = "embed_tokens,self_attn.o_proj,mlp.down_proj"
OPERATION = "project_out"
# hidden_states[i] is the residual stream entering decoder layer i (index 0 = embeddings).
CONVENTION = "hidden_states[i] = input of decoder layer i; position = last prompt token after chat template"
FINGERPRINT_KEYS = (
    "model_type",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "vocab_size",
    "max_position_embeddings",
    "rope_theta",
    "tie_word_embeddings",
)


class DirectionFileError(ValueError):
    """A direction file is missing, corrupt, or does not fit the served model."""


class FingerprintMismatch(DirectionFileError):
    """The shapes fit, but the direction was made for a model with another fingerprint."""


def model_fingerprint(config) -> dict[str, str]:
    """What a direction must match: architecture, sizes, and a hash of the config keys that shape activations."""
    cfg = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    text = cfg.get("text_config") or cfg
    picked = {k: text.get(k) for k in FINGERPRINT_KEYS}
    if picked.get("rope_theta") is None:
        picked["rope_theta"] = (text.get("rope_parameters") or {}).get("rope_theta")
    digest = hashlib.sha256(json.dumps(picked, sort_keys=True, default=str).encode()).hexdigest()[:16]
    arch = (cfg.get("architectures") or [""])[0] or str(text.get("model_type"))
    return {
        "architecture": arch,
        "model_type": str(text.get("model_type")),
        "hidden_size": str(text.get("hidden_size")),
        "num_layers": str(text.get("num_hidden_layers")),
        "vocab_size": str(text.get("vocab_size")),
        "config_hash": digest,
    }


@dataclass
class DirectionSet:
    """One named direction (or one per layer) with per-layer weights."""

    name: str
    directions: torch.Tensor  # (n_layers, d_model) float32 unit rows
    layer_weights: torch.Tensor  # (n_layers,) float32, >= 0
    metadata: dict[str, str] = field(default_factory=dict)
    detect_vector: torch.Tensor | None = None  # (d_model,) unit, for conditional mode
    detect_layer: int | None = None
    detect_threshold: float | None = None
    component_weights: torch.Tensor | None = None  # (3, n_layers) float32 >= 0, rows COMPONENTS
    auto_edit: DirectionSet | None = None  # the edit a firing ``when: auto`` request gets (None: this one)

    @property
    def n_layers(self) -> int:
        return int(self.directions.shape[0])

    @property
    def d_model(self) -> int:
        return int(self.directions.shape[1])

    def writer_weights(self) -> torch.Tensor:
        """Effective weight of every writer, (3, n_layers) in :data:`COMPONENTS` row order:
        ``layer_weights`` times ``component_weights`` (all ones when absent)."""
        w = self.layer_weights.to(torch.float32).unsqueeze(0).repeat(len(COMPONENTS), 1)
        if self.component_weights is not None:
            w = w * self.component_weights.to(torch.float32)
        return w

    def writer_weight(self, kind: str, layer: int) -> float:
        """Effective weight ``w`` of the writer ``kind`` ("embed" | "attn" | "mlp") at ``layer``
        (the embedding uses layer 0): the coefficient is ``c = s * w``. Hooks, bake and LoRA
        export all read weights here, so they stay one function."""
        w = float(self.layer_weights[layer])
        if self.component_weights is not None:
            w *= float(self.component_weights[COMPONENTS.index(kind), layer])
        return w

    @property
    def has_probe(self) -> bool:
        """The file carries a prefill probe (detection vector, layer and threshold)."""
        return self.detect_vector is not None and self.detect_layer is not None and self.detect_threshold is not None

    @property
    def lookahead(self) -> tuple[int, str] | None:
        """The output-based condition ``(tokens, judge)`` from metadata ``auto_lookahead``, or None."""
        raw = self.metadata.get("auto_lookahead")
        if not raw:
            return None
        spec = json.loads(raw) if isinstance(raw, str) else raw
        return int(spec["tokens"]), str(spec.get("judge", "refusal"))

    @property
    def uses_probe(self) -> bool:
        """``when: auto`` is decided by the prefill probe (a probe and no lookahead)."""
        return self.has_probe and self.lookahead is None

    @property
    def has_condition(self) -> bool:
        """``when: auto`` is possible: a prefill probe or a lookahead condition."""
        return self.has_probe or self.lookahead is not None

    @property
    def detect_logit_tokens(self) -> tuple[int, ...]:
        """Token ids of the condition's next-token term (empty: the score is the probe alone)."""
        raw = self.metadata.get("detect_logit_tokens")
        return tuple(json.loads(raw)) if raw else ()

    @property
    def detect_logit_weight(self) -> float:
        return float(self.metadata.get("detect_logit_weight", "0") or 0.0)

    @property
    def auto_strength(self) -> float:
        """The strength ``when: auto`` applies when a request names no strength (the ``@auto``
        preset, ``{"when": "auto"}``): metadata ``auto_strength`` (set by whoever tunes the firing
        case; no command writes it yet), else 1. An explicit strength in a request always wins."""
        try:
            v = float(self.metadata.get("auto_strength", "1"))
        except (TypeError, ValueError):
            return 1.0
        return v if math.isfinite(v) else 1.0

    def public_metadata(self) -> dict:
        md = dict(self.metadata)
        for k in (
            "eval",
            "prompt_hashes",
            "fingerprint",
            "selection",
            "detect_logit_tokens",
            "auto_edit",
            "auto_lookahead",
        ):
            if k in md:
                with contextlib.suppress(TypeError, ValueError):
                    md[k] = json.loads(md[k])
        md["n_layers"] = self.n_layers
        md["d_model"] = self.d_model
        md["conditional"] = self.has_condition
        if self.has_condition:
            md["auto_strength"] = self.auto_strength
            md["condition"] = "lookahead" if self.lookahead is not None else "probe"
        if self.has_probe:
            md["detect_layer"] = self.detect_layer
            md["detect_threshold"] = self.detect_threshold
        # the firing-case edit: None, or what its metadata records ({} when nothing readable)
        if self.auto_edit is None:
            md["auto_edit"] = None
        elif not isinstance(md.get("auto_edit"), dict):
            md["auto_edit"] = {}
        return md

    def check_fits(self, config, path: str = "") -> None:
        """Raise :class:`DirectionFileError` naming both sides if this set does not fit ``config``."""
        fp = model_fingerprint(config)
        where = f" ({path})" if path else ""
        if str(self.n_layers) != fp["num_layers"] or str(self.d_model) != fp["hidden_size"]:
            raise DirectionFileError(
                f"direction '{self.name}'{where} has shape ({self.n_layers}, {self.d_model}) "
                f"but the served model has {fp['num_layers']} layers of width {fp['hidden_size']}"
            )
        theirs = json.loads(self.metadata.get("fingerprint", "{}") or "{}")
        for key in ("model_type", "hidden_size", "num_layers", "vocab_size", "config_hash"):
            if key in theirs and theirs[key] != fp[key]:
                raise FingerprintMismatch(
                    f"direction '{self.name}'{where} was made for a model with {key}={theirs[key]} "
                    f"({theirs.get('architecture')}), but the served model has {key}={fp[key]} ({fp['architecture']})"
                )


def save_direction(ds: DirectionSet, path: str | Path, config=None) -> Path:
    """Write ``ds`` as a safetensors direction file (atomic)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {
        "directions": ds.directions.to(torch.float32).contiguous(),
        "layer_weights": ds.layer_weights.to(torch.float32).contiguous(),
    }
    md = {k: (v if isinstance(v, str) else json.dumps(v)) for k, v in ds.metadata.items()}
    md.setdefault("name", ds.name)
    md["name"] = ds.name
    md.setdefault("format_version", FORMAT_VERSION)
    md.setdefault("operation", OPERATION)
    md.setdefault("hook_sites", HOOK_SITES)
    md.setdefault("convention", CONVENTION)
    md.setdefault("created", _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"))
    if config is not None:
        md["fingerprint"] = json.dumps(model_fingerprint(config))
    if ds.component_weights is not None:
        tensors["component_weights"] = ds.component_weights.to(torch.float32).contiguous()
        md["format_version"] = FORMAT_VERSION_COMPONENTS
    if ds.has_probe:
        tensors["detect_vector"] = ds.detect_vector.to(torch.float32).contiguous()
        md["detect_layer"] = str(ds.detect_layer)
        md["detect_threshold"] = repr(float(ds.detect_threshold))
    if ds.auto_edit is not None:
        a = ds.auto_edit
        if tuple(a.directions.shape) != tuple(ds.directions.shape):
            raise DirectionFileError(
                f"direction '{ds.name}': the firing-case edit has shape {tuple(a.directions.shape)}, "
                f"the file's own {tuple(ds.directions.shape)}"
            )
        tensors["auto_directions"] = a.directions.to(torch.float32).contiguous()
        tensors["auto_layer_weights"] = a.layer_weights.to(torch.float32).contiguous()
        if a.component_weights is not None:
            tensors["auto_component_weights"] = a.component_weights.to(torch.float32).contiguous()
        md.setdefault("auto_edit", "{}")
    else:
        md.pop("auto_edit", None)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=md)
    tmp.replace(path)
    return path


def load_direction(path: str | Path, name: str | None = None) -> DirectionSet:
    """Read a direction file; ``name`` overrides the stored name. Clear errors for bad files."""
    path = Path(path)
    if not path.is_file():
        raise DirectionFileError(f"direction file not found: {path}")
    if path.suffix != ".safetensors":
        raise DirectionFileError(f"direction file {path} is not a .safetensors file (pickle files are never loaded)")
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            md = dict(f.metadata() or {})
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise DirectionFileError(f"direction file {path} is corrupt or truncated: {e}") from e
    if "directions" not in tensors or "layer_weights" not in tensors:
        raise DirectionFileError(f"direction file {path} lacks the 'directions' or 'layer_weights' tensor")
    d = tensors["directions"].to(torch.float32)
    w = tensors["layer_weights"].to(torch.float32)
    if d.dim() == 1:
        d = d.unsqueeze(0).repeat(w.shape[0], 1)
    if d.dim() != 2 or w.dim() != 1 or w.shape[0] != d.shape[0]:
        raise DirectionFileError(
            f"direction file {path}: directions {tuple(d.shape)} and layer_weights {tuple(w.shape)} do not agree"
        )
    d = _unit_rows(d, w, path)
    ds = DirectionSet(name=name or md.get("name") or path.stem, directions=d, layer_weights=w, metadata=md)
    ds.component_weights = _component_weights(tensors.get("component_weights"), w.shape[0], path)
    if "detect_vector" in tensors and "detect_layer" in md and "detect_threshold" in md:
        v = tensors["detect_vector"].to(torch.float32)
        ds.detect_vector = v / v.norm().clamp_min(1e-12)
        ds.detect_layer = int(md["detect_layer"])
        ds.detect_threshold = float(md["detect_threshold"])
    _check_logit_term(md, path)
    _check_lookahead(md, path)
    ds.auto_edit = _auto_edit(tensors, ds, path)
    return ds


def _unit_rows(d: torch.Tensor, w: torch.Tensor, path: Path, what: str = "") -> torch.Tensor:
    """``d`` with unit rows, once the edit (directions ``d``, layer weights ``w``) is known finite
    with non-negative weights; ``what`` names the edit in the error."""
    if not torch.isfinite(d).all() or not torch.isfinite(w).all() or (w < 0).any():
        raise DirectionFileError(f"direction file {path}{what} holds non-finite values or negative layer weights")
    return d / d.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def _auto_edit(tensors: dict[str, torch.Tensor], ds: DirectionSet, path: Path) -> DirectionSet | None:
    """The optional firing-case edit (``auto_*`` tensors), checked like the file's own edit."""
    keys = ("auto_directions", "auto_layer_weights", "auto_component_weights")
    if not any(k in tensors for k in keys):
        return None
    if "auto_directions" not in tensors or "auto_layer_weights" not in tensors:
        raise DirectionFileError(
            f"direction file {path}: a firing-case edit needs auto_directions and auto_layer_weights"
        )
    d = tensors["auto_directions"].to(torch.float32)
    w = tensors["auto_layer_weights"].to(torch.float32)
    if d.dim() == 1:
        d = d.unsqueeze(0).repeat(ds.n_layers, 1)
    if tuple(d.shape) != tuple(ds.directions.shape) or tuple(w.shape) != (ds.n_layers,):
        raise DirectionFileError(
            f"direction file {path}: auto_directions {tuple(d.shape)} / auto_layer_weights {tuple(w.shape)} "
            f"do not match the file's directions {tuple(ds.directions.shape)}"
        )
    d = _unit_rows(d, w, path, " (its firing-case edit)")
    a = DirectionSet(name=ds.name + AUTO_EDIT_SUFFIX, directions=d, layer_weights=w)
    a.component_weights = _component_weights(tensors.get("auto_component_weights"), ds.n_layers, path)
    return a


def edit_sets(directions: dict[str, DirectionSet]) -> dict[str, DirectionSet]:
    """What an engine hooks or exports: every direction under its name, plus each firing-case
    edit under ``NAME@auto`` (:func:`firing_name`)."""
    out = dict(directions)
    for n, ds in directions.items():
        if ds.auto_edit is not None:
            out[n + AUTO_EDIT_SUFFIX] = ds.auto_edit
    return out


def firing_name(name: str, ds: DirectionSet) -> str:
    """The edit a ``when: auto`` request of direction ``name`` gets when its condition fires."""
    return name + AUTO_EDIT_SUFFIX if ds.auto_edit is not None else name


def base_name(name: str) -> str:
    """The direction an engine edit name belongs to (``refusal@auto`` -> ``refusal``)."""
    return name.removesuffix(AUTO_EDIT_SUFFIX)


def _check_logit_term(md: dict[str, str], path: Path) -> None:
    """The optional next-token term of the condition: a list of token ids and a finite weight."""
    if "detect_logit_tokens" not in md and "detect_logit_weight" not in md:
        return
    try:
        toks = json.loads(md.get("detect_logit_tokens") or "[]")
        weight = float(md.get("detect_logit_weight", "0"))
    except (TypeError, ValueError) as e:
        raise DirectionFileError(f"direction file {path}: unreadable detect_logit_tokens/weight: {e}") from e
    if not isinstance(toks, list) or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in toks):
        raise DirectionFileError(f"direction file {path}: detect_logit_tokens must be a list of token ids")
    if not math.isfinite(weight) or (weight != 0 and not toks):
        raise DirectionFileError(f"direction file {path}: detect_logit_weight must be finite, with tokens to weigh")


MAX_LOOKAHEAD_TOKENS = 32


def check_lookahead(spec) -> tuple[int, str]:
    """A lookahead condition ``{"tokens": K, "judge": NAME}`` as ``(K, NAME)``; ValueError naming what is wrong."""
    from directions.detection import LOOKAHEAD_JUDGES

    if not isinstance(spec, dict) or "tokens" not in spec:
        raise ValueError('expected {"tokens": K, "judge": NAME}')
    k, judge = spec["tokens"], spec.get("judge", "refusal")
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= MAX_LOOKAHEAD_TOKENS:
        raise ValueError(f"tokens must be an integer from 1 to {MAX_LOOKAHEAD_TOKENS}, not {k!r}")
    if judge not in LOOKAHEAD_JUDGES:
        raise ValueError(f"unknown judge {judge!r} (known: {', '.join(sorted(LOOKAHEAD_JUDGES))})")
    return k, judge


def _check_lookahead(md: dict[str, str], path: Path) -> None:
    if "auto_lookahead" not in md:
        return
    try:
        check_lookahead(json.loads(md["auto_lookahead"]))
    except (TypeError, ValueError) as e:
        raise DirectionFileError(f"direction file {path}: bad auto_lookahead: {e}") from e


def _component_weights(cw: torch.Tensor | None, n_layers: int, path: Path) -> torch.Tensor | None:
    """The optional ``component_weights`` tensor, checked: (3, n_layers), finite, >= 0."""
    if cw is None:
        return None
    cw = cw.to(torch.float32)
    if tuple(cw.shape) != (len(COMPONENTS), n_layers):
        raise DirectionFileError(
            f"direction file {path}: component_weights {tuple(cw.shape)} should be ({len(COMPONENTS)}, {n_layers})"
        )
    if not torch.isfinite(cw).all() or (cw < 0).any():
        raise DirectionFileError(f"direction file {path} holds non-finite or negative component weights")
    return cw
