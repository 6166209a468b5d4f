"""Int8 weights (``directions.quant``): the kernel, the model swap, and steering on an int8 model."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from directions.hooks import SteeringHooks
from directions.quant import Int8Embedding, Int8Linear, QuantizationError, quantize_model, quantize_rows
from directions.writers import find_writers
from tests.tiny_models import ARCHS, random_direction_set, tiny_model, tokens


def test_quantize_rows_round_trip_error_is_half_a_step():
    w = torch.randn(64, 48) * torch.logspace(-3, 0, 64)[:, None]  # rows of very different scale
    w[5] = 0.0
    q, s = quantize_rows(w)
    assert q.dtype == torch.int8 and q.abs().max() <= 127
    assert s[5] == 1.0 and torch.all(q[5] == 0)  # a zero row stays zero, no division by zero
    err = (q.float() * s[:, None] - w).abs()
    assert torch.all(err <= s[:, None] / 2 + 1e-7)  # round to nearest, per channel


def test_int8_linear_matches_its_dequantized_weight():
    lin = nn.Linear(96, 80, bias=True)
    q = Int8Linear.from_linear(lin, compute_dtype=torch.bfloat16)
    x = torch.randn(3, 5, 96)
    ref = x @ q.dequantized().T + lin.bias.detach()
    y = q(x)
    assert y.shape == (3, 5, 80) and y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), ref, atol=0.05, rtol=0.02)  # bf16 activations
    assert (y.float() - (x @ lin.weight.detach().T + lin.bias.detach())).abs().max() < 0.1


@pytest.mark.parametrize("arch", list(ARCHS))
def test_quantized_model_keeps_its_writers_and_stays_close(arch):
    model = tiny_model(arch)
    ids = tokens(batch=2)
    with torch.no_grad():
        ref = model(ids).logits.float().log_softmax(-1)
    n_linear = sum(isinstance(m, nn.Linear) for m in model.modules())
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    n = quantize_model(model)
    assert n == n_linear  # a tied head and its embedding: one int8 table, counted once
    assert not any(isinstance(m, nn.Linear) for m in model.modules())
    writers = find_writers(model)
    assert all(isinstance(w.module, Int8Linear) for w in writers if w.kind != "embed")
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    assert isinstance(emb, Int8Embedding) and isinstance(head, Int8Linear) and writers[0].module is emb
    if tied:  # the head multiplies by the very int8 table the embedding looks rows up in
        assert head.weight_q is emb.weight_q and head.scale is emb.scale
    with torch.no_grad():
        lp = model(ids).logits.float().log_softmax(-1)
    kl = (ref.exp() * (ref - lp)).sum(-1).mean()
    assert kl < 0.05, kl


def test_steering_an_int8_model_removes_the_component_and_zero_is_bit_identical():
    model = tiny_model("llama")
    quantize_model(model)
    ds = random_direction_set(model, "a")
    ds.layer_weights[:] = 1.0
    hooks = SteeringHooks(model, {"a": ds})
    ids = tokens(batch=2)
    with torch.no_grad():
        plain = model(ids).logits
    hooks.set_strengths({"a": [0.0, 0.0]})
    with torch.no_grad():
        assert torch.equal(model(ids).logits, plain)
    seen, handles = {}, []
    hooks.set_strengths({"a": [1.0, 0.0]})
    for w in hooks.writers:  # after the steering hook: sees the edited output
        handles.append(w.module.register_forward_hook(lambda m, i, o, n=w.name: seen.__setitem__(n, o.detach())))
    with torch.no_grad():
        steered = model(ids).logits
    for w in hooks.writers:
        r = ds.directions[w.layer].to(seen[w.name].dtype)
        out = seen[w.name].float()
        comp = out @ r.float()
        assert comp[0].abs().max() < 0.02 * out[0].norm(dim=-1).max()  # row 0 steered: component gone
    for h in handles:
        h.remove()
    assert torch.equal(steered[1], plain[1])  # the strength-0 row of the same batch is untouched
    assert not torch.allclose(steered[0], plain[0], atol=1e-3)


def test_refuses_non_cpu_models():
    model = tiny_model("llama").to("meta")
    with pytest.raises(QuantizationError, match="CPU"):
        quantize_model(model)
