"""Batched forward passes over prompts: left padding, and the last prompt token's logits and states.

Batches are left padded with an attention mask and position ids counted from the first
real token, so each row sees the same positions as when it runs alone (RoPE only sees
relative positions anyway). Edits are applied with :class:`directions.hooks.SteeringHooks`,
the hooks the server runs, so what is measured is what the server serves.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from directions.fileformat import DirectionSet
from directions.hooks import edited
from directions.writers import num_layers

Rows = dict[str, Sequence[float]]  # direction name -> one strength per prompt


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


def pad_id(tokenizer) -> int:
    """The tokenizer's pad id, else its EOS id, else 0 (padded positions are masked anyway)."""
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
            ids, mask, pos = pad_left([prompts[i] for i in idx], pad_id(tokenizer), device)
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
