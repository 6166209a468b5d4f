"""Per-row sampling: greedy rows are argmax, a tiny nucleus keeps the top token, seeds reproduce."""

from __future__ import annotations

import torch

from server.engine.sampling import make_generator, sample_rows
from server.engine.types import SamplingParams


def test_greedy_rows_take_the_argmax_and_sampled_rows_follow_their_seed():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 50, generator=g)
    params = [SamplingParams(temperature=0), SamplingParams(temperature=1.0, seed=7), SamplingParams(temperature=0)]
    a = sample_rows(logits, params, [None, make_generator(7, "cpu"), None])
    b = sample_rows(logits, params, [None, make_generator(7, "cpu"), None])
    assert a[0] == logits[0].argmax() and a[2] == logits[2].argmax()
    assert a[1] == b[1]  # same seed, same draw


def test_a_tiny_top_p_keeps_only_the_top_token():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.9]])
    for seed in range(20):
        p = SamplingParams(temperature=1.0, top_p=1e-6, seed=seed)
        assert int(sample_rows(logits, [p], [make_generator(seed, "cpu")])[0]) == 1


def test_no_seed_no_generator():
    assert make_generator(None, "cpu") is None
    assert make_generator(2**64 + 5, "cpu").initial_seed() == 5  # wrapped to 64 bits
