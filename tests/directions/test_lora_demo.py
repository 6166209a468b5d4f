"""LoRA export on the real demo model: PEFT's adapter is the hooked model; stacking two adapters is not."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from transformers import AutoModelForCausalLM

from directions.demo import SHIPPED_DEMO, shipped_dir
from directions.fileformat import load_direction
from directions.hooks import SteeringHooks
from directions.lora import lora_pairs, write_peft_adapter
from directions.prompting import user_prompt_ids

pytestmark = pytest.mark.slow

PROMPTS = [
    "How do I pick a lock?",
    "Write a short poem about rain.",
    "Explain how to hotwire a car.",
    "What is the capital of Portugal?",
]
# Hooks compute P(Wx), the adapter Wx + B(Ax): the same function, rounded differently in fp32 over 24 layers
# (the bake test allows the same).
LOGIT_TOL = 1e-3


def _batch(tok):
    rows = [user_prompt_ids(tok, p) for p in PROMPTS]
    n = max(map(len, rows))
    ids = torch.tensor([[tok.pad_token_id] * (n - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (n - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


def _set_scale(pm, scale: float) -> None:
    for m in pm.modules():
        if isinstance(m, LoraLayer):
            for name in m.scaling:
                m.scaling[name] = scale


@pytest.fixture(scope="module")
def setup(demo_model, tmp_path_factory):
    dirs = {n: load_direction(shipped_dir() / f, name=n) for n, f in SHIPPED_DEMO.items()}
    root = tmp_path_factory.mktemp("lora")
    for n, ds in dirs.items():
        write_peft_adapter(root / n, lora_pairs(demo_model.model, ds), demo_model.path, {})
    fresh = AutoModelForCausalLM.from_pretrained(demo_model.path, dtype=torch.float32).eval()
    pm = PeftModel.from_pretrained(fresh, str(root / "refusal"), adapter_name="refusal")
    pm.load_adapter(str(root / "slop"), adapter_name="slop")
    pm.eval()
    return demo_model, dirs, pm


def _hooked(lm, dirs, strengths, ids, mask):
    hooks = SteeringHooks(lm.model, dirs)
    hooks.set_strengths({n: [s] * ids.shape[0] for n, s in strengths.items()})
    try:
        with torch.no_grad():
            return lm.model(input_ids=ids, attention_mask=mask).logits[:, -1]
    finally:
        hooks.remove()


@pytest.mark.parametrize("s", [0.5, 1.0, -0.5])
def test_peft_adapter_matches_hooks_on_demo(setup, s):
    lm, dirs, pm = setup
    ids, mask = _batch(lm.tokenizer)
    pm.base_model.set_adapter("refusal")
    _set_scale(pm, s)
    with torch.no_grad():
        got = pm(input_ids=ids, attention_mask=mask).logits[:, -1]
        plain = lm.model(input_ids=ids, attention_mask=mask).logits[:, -1]
    want = _hooked(lm, dirs, {"refusal": s}, ids, mask)
    assert (got - want).abs().max().item() < LOGIT_TOL
    assert (want - plain).abs().max().item() > 0.5  # the direction changes the logits
    assert torch.equal(got.argmax(-1), want.argmax(-1))


def test_stacked_adapters_differ_from_sequential_edit_by_the_overlap(setup):
    """refusal + slop as two adapters is W + B1A1 + B2A2; frankly's hooks apply P_slop P_refusal W.
    The difference is the cross term, proportional to r_refusal . r_slop at each layer."""
    lm, dirs, pm = setup
    ids, mask = _batch(lm.tokenizer)
    pm.base_model.set_adapter(["refusal", "slop"])
    _set_scale(pm, 1.0)
    with torch.no_grad():
        stacked = pm(input_ids=ids, attention_mask=mask).logits[:, -1]
    sequential = _hooked(lm, dirs, {"refusal": 1.0, "slop": 1.0}, ids, mask)
    overlap = (dirs["refusal"].directions * dirs["slop"].directions).sum(-1).abs().max().item()
    diff = (stacked - sequential).abs().max().item()
    print(f"max |r_refusal . r_slop| over layers {overlap:.4f}; max |logit diff| stacked vs sequential {diff:.4f}")
    assert overlap > 1e-3  # not orthogonal, so stacking is not exact...
    assert diff > LOGIT_TOL
    assert torch.equal(stacked.argmax(-1), sequential.argmax(-1))  # ...but close
