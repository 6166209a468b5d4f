"""Direction extraction: mean activation differences and the candidate directions made from them.

Activations are the residual stream entering each decoder layer
(``hidden_states[i]``, i = 0..n_layers-1, the file format's CONVENTION) at
the last prompt token after the server's chat template, in fp32, with
means accumulated in float64. The direction of layer ``i`` is
``r_i = mean_A[i] - mean_B[i]`` (A = harmful / slop-inducing, B = harmless
/ plain). Candidates are chosen on the validation split by
:func:`directions.selection.select_and_build`; the condition of conditional
ablation is calibrated by :mod:`directions.detection`.

Every function takes (model, tokenizer) objects, so tests can run them on
tiny random models without the CLI.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from directions.edit import normalize
from directions.fileformat import DirectionSet
from directions.forward import forward_last
from directions.prompting import user_prompt_ids


def build_prompts(tokenizer, instructions: Sequence[str], systems: Sequence[str] | None = None) -> list[list[int]]:
    """Prompt ids via the server's chat template; instruction k gets system prompt k mod len(systems)."""
    out = []
    for k, text in enumerate(instructions):
        system = systems[k % len(systems)] if systems else None
        out.append(user_prompt_ids(tokenizer, text, system=system))
    return out


def collect_states(
    model, tokenizer, prompts: Sequence[Sequence[int]], batch_size: int = 8, desc: str | None = None
) -> torch.Tensor:
    """Last-prompt-token residual stream entering every decoder layer: (N, n_layers, d) float32."""
    _, states = forward_last(model, tokenizer, prompts, states=True, batch_size=batch_size, desc=desc)
    assert states is not None
    return states


@dataclass
class Means:
    """Per-layer means of the two prompt sets, float64, (n_layers, d)."""

    pos: torch.Tensor
    neg: torch.Tensor
    n_pos: int
    n_neg: int

    @classmethod
    def from_states(cls, pos_states: torch.Tensor, neg_states: torch.Tensor) -> Means:
        return cls(
            pos_states.to(torch.float64).mean(0),
            neg_states.to(torch.float64).mean(0),
            int(pos_states.shape[0]),
            int(neg_states.shape[0]),
        )

    @property
    def diff(self) -> torch.Tensor:
        """r_i = mean_A[i] - mean_B[i], float64 (n_layers, d)."""
        return self.pos - self.neg

    @property
    def n_layers(self) -> int:
        return int(self.pos.shape[0])

    def layer_stats(self) -> list[dict]:
        """Norm of each r_i and its cosine with the harmless mean (for the record)."""
        out = []
        for i in range(self.n_layers):
            r, mu = self.diff[i], self.neg[i]
            cos = float(r @ mu / (r.norm() * mu.norm()).clamp_min(1e-12))
            out.append({"layer": i, "norm": round(float(r.norm()), 4), "cos_neg_mean": round(cos, 4)})
        return out


def extract_means(
    model,
    tokenizer,
    pos_prompts: Sequence[Sequence[int]],
    neg_prompts: Sequence[Sequence[int]],
    batch_size: int = 8,
    desc: str = "activations",
) -> tuple[Means, torch.Tensor, torch.Tensor]:
    """Means of both sets plus the per-prompt states they came from (for detection checks)."""
    pos = collect_states(model, tokenizer, pos_prompts, batch_size, desc=f"{desc} (A)")
    neg = collect_states(model, tokenizer, neg_prompts, batch_size, desc=f"{desc} (B)")
    return Means.from_states(pos, neg), pos, neg


# ---- candidates --------------------------------------------------------------


@dataclass(frozen=True)
class Candidate:
    """One way to turn the means into a direction set.

    kind: "single" (r_layer on every layer, weight 1: Arditi et al.),
    "orth" (r_layer minus its component along the harmless mean at that layer),
    "kernel" (r_layer on every layer, Gaussian layer weights centred at layer, width sigma),
    "perlayer" (each layer its own r_l, weight 1).
    """

    kind: str
    layer: int
    sigma: float = 0.0

    @property
    def label(self) -> str:
        if self.kind == "kernel":
            return f"kernel@{self.layer}/s{self.sigma:g}"
        if self.kind == "perlayer":
            return "perlayer"
        return f"{self.kind}@{self.layer}"


def _orth(r: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
    u = mu / mu.norm().clamp_min(1e-12)
    return r - (r @ u) * u


def candidate_tensors(means: Means, cand: Candidate) -> tuple[torch.Tensor, torch.Tensor]:
    """(directions (n_layers, d) unit float32, layer_weights (n_layers,) float32) for ``cand``."""
    n, diff = means.n_layers, means.diff
    if cand.kind == "perlayer":
        return normalize(diff).float(), torch.ones(n)
    r = diff[cand.layer]
    if cand.kind == "orth":
        r = _orth(r, means.neg[cand.layer])
    dirs = normalize(r).float().unsqueeze(0).repeat(n, 1)
    if cand.kind == "kernel":
        w = torch.tensor([math.exp(-((i - cand.layer) ** 2) / (2 * cand.sigma**2)) for i in range(n)])
        return dirs, w.float()
    if cand.kind not in ("single", "orth"):
        raise ValueError(f"unknown candidate kind {cand.kind!r}")
    return dirs, torch.ones(n)


def candidate_set(means: Means, cand: Candidate, name: str, metadata: dict | None = None) -> DirectionSet:
    """The direction set of ``cand`` under ``name``, its kind and layer in the metadata."""
    dirs, w = candidate_tensors(means, cand)
    md = {"method": cand.kind, "chosen_layer": str(cand.layer), "candidate": cand.label, **(metadata or {})}
    return DirectionSet(name=name, directions=dirs, layer_weights=w, metadata=md)


def default_layers(n_layers: int) -> list[int]:
    """The middle 20%..80% of depth."""
    lo, hi = round(0.2 * n_layers), round(0.8 * n_layers)
    return list(range(max(lo, 1), max(hi, lo + 1) + 1))[: n_layers - 1] or [n_layers // 2]


def parse_layers(spec: str, n_layers: int) -> list[int]:
    """'8-18', '8,10,12' or '8-18:2' -> layer indices (validated)."""
    out: list[int] = []
    for part in spec.split(","):
        part = part.strip()
        step = 1
        if ":" in part:
            part, s = part.split(":")
            step = int(s)
        if "-" in part:
            a, b = (int(x) for x in part.split("-"))
            out.extend(range(a, b + 1, step))
        elif part:
            out.append(int(part))
    bad = [i for i in out if not 0 <= i < n_layers]
    if bad:
        raise ValueError(f"layers {bad} out of range 0..{n_layers - 1}")
    return sorted(dict.fromkeys(out))
