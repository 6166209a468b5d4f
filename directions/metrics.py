"""Forward-pass measurements: last-token states, first-token KL, KL over long continuations.

All KLs are KL(P_orig || P_edited) over the full vocabulary, computed in
float64 from logits. Batches are left padded with an attention mask and
position ids counted from the first real token, so each row sees the same
positions as when it runs alone (RoPE only sees relative positions anyway).
Edits are applied with the server's own :class:`server.hooks.SteeringHooks`,
so what is measured is what the server serves.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from tqdm.auto import tqdm

from directions.fileformat import DirectionSet
from directions.writers import num_layers

Rows = dict[str, Sequence[float]]  # direction name -> one strength per prompt


def kl_divergence(logits_p: torch.Tensor, logits_q: torch.Tensor) -> torch.Tensor:
    """Per-row KL(P || Q) where P = softmax(logits_p), Q = softmax(logits_q), in float64."""
    lp = torch.log_softmax(logits_p.to(torch.float64), dim=-1)
    lq = torch.log_softmax(logits_q.to(torch.float64), dim=-1)
    return (lp.exp() * (lp - lq)).sum(dim=-1).clamp_min(0.0)


def pad_left(batch: Sequence[Sequence[int]], pad_id: int, device=None):
    """(input_ids, attention_mask, position_ids) for left-padded ``batch``."""
    n = max(len(x) for x in batch)
    ids = torch.full((len(batch), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), n), dtype=torch.long)
    for i, x in enumerate(batch):
        ids[i, n - len(x) :] = torch.tensor(list(x), dtype=torch.long)
        mask[i, n - len(x) :] = 1
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    return ids.to(device), mask.to(device), pos.to(device)


@contextmanager
def edited(model, directions: dict[str, DirectionSet] | None) -> Iterator:
    """Install the server's hooks for ``directions`` for the duration; yields the hooks (or None)."""
    if not directions:
        yield None
        return
    from server.hooks import SteeringHooks

    hooks = SteeringHooks(model, directions)
    try:
        yield hooks
    finally:
        hooks.remove()


def _pad_id(tokenizer) -> int:
    pid = getattr(tokenizer, "pad_token_id", None)
    return int(pid if pid is not None else (tokenizer.eos_token_id or 0))


@torch.inference_mode()
def forward_last(
    model,
    tokenizer,
    prompts: Sequence[Sequence[int]],
    directions: dict[str, DirectionSet] | None = None,
    strengths: Rows | None = None,
    states: bool = False,
    batch_size: int = 16,
    desc: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Logits at the last prompt token (N, vocab) float32 and, with ``states``, the
    residual stream entering every decoder layer there (N, n_layers, d) float32.

    ``hidden_states[i]`` is the input of decoder layer ``i`` (index 0 = embeddings),
    which is :data:`directions.fileformat.CONVENTION`.
    """
    device = next(model.parameters()).device
    n_layers = num_layers(model)
    # Batches of similar length waste less compute on padding; results go back in input order.
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    logits_out, states_out = [], []
    with edited(model, directions) as hooks:
        for start in tqdm(range(0, len(prompts), batch_size), desc=desc, disable=desc is None, leave=False):
            idx = order[start : start + batch_size]
            if hooks is not None:
                hooks.set_strengths({n: [s[i] for i in idx] for n, s in (strengths or {}).items()})
            ids, mask, pos = pad_left([prompts[i] for i in idx], _pad_id(tokenizer), device)
            out = model(
                input_ids=ids,
                attention_mask=mask,
                position_ids=pos,
                output_hidden_states=states,
                use_cache=False,
                logits_to_keep=1,
            )
            logits_out.append(out.logits[:, -1, :].float().cpu())
            if states:
                states_out.append(torch.stack([h[:, -1, :] for h in out.hidden_states[:n_layers]], 1).float().cpu())
    inv = torch.empty(len(order), dtype=torch.long)
    inv[torch.tensor(order, dtype=torch.long)] = torch.arange(len(order))
    logits = torch.cat(logits_out)[inv]
    return logits, (torch.cat(states_out)[inv] if states else None)


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
