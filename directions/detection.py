"""Detection for conditional ablation: a vector, a layer and a threshold on the residual stream.

The engine's condition scores a prompt as ``hidden_states[layer][last token] . vector`` (the
probe of :class:`directions.hooks.SteeringHooks`) and applies the direction when the score
exceeds the threshold. Calibration picks all three so that validation negatives (harmless /
plain prompts) fire at most at a target rate.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from directions.edit import normalize


def logit_term(logits: torch.Tensor, tokens: Sequence[int]) -> torch.Tensor:
    """``log P(any of tokens)`` under the next-token distribution of ``logits`` (..., vocab), float32."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    return torch.logsumexp(lp[..., list(tokens)], dim=-1)


def condition_score(ds, h: torch.Tensor, logits: torch.Tensor | None) -> float:
    """The condition's score for one prompt: ``h . detect_vector`` (``h`` the residual stream
    entering the detection layer at the last prompt token) plus, where the file has a next-token
    term, ``weight * log P(tokens)`` from the unedited model's ``logits`` there. The one function
    both engines and calibration use. NaN when a needed input is missing (never fires)."""
    if h is None:
        return float("nan")
    score = float(h @ ds.detect_vector.to(h.device, h.dtype))
    toks, w = ds.detect_logit_tokens, ds.detect_logit_weight
    if toks and w != 0:
        if logits is None or logits.shape[-1] <= max(toks):
            return float("nan")
        score += w * float(logit_term(logits, toks))
    return score


def probe_fires(ds, states: torch.Tensor, logits: torch.Tensor) -> list[bool]:
    """Per prompt, whether ``ds``'s prefill probe fires: ``states`` (N, n_layers, d) is the residual
    stream entering every layer at the last prompt token, ``logits`` (N, vocab) the unedited model's
    there (both as :func:`directions.forward.forward_last` returns them)."""
    L, thr = ds.detect_layer, ds.detect_threshold
    return [condition_score(ds, states[i, L], logits[i]) > thr for i in range(len(states))]


def fire_counts(fired: Sequence[bool], refused: Sequence[bool]) -> dict[str, int]:
    """How a condition's decisions fall against the unedited model's refusals of the same prompts:
    fires, fires on refused prompts (wanted), fires on answered ones (a false positive), and
    refused prompts it misses."""
    pairs = list(zip(fired, refused, strict=True))
    return {
        "fires": sum(f for f, _ in pairs),
        "fires_refused": sum(f and r for f, r in pairs),
        "fires_answered": sum(f and not r for f, r in pairs),
        "misses_refused": sum(r and not f for f, r in pairs),
    }


def _refusal_judge(text: str) -> bool:
    from directions.refusal import is_refusal

    return is_refusal(text)


# judges of the lookahead condition (metadata ``auto_lookahead``): text of the first K unedited
# reply tokens -> fire. Engines call them through :func:`lookahead_fires`.
LOOKAHEAD_JUDGES: dict[str, Callable[[str], bool]] = {"refusal": _refusal_judge}


def first_tokens_flagged(tokenizer, token_ids: Sequence[int], k: int, judge: str = "refusal") -> bool:
    """Whether ``judge`` flags the text of the first ``k`` of ``token_ids`` (a reply's tokens)."""
    return bool(LOOKAHEAD_JUDGES[judge](tokenizer.decode(list(token_ids[:k]), skip_special_tokens=True)))


def lookahead_fires(ds, tokenizer, token_ids: Sequence[int]) -> bool:
    """Whether ``ds``'s lookahead condition fires on the unedited reply ``token_ids`` (its first K count)."""
    k, judge = ds.lookahead
    return first_tokens_flagged(tokenizer, token_ids, k, judge)


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
    logit_tokens: tuple[int, ...] = ()  # the next-token term (empty: none)
    logit_weight: float = 0.0


def apply_detection(ds, det: Detection) -> None:
    """Store ``det`` as ``ds``'s condition (vector, layer, threshold and the next-token term)."""
    ds.detect_vector, ds.detect_layer, ds.detect_threshold = det.vector, det.layer, det.threshold
    for k in ("detect_logit_tokens", "detect_logit_weight"):
        ds.metadata.pop(k, None)
    if det.logit_tokens and det.logit_weight != 0:
        ds.metadata["detect_logit_tokens"] = json.dumps([int(t) for t in det.logit_tokens])
        ds.metadata["detect_logit_weight"] = repr(float(det.logit_weight))


@dataclass
class LogitFeatures:
    """The next-token term's inputs for calibration: ``log P(tokens)`` of the unedited model at the
    last prompt token (:func:`logit_term`) for each prompt set, and the weights to try, in units of
    the train-set spread of the two terms (0 = the probe alone)."""

    tokens: tuple[int, ...]
    val_pos: torch.Tensor
    val_neg: torch.Tensor
    train_pos: torch.Tensor
    train_neg: torch.Tensor
    weights: tuple[float, ...] = (0.0, 0.5, 1.0, 2.0)


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


DETECT_SHRINKAGES = (0.03, 0.1, 0.3, 1.0)


def _auc(pos: torch.Tensor, neg: torch.Tensor) -> float:
    """Probability that a positive scores above a negative (ties count half)."""
    if len(pos) == 0 or len(neg) == 0:
        return 0.0
    d = pos[:, None] - neg[None, :]
    return float(((d > 0).double() + 0.5 * (d == 0).double()).mean())


def _try_candidates(
    v0, pos_states, neg_states, layers, fpr, check, shrinkages, logit=None, pos_mask=None
) -> tuple[list[dict], dict]:
    """Firing rates of every candidate (vector, layer, next-token weight), each at its own threshold;
    and ``{(kind, layer, weight): (vector, raw weight, exact threshold)}``.

    ``fire_pos`` counts the positives of ``pos_mask`` (all when None): for refusal, the validation
    prompts the unedited model refuses, the ones the condition exists for."""
    tried, vectors = [], {}
    mask = torch.ones(len(pos_states), dtype=torch.bool) if pos_mask is None else pos_mask.bool()
    weights = logit.weights if logit is not None else (0.0,)
    for L in layers:
        cands = {"mean-diff": v0}
        if check is not None:
            for lam in shrinkages:
                cands[f"lda/{lam:g}"] = lda_vector(check[0][:, L], check[1][:, L], lam)
        for kind, v in cands.items():
            ps, ns = pos_states[:, L] @ v, neg_states[:, L] @ v
            spread = None
            if logit is not None and check is not None:
                a = torch.cat([check[0][:, L] @ v, check[1][:, L] @ v])
                b = torch.cat([logit.train_pos, logit.train_neg]).float()
                spread = float(a.std()) / max(float(b.std()), 1e-6)
            for w in weights:
                if w != 0 and (logit is None or spread is None):
                    continue
                raw_w = 0.0 if w == 0 else w * spread
                p2 = ps + raw_w * logit.val_pos.float() if raw_w else ps
                n2 = ns + raw_w * logit.val_neg.float() if raw_w else ns
                thr = threshold_at_fpr(n2.tolist(), fpr)
                vectors[(kind, int(L), float(w))] = (v, raw_w, thr)
                tried.append(
                    {
                        "kind": kind,
                        "layer": int(L),
                        "logit_weight": float(w),
                        "threshold": round(thr, 5),
                        "fire_pos": round(float((p2[mask] > thr).float().mean()) if mask.any() else 0.0, 4),
                        "fire_pos_all": round(float((p2 > thr).float().mean()), 4),
                        "fire_neg": round(float((n2 > thr).float().mean()), 4),
                        "auc": round(_auc(p2[mask], n2), 4),
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
    logit: LogitFeatures | None = None,
    pos_mask: torch.Tensor | None = None,
) -> Detection:
    """Pick a detection vector, layer, next-token weight and threshold so validation negatives fire <= ``fpr``.

    Score = hidden_states[layer][last token] . vector (what the engine's pre-hook on decoder layer
    ``layer`` computes), plus ``weight * log P(logit.tokens)`` when ``logit`` is given and the
    weight is not 0 (:func:`condition_score`). Candidates at each layer of ``layers``: ``vector``
    itself (the direction's mean difference), and, when ``check`` (the train states) is given,
    shrinkage-LDA vectors fitted on the train states of that layer; each with every weight of
    ``logit.weights``. The threshold of each comes from the validation negatives; the candidate
    where the most validation positives (those of ``pos_mask``) fire wins (ties: higher AUC on
    validation, fewer negatives, then closest to ``prefer``). ``check`` figures at the chosen
    threshold are reported as the out-of-calibration check (for LDA the train split is its
    fitting data, so they are optimistic there).
    """
    tried, vectors = _try_candidates(
        normalize(vector).float(), pos_states, neg_states, layers, fpr, check, shrinkages, logit, pos_mask
    )
    best = max(tried, key=lambda t: (t["fire_pos"], t["auc"], -t["fire_neg"], -abs(t["layer"] - (prefer or 0))))
    L, w = best["layer"], best["logit_weight"]
    # the stored threshold is the exact midpoint; the record holds it rounded
    v, raw_w, thr = vectors[(best["kind"], L, w)]
    record = {
        "fpr_target": fpr,
        "candidates": tried,
        "chosen_kind": best["kind"],
        "chosen_layer": L,
        "chosen_logit_weight": w,
        "threshold": round(thr, 5),
        "val_fire_pos": best["fire_pos"],
        "val_fire_pos_all": best["fire_pos_all"],
        "val_fire_neg": best["fire_neg"],
        "val_auc": best["auc"],
    }
    if pos_mask is not None:
        record["val_positives_counted"] = int(pos_mask.sum())
    if logit is not None:
        record["logit_tokens"] = [int(t) for t in logit.tokens]
        record["logit_weight_raw"] = raw_w
    if check is not None:
        tp, tn = check[0][:, L] @ v, check[1][:, L] @ v
        if raw_w:
            tp, tn = tp + raw_w * logit.train_pos.float(), tn + raw_w * logit.train_neg.float()
        record["train_fire_pos"] = round(float((tp > thr).float().mean()), 4)
        record["train_fire_neg"] = round(float((tn > thr).float().mean()), 4)
    tokens = tuple(int(t) for t in logit.tokens) if (logit is not None and raw_w) else ()
    return Detection(vector=v, layer=L, threshold=thr, record=record, logit_tokens=tokens, logit_weight=raw_w)
