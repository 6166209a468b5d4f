"""Scoring another model's weights against the reference model (``frankly eval --edited-model``).

A weight-edited copy of the model (Heretic's abliterated export, a bake) is measured on the
same prompt ids as the reference: its own greedy generations for refusal and capability, and
its next-token distributions against the reference's for the KLs, KL(P_ref || P_edited) over
the full vocabulary in float64 as everywhere else (:mod:`directions.kl`). The long
continuations are the reference's own, teacher-forced through both models.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from directions.kl import first_token_kl, kl_divergence
from directions.measure import Measurements


def same_vocabulary(ref_model, edited_model) -> bool:
    """Whether two models share a vocabulary size (so the reference's prompt ids and logits fit the edited model)."""
    return ref_model.get_output_embeddings().weight.shape[0] == edited_model.get_output_embeddings().weight.shape[0]


def models_first_token_kl(ref: Measurements, edited: Measurements, prompts: list[list[int]]) -> float:
    """Batch-mean first-token KL(P_ref || P_edited) over ``prompts`` (both models' unedited logits, cached)."""
    return first_token_kl(ref.base_logits(prompts), edited.base_logits(prompts))[0]


@torch.inference_mode()
def _logits_along(model, ids: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    base = getattr(model, "model", model)
    hidden = base(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).last_hidden_state[0]
    return model.get_output_embeddings()(hidden[lo:hi])


@torch.inference_mode()
def models_continuation_kl(ref_model, edited_model, prompt: Sequence[int], continuation: Sequence[int]) -> list[float]:
    """Per-position KL(P_ref || P_edited) along a teacher-forced continuation (the positions that
    predict each continuation token, as :func:`directions.kl.continuation_kl`)."""
    device = next(ref_model.parameters()).device
    ids = torch.tensor([list(prompt) + list(continuation)], dtype=torch.long, device=device)
    lo, hi = len(prompt) - 1, ids.shape[1] - 1
    kls = kl_divergence(_logits_along(ref_model, ids, lo, hi), _logits_along(edited_model, ids, lo, hi))
    return [float(x) for x in kls]


def models_long_kl(ref_model, edited_model, prompts: list[list[int]], conts: list[list[int]]) -> dict:
    """KL pooled over every position of the reference's long continuations (as ``Measurements.long_kl``)."""
    allk, per = [], []
    for p, c in tqdm(list(zip(prompts, conts, strict=True)), desc="long KL (edited model)", leave=False):
        kls = models_continuation_kl(ref_model, edited_model, p, c)
        allk += kls
        per.append(sum(kls) / max(len(kls), 1))
    return {"mean": sum(allk) / max(len(allk), 1), "positions": len(allk), "per_prompt": per}
