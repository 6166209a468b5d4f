"""--packed-weights: oneDNN-prepacked linear layers give the same function (float tolerance), and
steering hooks still apply (the live server with the flag: tests/live/test_packing_live.py)."""

from __future__ import annotations

import pytest
import torch

from directions.hooks import SteeringHooks
from server.packing import can_pack, pack_linear_weights
from tests.tiny_models import random_direction_set, tiny_model, tokens

pytestmark = pytest.mark.skipif(can_pack(torch.nn.Linear(2, 2)) is not None, reason="no oneDNN in this torch build")


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_packed_model_matches_unpacked_with_and_without_steering(arch):
    ref = tiny_model(arch)
    packed = tiny_model(arch)
    packed.load_state_dict(ref.state_dict())
    ds = random_direction_set(ref, "d0")
    ids = tokens(0, batch=3, length=7)
    stats = pack_linear_weights(packed)
    assert stats["packed"] >= 7 * ref.config.num_hidden_layers
    with torch.inference_mode():
        base_ref, base_packed = ref(ids).logits, packed(ids).logits
        torch.testing.assert_close(base_packed, base_ref, atol=1e-4, rtol=1e-4)
        out = {}
        for name, m in (("ref", ref), ("packed", packed)):
            with SteeringHooks(m, {"d0": ds}) as h:
                h.set_strengths({"d0": [1.0, 0.0, -0.5]})
                out[name] = m(ids).logits
        torch.testing.assert_close(out["packed"], out["ref"], atol=1e-4, rtol=1e-4)
        assert (out["packed"][0] - base_packed[0]).abs().max() > 1e-3  # the hooks did something
        torch.testing.assert_close(out["packed"][1], base_packed[1])  # strength 0 row untouched
