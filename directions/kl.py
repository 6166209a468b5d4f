"""KL divergence of the edited model from the original: first token and along long continuations.

All KLs are KL(P_orig || P_edited) over the full vocabulary, computed in float64 from
logits, with the edit applied by the server's own hooks (:mod:`directions.hooks`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from directions.fileformat import DirectionSet
from directions.hooks import edited


def kl_divergence(logits_p: torch.Tensor, logits_q: torch.Tensor) -> torch.Tensor:
    """Per-row KL(P || Q) where P = softmax(logits_p), Q = softmax(logits_q), in float64."""
    lp = torch.log_softmax(logits_p.to(torch.float64), dim=-1)
    lq = torch.log_softmax(logits_q.to(torch.float64), dim=-1)
    return (lp.exp() * (lp - lq)).sum(dim=-1).clamp_min(0.0)


def first_token_kl(base_logits: torch.Tensor, edited_logits: torch.Tensor) -> tuple[float, list[float]]:
    """Batch mean and per-prompt KL(P_orig || P_edited) of the next-token distribution."""
    kl = kl_divergence(base_logits, edited_logits)
    return float(kl.mean()), [float(x) for x in kl]


@torch.inference_mode()
def _final_hidden(model, ids: torch.Tensor) -> torch.Tensor:
    base = getattr(model, "model", model)
    out = base(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
    return out.last_hidden_state[0]


@torch.inference_mode()
def continuation_kl(
    model,
    prompt: Sequence[int],
    continuation: Sequence[int],
    directions: dict[str, DirectionSet],
    strengths: dict[str, float],
    base_hidden: torch.Tensor | None = None,
    chunk: int = 64,
) -> tuple[list[float], torch.Tensor]:
    """Per-position KL(P_orig || P_edited) along a teacher-forced continuation.

    Positions are those that predict each continuation token (the last prompt
    token up to the second-to-last continuation token). The final-norm hidden
    states go through the LM head in chunks so the full (length, vocab) logits
    never sit in memory twice. Returns (kls, base_hidden) so callers can reuse
    the unedited pass across strengths.
    """
    device = next(model.parameters()).device
    ids = torch.tensor([list(prompt) + list(continuation)], dtype=torch.long, device=device)
    if base_hidden is None:
        base_hidden = _final_hidden(model, ids)
    with edited(model, directions) as hooks:
        hooks.set_strengths({n: [s] for n, s in strengths.items()})
        edit_hidden = _final_hidden(model, ids)
    head = model.get_output_embeddings()
    lo, hi = len(prompt) - 1, ids.shape[1] - 1
    kls: list[float] = []
    for a in range(lo, hi, chunk):
        b = min(a + chunk, hi)
        kls.extend(float(x) for x in kl_divergence(head(base_hidden[a:b]), head(edit_hidden[a:b])))
    return kls, base_hidden
