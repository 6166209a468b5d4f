"""The parameter space of the direction search, and how one point of it becomes a direction set.

A point (:class:`Params`) says which direction to remove and how hard at each writer:

- the direction: one direction for every layer, taken at a *fractional* layer index (the unit
  mean differences of the two neighbouring layers interpolated, then renormalised), or each
  layer its own mean difference ("perlayer"); either optionally orthogonalised against the
  harmless mean of its layer;
- the weights: a kernel per component (attention output, MLP down projection) with its own
  peak position, width, maximum and floor (``w(l) = max * (floor + (1 - floor) * g(l))``,
  ``g`` a Gaussian bump around the peak), so attention and MLP writers are weighted apart;
  whether the embedding is edited at all (and how hard); the first layers left untouched.

The result is an ordinary direction file: ``layer_weights`` all ones, the weights in
``component_weights`` (:mod:`directions.fileformat`), so hooks, bake and LoRA export serve it.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass

import torch

from directions.edit import normalize
from directions.extract import Means, _orth
from directions.fileformat import COMPONENTS, DirectionSet

# Relative norm below which a layer's mean difference is treated as empty (the embedding at
# the last prompt token is the same token for every prompt, so its difference is exactly zero).
EMPTY_DIFF = 1e-3


@dataclass(frozen=True)
class Kernel:
    """Layer weights of one component: a Gaussian bump of ``width`` layers at ``peak`` on a floor."""

    peak: float
    width: float
    max_weight: float
    floor: float  # fraction of max_weight every layer gets (0 = only the bump)

    def weights(self, n_layers: int) -> torch.Tensor:
        ls = torch.arange(n_layers, dtype=torch.float64)
        bump = torch.exp(-((ls - self.peak) ** 2) / (2 * self.width**2))
        return (self.max_weight * (self.floor + (1 - self.floor) * bump)).float()


@dataclass(frozen=True)
class Params:
    """One point of the search space (see the module docstring)."""

    direction: str  # "index" | "perlayer"
    index: float  # fractional layer of the shared direction ("index" mode)
    orth: bool  # remove the harmless mean's component from the direction(s)
    attn: Kernel
    mlp: Kernel
    embed: float  # weight of the token embedding writer (0 = untouched)
    skip_first: int  # layers 0 .. skip_first-1 untouched (attention and MLP)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @property
    def label(self) -> str:
        d = "perlayer" if self.direction == "perlayer" else f"idx{self.index:.2f}"
        k = lambda n, c: f"{n}@{c.peak:.1f}/w{c.width:.1f}x{c.max_weight:.2f}f{c.floor:.2f}"  # noqa: E731
        return f"{d}{'-orth' if self.orth else ''} {k('A', self.attn)} {k('M', self.mlp)} e{self.embed:.2f} s{self.skip_first}"


def suggest(trial, n_layers: int) -> Params:
    """Draw a :class:`Params` from an Optuna ``trial`` (names match :func:`params_from_dict`)."""
    lo, hi = 0.25 * n_layers, 0.9 * (n_layers - 1)

    def kernel(c: str) -> Kernel:
        return Kernel(
            peak=trial.suggest_float(f"{c}_peak", lo, n_layers - 1.0),
            width=trial.suggest_float(f"{c}_width", 0.75, n_layers / 2),
            max_weight=trial.suggest_float(f"{c}_max", 0.4, 1.6),
            floor=trial.suggest_float(f"{c}_floor", 0.0, 1.0),
        )

    direction = trial.suggest_categorical("direction", ["index", "perlayer"])
    return Params(
        direction=direction,
        index=trial.suggest_float("index", lo, hi),
        orth=trial.suggest_categorical("orth", [True, False]),
        attn=kernel("attn"),
        mlp=kernel("mlp"),
        embed=trial.suggest_float("embed", 0.0, 1.0)
        if trial.suggest_categorical("touch_embed", [False, True])
        else 0.0,
        skip_first=trial.suggest_int("skip_first", 0, max(1, n_layers // 4)),
    )


def params_from_dict(p: dict) -> Params:
    """The :class:`Params` of a finished trial's ``params`` (as :func:`suggest` named them)."""

    def kernel(c: str) -> Kernel:
        return Kernel(p[f"{c}_peak"], p[f"{c}_width"], p[f"{c}_max"], p[f"{c}_floor"])

    return Params(
        direction=p["direction"],
        index=float(p["index"]),
        orth=bool(p["orth"]),
        attn=kernel("attn"),
        mlp=kernel("mlp"),
        embed=float(p["embed"]) if p.get("touch_embed") else 0.0,
        skip_first=int(p["skip_first"]),
    )


def interpolated_direction(means: Means, index: float, orth: bool) -> torch.Tensor:
    """Unit direction at a fractional layer: the unit (optionally orthogonalised) mean differences
    of layers floor(index) and ceil(index), linearly interpolated, renormalised. float32 (d,)."""
    lo = max(0, min(means.n_layers - 1, math.floor(index)))
    hi = min(means.n_layers - 1, lo + 1)
    t = min(max(index - lo, 0.0), 1.0)

    def unit(layer: int) -> torch.Tensor:
        r = means.diff[layer]
        return normalize(_orth(r, means.neg[layer]) if orth else r).double()

    return normalize((1 - t) * unit(lo) + t * unit(hi)).float()


def direction_tensor(means: Means, p: Params) -> tuple[torch.Tensor, torch.Tensor]:
    """(directions (n_layers, d) unit float32, usable (n_layers,) bool: False where a per-layer
    mean difference is empty)."""
    n = means.n_layers
    if p.direction == "index":
        return interpolated_direction(means, p.index, p.orth).unsqueeze(0).repeat(n, 1), torch.ones(n, dtype=torch.bool)
    diff = means.diff
    norms = diff.norm(dim=-1)
    usable = norms > EMPTY_DIFF * norms.max()
    rows = [_orth(diff[i], means.neg[i]) if p.orth else diff[i] for i in range(n)]
    return normalize(torch.stack(rows)).float(), usable


def component_table(p: Params, n_layers: int, usable: torch.Tensor) -> torch.Tensor:
    """Weights (3, n_layers) in :data:`COMPONENTS` order for ``p``."""
    cw = torch.zeros(len(COMPONENTS), n_layers)
    cw[COMPONENTS.index("attn")] = p.attn.weights(n_layers)
    cw[COMPONENTS.index("mlp")] = p.mlp.weights(n_layers)
    cw[1:, : p.skip_first] = 0.0
    cw[COMPONENTS.index("embed"), 0] = p.embed
    return cw * usable.float().unsqueeze(0)


def build_set(means: Means, p: Params, name: str, metadata: dict | None = None) -> DirectionSet:
    """The direction set of search point ``p`` (``layer_weights`` ones, weights per component)."""
    dirs, usable = direction_tensor(means, p)
    n = means.n_layers
    md = {
        "method": f"search {p.direction}" + (" orth" if p.orth else ""),
        "chosen_layer": str(min(n - 1, max(0, round(p.index)))),
        "search_params": p.to_json(),
        **(metadata or {}),
    }
    ds = DirectionSet(name=name, directions=dirs, layer_weights=torch.ones(n), metadata=md)
    ds.component_weights = component_table(p, n, usable)
    return ds
