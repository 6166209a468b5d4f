"""Left padding and last-token forward passes: batched equals one by one, edits apply per row."""

from __future__ import annotations

import torch

from directions import forward
from directions.kl import kl_divergence
from tests.tiny_models import random_direction_set, tiny_model


def test_pad_left_positions():
    ids, mask, pos = forward.pad_left([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert pos.tolist() == [[0, 1, 2], [0, 0, 0]]


class _Tok:
    pad_token_id = 0
    eos_token_id = 2


def test_forward_last_batched_equals_single_and_edit_changes_it():
    model = tiny_model("llama")
    prompts = [[5, 9, 11, 40, 7], [6, 3], [100, 101, 102]]
    batched, states = forward.forward_last(model, _Tok(), prompts, states=True, batch_size=3)
    for i, p in enumerate(prompts):
        single, st = forward.forward_last(model, _Tok(), [p], states=True)
        torch.testing.assert_close(batched[i], single[0], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(states[i], st[0], atol=1e-4, rtol=1e-4)
    ds = random_direction_set(model, "a")
    edited, _ = forward.forward_last(model, _Tok(), prompts, {"a": ds}, {"a": [1.0, 0.0, 1.0]})
    kl = kl_divergence(batched, edited)
    assert kl[1] < 1e-8 and kl[0] > 1e-6 and kl[2] > 1e-6  # the strength-0 row is untouched
