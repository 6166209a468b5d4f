"""--packed-weights: oneDNN-prepacked linear layers give the same function (float tolerance),
steering hooks still apply, and the server starts and answers with the flag."""

from __future__ import annotations

import httpx
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


def test_server_with_packed_weights_answers_like_the_plain_server(server_factory, demo_server):
    packed = server_factory("--packed-weights")
    body = {"model": "qwen-demo", "messages": [{"role": "user", "content": "Name three primary colors."}]}
    body |= {"max_tokens": 8, "temperature": 0, "logprobs": True}
    a = httpx.post(demo_server.v1 + "/chat/completions", json=body, timeout=300).json()
    b = httpx.post(packed.v1 + "/chat/completions", json=body, timeout=300).json()
    la = [t["logprob"] for t in a["choices"][0]["logprobs"]["content"]]
    lb = [t["logprob"] for t in b["choices"][0]["logprobs"]["content"]]
    assert b["choices"][0]["message"]["content"] == a["choices"][0]["message"]["content"]
    torch.testing.assert_close(torch.tensor(lb), torch.tensor(la), atol=2e-3, rtol=0)
