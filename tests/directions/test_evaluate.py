"""Evaluation through a stub ``generate``: the library measures whatever generates, with no engine.

The stub refuses unless the refusal direction is applied, so the refusal rate must fall from
1 to 0 with strength; the KLs come from the tiny model and its hooks."""

from __future__ import annotations

from directions.evaluate import EvalConfig, EvalSets, evaluate
from directions.generation import Generation, GenResult
from directions.measure import Job, Measurements
from directions.strengths import DirectionRequest
from tests.tiny_models import random_direction_set, tiny_model, tiny_tokenizer


class StubGenerate:
    """Refuses unless 'refusal' is applied, deflects ("I'm glad I could help!") when it is applied at
    strength 2 or more; records what it was asked."""

    def __init__(self):
        self.calls: list[tuple[list[str], list[Generation]]] = []

    def __call__(self, directions, generations, desc=None) -> list[GenResult]:
        self.calls.append((sorted(directions), list(generations)))
        out = []
        for g in generations:
            d = g.steering.get("refusal")
            on = d is not None and d.strength > 0
            text = "Sure, t5 t6" if on else "I'm sorry, I can't"
            if on and d.strength >= 2:
                text = "I'm glad I could help! How can I assist you today?"
            out.append(GenResult(text, list(range(g.max_tokens)), {}))
        return out


def _sets() -> EvalSets:
    return EvalSets(
        harmful=["t5 t6", "t7 t8"],
        harmless=["t60 t61", "t62"],
        long=["t63 t64", "t65"],
        creative=["t9"],
        capability=[{"question": "t10", "accept": ["t6"]}],
        n_long=1,
    )


def test_evaluate_runs_on_any_generate():
    model, tok = tiny_model("llama"), tiny_tokenizer()
    gen = StubGenerate()
    m = Measurements(model, tok, gen, {"refusal": random_direction_set(model, "refusal")}, batch_size=4)
    res = evaluate(m, _sets(), ["refusal"], EvalConfig(strengths=[0.0, 1.0], long_tokens=3, all_metrics=True))
    rows = {r["strength"]: r for r in res["rows"]}
    assert rows[0.0]["refusal_rate"] == 1.0 and rows[1.0]["refusal_rate"] == 0.0
    assert rows[0.0]["first_token_kl"] == 0.0 < rows[1.0]["first_token_kl"]
    assert rows[0.0]["long_kl"] == 0.0 < rows[1.0]["long_kl"]
    assert rows[1.0]["capability"] == 1.0 and rows[0.0]["capability"] == 0.0
    assert len(gen.calls) == 1  # every generation in one submission
    assert res["config"]["long_continuation_tokens"] == [3]


def test_evaluate_counts_non_answers_apart_from_refusals():
    model, tok = tiny_model("llama"), tiny_tokenizer()
    m = Measurements(model, tok, StubGenerate(), {"refusal": random_direction_set(model, "refusal")}, batch_size=4)
    res = evaluate(m, _sets(), ["refusal"], EvalConfig(strengths=[0.0, 1.0, 2.0], long_tokens=3))
    rows = {r["strength"]: r for r in res["rows"]}
    assert (rows[0.0]["refusals"], rows[0.0]["non_answers"]) == (2, 0)  # refusals are not non-answers
    assert (rows[1.0]["refusals"], rows[1.0]["non_answers"]) == (0, 0)
    assert (rows[2.0]["refusals"], rows[2.0]["non_answers"]) == (0, 2)  # deflections: no refusal, no answer
    from server.eval_cmd import format_table

    table = format_table(res)
    assert "non-ans" in table.splitlines()[0]


def test_jobs_flatten_in_order_and_come_back_by_key():
    gen = StubGenerate()
    m = Measurements(None, None, gen)
    steer = {"refusal": DirectionRequest(1.0)}
    out = m.generate([Job(("a",), [[1], [2]], 2), Job(("b",), [[3]], 1, steer), Job(("c",), [], 1)])
    assert [len(v) for v in out.values()] == [2, 1, 0]
    assert out[("b",)][0].text.startswith("Sure") and out[("a",)][0].text.startswith("I'm sorry")
    assert [g.prompt_ids for g in gen.calls[0][1]] == [[1], [2], [3]]
