"""Detection for conditional ablation: a vector, a layer and a threshold on the residual stream.

The engine's condition scores a prompt as ``hidden_states[layer][last token] . vector`` (the
probe of :class:`directions.hooks.SteeringHooks`) and applies the direction when the score
exceeds the threshold. Calibration picks all three so that validation negatives (harmless /
plain prompts) fire at most at a target rate.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from directions.edit import normalize


def threshold_at_fpr(neg_scores: Sequence[float], fpr: float) -> float:
    """A threshold that at most ``floor(fpr * n)`` negative scores exceed (score > threshold fires).

    Placed midway between the k-th and (k+1)-th highest negative score, so
    tiny numeric differences between batched and unbatched passes do not
    flip a negative prompt that sits exactly on it.
    """
    s = sorted((float(x) for x in neg_scores), reverse=True)
    k = math.floor(fpr * len(s) + 1e-9)
    if k >= len(s):
        return s[-1] - 1.0
    if k == 0:
        return s[0] + 1e-3 * (abs(s[0]) + 1.0)
    return 0.5 * (s[k - 1] + s[k])


@dataclass
class Detection:
    vector: torch.Tensor  # (d,) unit float32
    layer: int
    threshold: float
    record: dict  # firing rates per layer tried, chosen layer


def lda_vector(pos: torch.Tensor, neg: torch.Tensor, shrinkage: float) -> torch.Tensor:
    """Shrinkage LDA direction ``(S + lambda * tr(S)/d * I)^-1 (mu_pos - mu_neg)``, unit, float32.

    ``pos``/``neg`` are (N, d) states of one layer; S is the pooled within-class
    covariance (float64). Where the mean difference points along directions of
    large within-class spread (topic, length, phrasing), LDA discounts them, so
    the two sets separate with a much smaller overlap.
    """
    p, n = pos.to(torch.float64), neg.to(torch.float64)
    x = torch.cat([p - p.mean(0), n - n.mean(0)])
    cov = x.T @ x / max(1, x.shape[0] - 2)
    d = cov.shape[0]
    ridge = shrinkage * float(cov.trace()) / d
    w = torch.linalg.solve(cov + ridge * torch.eye(d, dtype=cov.dtype), p.mean(0) - n.mean(0))
    return normalize(w).float()


DETECT_SHRINKAGES = (0.03, 0.1, 0.3)


def _try_candidates(v0, pos_states, neg_states, layers, fpr, check, shrinkages) -> tuple[list[dict], dict]:
    """Firing rates of every candidate vector at every layer, each at its own threshold."""
    tried, vectors = [], {}
    for L in layers:
        cands = {"mean-diff": v0}
        if check is not None:
            for lam in shrinkages:
                cands[f"lda/{lam:g}"] = lda_vector(check[0][:, L], check[1][:, L], lam)
        for kind, v in cands.items():
            ps, ns = pos_states[:, L] @ v, neg_states[:, L] @ v
            thr = threshold_at_fpr(ns.tolist(), fpr)
            vectors[(kind, int(L))] = v
            tried.append(
                {
                    "kind": kind,
                    "layer": int(L),
                    "threshold": round(thr, 5),
                    "fire_pos": round(float((ps > thr).float().mean()), 4),
                    "fire_neg": round(float((ns > thr).float().mean()), 4),
                }
            )
    return tried, vectors


def calibrate_detection(
    vector: torch.Tensor,
    pos_states: torch.Tensor,
    neg_states: torch.Tensor,
    layers: Sequence[int],
    fpr: float = 0.02,
    prefer: int | None = None,
    check: tuple[torch.Tensor, torch.Tensor] | None = None,
    shrinkages: Sequence[float] = DETECT_SHRINKAGES,
) -> Detection:
    """Pick a detection vector, layer and threshold so validation negatives fire <= ``fpr``.

    Score = hidden_states[layer][last token] . vector (what the engine's
    pre-hook on decoder layer ``layer`` computes). Candidates at each layer of
    ``layers``: ``vector`` itself (the direction's mean difference), and, when
    ``check`` (the train states) is given, shrinkage-LDA vectors fitted on the
    train states of that layer. The threshold of each comes from the validation
    negatives; the candidate where the most validation positives fire wins
    (ties: fewer negatives, then closest to ``prefer``). ``check`` figures at
    the chosen threshold are reported as the out-of-calibration check (for LDA
    the train split is its fitting data, so they are optimistic there).
    """
    tried, vectors = _try_candidates(normalize(vector).float(), pos_states, neg_states, layers, fpr, check, shrinkages)
    best = max(tried, key=lambda t: (t["fire_pos"], -t["fire_neg"], -abs(t["layer"] - (prefer or 0))))
    L, v = best["layer"], vectors[(best["kind"], best["layer"])]
    # the stored threshold is the exact midpoint; the record holds it rounded
    thr = threshold_at_fpr((neg_states[:, L] @ v).tolist(), fpr)
    record = {
        "fpr_target": fpr,
        "candidates": tried,
        "chosen_kind": best["kind"],
        "chosen_layer": L,
        "threshold": round(thr, 5),
        "val_fire_pos": best["fire_pos"],
        "val_fire_neg": best["fire_neg"],
    }
    if check is not None:
        record["train_fire_pos"] = round(float(((check[0][:, L] @ v) > thr).float().mean()), 4)
        record["train_fire_neg"] = round(float(((check[1][:, L] @ v) > thr).float().mean()), 4)
    return Detection(vector=v, layer=L, threshold=thr, record=record)
