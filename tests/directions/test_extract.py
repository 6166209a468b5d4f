"""Extraction on tiny random models: the states convention, means and candidate kinds, layer specs."""

from __future__ import annotations

import pytest
import torch

from directions import extract
from directions.fileformat import CONVENTION
from directions.writers import decoder_layers
from tests.tiny_models import tiny_model, tiny_tokenizer


def test_states_follow_the_file_convention():
    """states[:, i] is the input of decoder layer i at the last prompt token, also under left padding."""
    model, tok = tiny_model("llama"), tiny_tokenizer()
    prompts = extract.build_prompts(tok, ["t5 t6 t7 t8 t9", "t10"])
    captured = {}
    layers = decoder_layers(model)
    handles = [
        layers[i].register_forward_pre_hook(
            lambda m, a, k, i=i: captured.__setitem__(i, (a[0] if a else k["hidden_states"])[0, -1].clone()),
            with_kwargs=True,
        )
        for i in range(len(layers))
    ]
    try:
        states = extract.collect_states(model, tok, prompts, batch_size=2)  # batch: prompt 1 is left padded
        assert states.shape == (2, len(layers), model.config.hidden_size)
        for j, p in enumerate(prompts):
            captured.clear()
            with torch.no_grad():
                model(torch.tensor([p]))
            for i in range(len(layers)):
                torch.testing.assert_close(states[j, i], captured[i], atol=1e-4, rtol=1e-4)
    finally:
        for h in handles:
            h.remove()
    assert "input of decoder layer i" in CONVENTION


def test_means_and_candidate_kinds():
    g = torch.Generator().manual_seed(0)
    pos, neg = torch.randn(5, 4, 16, generator=g) + 2.0, torch.randn(7, 4, 16, generator=g)
    m = extract.Means.from_states(pos, neg)
    assert m.pos.dtype == torch.float64 and m.n_pos == 5 and m.n_neg == 7
    torch.testing.assert_close(m.diff, pos.double().mean(0) - neg.double().mean(0))

    d, w = extract.candidate_tensors(m, extract.Candidate("single", 2))
    r = m.diff[2] / m.diff[2].norm()
    assert d.shape == (4, 16) and torch.equal(w, torch.ones(4))
    for row in d:
        torch.testing.assert_close(row, r.float())

    d, _ = extract.candidate_tensors(m, extract.Candidate("orth", 2))
    assert abs(float(d[0].double() @ m.neg[2])) < 1e-4 * float(m.neg[2].norm())
    assert torch.allclose(d.norm(dim=-1), torch.ones(4))

    d, w = extract.candidate_tensors(m, extract.Candidate("kernel", 1, sigma=1.0))
    assert float(w[1]) == 1.0 and w[0] == w[2] and w[3] < w[2] < 1.0

    d, w = extract.candidate_tensors(m, extract.Candidate("perlayer", 0))
    for i in range(4):
        torch.testing.assert_close(d[i], (m.diff[i] / m.diff[i].norm()).float())


def test_parse_layers():
    assert extract.parse_layers("1-3,5,7-11:2", 12) == [1, 2, 3, 5, 7, 9, 11]
    with pytest.raises(ValueError):
        extract.parse_layers("12", 12)
