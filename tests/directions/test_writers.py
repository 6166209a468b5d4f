"""The residual-stream writers, found by structure on every tiny architecture."""

from __future__ import annotations

import pytest
from torch import nn

from directions.writers import UnsupportedModelError, decoder_layers, find_writers, has_post_norm, num_layers
from tests.tiny_models import ARCHS, tiny_model


@pytest.mark.parametrize("arch", list(ARCHS))
def test_embedding_then_attention_and_mlp_outputs_per_layer(arch):
    model = tiny_model(arch)
    ws = find_writers(model)
    n = num_layers(model)
    assert n == len(decoder_layers(model)) and len(ws) == 1 + 2 * n
    assert ws[0].kind == "embed" and ws[0].module is model.get_input_embeddings()
    assert [(w.layer, w.kind) for w in ws[1:]] == [(i, k) for i in range(n) for k in ("attn", "mlp")]
    d = model.config.hidden_size
    assert all(w.module.out_features == d for w in ws[1:])  # each writes d_model
    assert has_post_norm(model) == (model.config.model_type in ("gemma2", "gemma3", "gemma3_text", "olmo2"))


def test_an_unknown_layout_is_refused():
    class NoLayers(nn.Module):
        def get_input_embeddings(self):
            return nn.Embedding(4, 2)

    with pytest.raises(UnsupportedModelError):
        find_writers(NoLayers())
