"""KL measurements on constructed inputs with known answers, and on a tiny random model."""

from __future__ import annotations

import math

import pytest
import torch

from directions import kl
from directions.hooks import edited
from tests.tiny_models import random_direction_set, tiny_model


def test_identical_distributions_have_zero_kl():
    logits = torch.randn(4, 1000)
    assert torch.allclose(kl.kl_divergence(logits, logits), torch.zeros(4, dtype=torch.float64), atol=1e-12)
    # a constant shift of the logits is the same distribution
    assert float(kl.kl_divergence(logits, logits + 3.0).abs().max()) < 1e-9


@pytest.mark.parametrize(("p", "q"), [(0.5, 0.5), (0.9, 0.5), (0.2, 0.7), (0.99, 0.01)])
def test_two_point_closed_form(p, q):
    lp = torch.tensor([[math.log(p), math.log(1 - p)]])
    lq = torch.tensor([[math.log(q), math.log(1 - q)]])
    expected = p * math.log(p / q) + (1 - p) * math.log((1 - p) / (1 - q))
    assert float(kl.kl_divergence(lp, lq)[0]) == pytest.approx(expected, rel=1e-5, abs=1e-7)


def test_first_token_kl_is_batch_mean_and_direction_p_to_q():
    lp = torch.log(torch.tensor([[0.9, 0.1], [0.5, 0.5]]))
    lq = torch.log(torch.tensor([[0.5, 0.5], [0.5, 0.5]]))
    mean, per = kl.first_token_kl(lp, lq)
    k1 = 0.9 * math.log(0.9 / 0.5) + 0.1 * math.log(0.1 / 0.5)
    assert per == pytest.approx([k1, 0.0], abs=1e-6)
    assert mean == pytest.approx(k1 / 2, abs=1e-6)
    # KL(P||Q) differs from KL(Q||P): make sure the order is P_orig first
    k_rev = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)
    assert float(kl.kl_divergence(lq[:1], lp[:1])[0]) == pytest.approx(k_rev, abs=1e-6)


def test_continuation_kl_zero_at_zero_strength_and_positive_when_edited():
    model = tiny_model("qwen2")
    ds = random_direction_set(model, "a")
    prompt, cont = [5, 9, 11], [40, 7, 8, 9, 10]
    kls, base_h = kl.continuation_kl(model, prompt, cont, {"a": ds}, {"a": 0.0})
    assert len(kls) == len(cont) and max(kls) < 1e-10
    kls2, _ = kl.continuation_kl(model, prompt, cont, {"a": ds}, {"a": 1.0}, base_hidden=base_h, chunk=2)
    assert len(kls2) == len(cont) and min(kls2) > 0
    # matches a direct computation from full logits
    ids = torch.tensor([prompt + cont])
    with torch.no_grad():
        lp = model(ids).logits[0]
        with edited(model, {"a": ds}) as hooks:
            hooks.set_strengths({"a": [1.0]})
            lq = model(ids).logits[0]
    direct = kl.kl_divergence(lp[len(prompt) - 1 : -1], lq[len(prompt) - 1 : -1])
    assert kls2 == pytest.approx(direct.tolist(), rel=1e-4, abs=1e-7)
