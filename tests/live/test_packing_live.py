"""A server started with --packed-weights answers like the plain server (same text, logprobs close)."""

from __future__ import annotations

import httpx
import pytest
import torch

from server.packing import can_pack

pytestmark = pytest.mark.skipif(can_pack(torch.nn.Linear(2, 2)) is not None, reason="no oneDNN in this torch build")


def test_server_with_packed_weights_answers_like_the_plain_server(server_factory, torch_demo_server):
    demo_server = torch_demo_server
    packed = server_factory("--packed-weights")
    body = {"model": "qwen-demo", "messages": [{"role": "user", "content": "Name three primary colors."}]}
    body |= {"max_tokens": 8, "temperature": 0, "logprobs": True}
    a = httpx.post(demo_server.v1 + "/chat/completions", json=body, timeout=300).json()
    b = httpx.post(packed.v1 + "/chat/completions", json=body, timeout=300).json()
    la = [t["logprob"] for t in a["choices"][0]["logprobs"]["content"]]
    lb = [t["logprob"] for t in b["choices"][0]["logprobs"]["content"]]
    assert b["choices"][0]["message"]["content"] == a["choices"][0]["message"]["content"]
    torch.testing.assert_close(torch.tensor(lb), torch.tensor(la), atol=2e-3, rtol=0)
