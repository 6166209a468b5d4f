"""The edit in closed form: the component along r is removed by s, the bake maps equal the hook map."""

from __future__ import annotations

import torch

from directions.edit import bake_bias, bake_embedding_weight, bake_linear_weight, normalize, project_out


def test_project_out_scales_the_component_by_one_minus_s():
    g = torch.Generator().manual_seed(0)
    y, r = torch.randn(5, 16, generator=g), normalize(torch.randn(16, generator=g))
    for s in (0.0, 0.5, 1.0, -1.0):
        out = project_out(y, r, s)
        torch.testing.assert_close(out @ r, (1 - s) * (y @ r), atol=1e-5, rtol=0)
        torch.testing.assert_close(out - (out @ r)[:, None] * r, y - (y @ r)[:, None] * r, atol=1e-5, rtol=0)
    per_row = project_out(y[None], r, torch.tensor([1.0])[:, None, None])
    torch.testing.assert_close(per_row[0] @ r, torch.zeros(5), atol=1e-5, rtol=0)


def test_baked_weights_give_the_hooked_outputs():
    g = torch.Generator().manual_seed(1)
    lin = torch.nn.Linear(8, 16, bias=True)
    r, x, s = normalize(torch.randn(16, generator=g)), torch.randn(3, 8, generator=g), 0.7
    hooked = project_out(lin(x), r, s)
    w, b = bake_linear_weight(lin.weight.detach(), r, s), bake_bias(lin.bias.detach(), r, s)
    torch.testing.assert_close(x @ w.T + b, hooked.detach(), atol=1e-5, rtol=0)
    emb = torch.randn(10, 16, generator=g)
    torch.testing.assert_close(bake_embedding_weight(emb, r, s), project_out(emb, r, s))
    torch.testing.assert_close(normalize(torch.tensor([3.0, 4.0])), torch.tensor([0.6, 0.8]))


def test_project_out_stacked_is_project_out_per_direction_and_row():
    from directions.edit import project_out_stacked

    g = torch.Generator().manual_seed(3)
    y = torch.randn(2, 3, 16, generator=g)
    r = normalize(torch.randn(2, 16, generator=g))
    c = torch.tensor([[1.0, 0.5], [0.0, -1.0]])  # (B, D)
    want = y
    for d in range(2):
        want = project_out(want, r[d], c[:, d][:, None, None])
    got = project_out_stacked(y, r, c[:, :, None] * r[None])
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(project_out_stacked(y.reshape(6, 16), r, c[:, :, None] * r[None]), want.reshape(6, 16))
