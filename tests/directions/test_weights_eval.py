"""Another model's weights scored against the reference: a model against itself has KL exactly 0,
a different model does not; ``evaluate(..., edited=...)`` adds one ``when="weights"`` row."""

from __future__ import annotations

import copy

import torch

from directions.evaluate import EvalConfig, evaluate
from directions.measure import Measurements
from directions.weights_eval import models_continuation_kl, models_first_token_kl, models_long_kl, same_vocabulary
from tests.directions.test_evaluate import StubGenerate, _sets
from tests.tiny_models import random_direction_set, tiny_model, tiny_tokenizer


def _perturbed(model):
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.model.layers[1].mlp.down_proj.weight.mul_(0.7)
    return other


def test_a_model_against_itself_has_zero_kl_and_a_changed_copy_does_not():
    model, tok = tiny_model("qwen2"), tiny_tokenizer()
    twin, other = copy.deepcopy(model), _perturbed(model)
    ref = Measurements(model, tok, batch_size=4)
    prompts = ref.ids(["t5 t6 t7", "t60", "t9 t10"])
    assert models_first_token_kl(ref, Measurements(twin, tok, batch_size=4), prompts) == 0.0
    assert models_first_token_kl(ref, Measurements(other, tok, batch_size=4), prompts) > 1e-4
    cont = [[11, 12, 13, 14], [15, 16]]
    assert models_continuation_kl(model, twin, prompts[0], cont[0]) == [0.0] * 4
    lk = models_long_kl(model, other, prompts[:2], cont)
    assert lk["positions"] == 6 and lk["mean"] > 1e-4 and all(p > 0 for p in lk["per_prompt"])
    assert same_vocabulary(model, other)


def test_evaluate_adds_one_weights_row_per_edited_model():
    model, tok = tiny_model("llama"), tiny_tokenizer()
    gen = StubGenerate()
    m = Measurements(model, tok, gen, {"refusal": random_direction_set(model, "refusal")}, batch_size=4)
    edited = {
        "twin": Measurements(copy.deepcopy(model), tok, StubGenerate(), {}, batch_size=4),
        "other": Measurements(_perturbed(model), tok, StubGenerate(), {}, batch_size=4),
    }
    res = evaluate(m, _sets(), ["refusal"], EvalConfig(strengths=[0.0, 1.0], long_tokens=3, all_metrics=True), edited)
    rows = {(r["direction"], r["when"]): r for r in res["rows"] if r["when"] == "weights"}
    assert set(rows) == {("twin", "weights"), ("other", "weights")}
    twin, other = rows[("twin", "weights")], rows[("other", "weights")]
    assert twin["first_token_kl"] == 0.0 and twin["long_kl"] == 0.0
    assert other["first_token_kl"] > 0 and other["long_kl"] > 0
    plain = next(r for r in res["rows"] if r["when"] == "always" and r["strength"] == 0.0)
    # the stub refuses without steering: the edited models generated (unsteered) and were judged like the plain row
    assert twin["refusal_rate"] == plain["refusal_rate"] == 1.0 and twin["capability"] == plain["capability"]
    assert twin["long_kl_positions"] == plain["long_kl_positions"] == 3
    assert len(edited["twin"]._generate.calls) == 1  # one submission per edited model
