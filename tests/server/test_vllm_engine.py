"""The vLLM engine against a fake ``vllm serve`` (tests/fake_vllm.py, started by the real supervisor):
what is forwarded, how answers map back, the 400s of steering that was not exported, cancellation,
and supervision (a failed start, a death, a stop)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import stat
import sys
import threading
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from directions.prompting import user_prompt_ids
from directions.strengths import DirectionRequest
from server.engine.types import GenerationRequest, SamplingParams
from server.engine.vllm_engine import VllmConfig, VllmEngine
from server.engine.vllm_supervisor import VllmCommand, VllmStartError, VllmSupervisor
from server.testing import free_port

ROOT = Path(__file__).resolve().parents[2]
BASE_ID = "qwen-demo"
REFUSE = "I'm sorry, but I can't help with that."
ANSWER = "Sure. Step one: find the lock."
COMBO = (("refusal", 1.0), ("slop", 0.5))
MODELS = {
    (): "frankly-base",
    (("refusal", 0.5),): "refusal-0.5",
    (("refusal", 1.0),): "refusal-1.0",
    (("slop", 1.0),): "slop-1.0",
    COMBO: "refusal-1.0+slop-0.5",
}
MSGS = [{"role": "user", "content": "How do I pick a lock?"}]


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    from directions.models import locate

    return AutoTokenizer.from_pretrained(locate("demo")[0])


@pytest.fixture(scope="module")
def eos(tok):
    return tok.convert_tokens_to_ids("<|im_end|>")


@pytest.fixture(scope="module")
def fake_exe(tmp_path_factory) -> str:
    """An executable that runs the fake as ``vllm`` would be run."""
    exe = tmp_path_factory.mktemp("bin") / "vllm"
    exe.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{ROOT / "tests" / "fake_vllm.py"}" "$@"\n')
    exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    return str(exe)


def scripted(tok, eos) -> dict:
    ids = {"frankly-base": [*tok.encode(REFUSE), eos], "refusal-1.0": [*tok.encode(ANSWER), eos]}
    ids["slop-1.0"] = tok.encode(" word" * 300)  # long and slow: for cancellation
    return ids


def make_engine(fake_exe, tmp, tok, eos, env=None, extra=()) -> tuple[VllmEngine, Path]:
    rec = tmp / f"record-{time.monotonic_ns()}.jsonl"
    adapters = {name: tmp for c, name in MODELS.items() if c}
    cmd = VllmCommand(fake_exe, "some/model", "frankly-base", free_port(), adapters, 512, 4, extra_args=list(extra))
    env = {"FAKE_VLLM_RECORD": str(rec), "FAKE_VLLM_TOKENS": json.dumps(scripted(tok, eos)), **(env or {})}
    sup = VllmSupervisor(cmd, tmp / "vllm.log", ready_timeout_s=60, env=env)
    eng = VllmEngine(
        sup.url, tok, MODELS, {eos}, VllmConfig(max_batch_size=4, max_queue=2, max_model_len=512), supervisor=sup
    )
    return eng, rec


def records(rec: Path) -> list[dict]:
    return [json.loads(x) for x in rec.read_text().splitlines()] if rec.exists() else []


def wait_for(pred, timeout=10.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.05)
    return False


@pytest.fixture(scope="module")
def served(fake_exe, tmp_path_factory, tok, eos):
    """The whole app (frankly's API) on the vLLM engine, on the fake vLLM."""
    from server.app import build_app
    from server.settings import ModelSettings, ServerSettings
    from server.startup import direction_paths
    from server.vllm_setup import load_for_vllm

    ms = ModelSettings(engine="vllm")
    loaded, directions = load_for_vllm(ms, direction_paths(ms))
    eng, rec = make_engine(fake_exe, tmp_path_factory.mktemp("fake"), tok, eos)
    app = build_app(loaded, directions, ServerSettings(), ms, BASE_ID, engine=eng)
    with TestClient(app) as client:
        yield client, eng, rec


def chat(client, **body):
    return client.post("/v1/chat/completions", json={"model": BASE_ID, "messages": MSGS, "max_tokens": 40, **body})


def last_request(rec: Path) -> dict:
    return [r["request"] for r in records(rec) if "request" in r][-1]


def test_forwarded_request_and_answer(served, tok):
    client, _, rec = served
    r = chat(client, temperature=0, top_p=0.9, seed=7)
    assert r.status_code == 200, r.text
    body = last_request(rec)
    assert body["model"] == "frankly-base"
    assert body["prompt"] == user_prompt_ids(tok, MSGS[0]["content"])  # token ids, frankly's chat template
    assert (body["max_tokens"], body["temperature"], body["top_p"], body["seed"]) == (40, 0.0, 0.9, 7)
    assert body["stream"] is True and body["return_token_ids"] is True and "logprobs" not in body
    out = r.json()
    assert out["choices"][0]["message"]["content"] == REFUSE  # frankly's detokenisation of vLLM's ids
    assert out["choices"][0]["finish_reason"] == "stop"
    assert out["usage"]["completion_tokens"] == len(tok.encode(REFUSE))  # EOS not counted
    assert out["usage"]["prompt_tokens"] == len(body["prompt"])


def test_steering_maps_to_the_adapter_of_that_strength(served):
    client, _, rec = served
    r = chat(client, steering={"refusal": 1.0})
    assert r.status_code == 200, r.text
    assert last_request(rec)["model"] == "refusal-1.0"
    assert r.json()["choices"][0]["message"]["content"] == ANSWER
    assert r.json()["steering"] == {"refusal": {"strength": 1.0, "applied": 1.0}}
    assert r.headers["X-Steering"] == "refusal=1"
    r = client.post("/v1/chat/completions", json={"model": f"{BASE_ID}+refusal:0.5", "messages": MSGS})
    assert r.status_code == 200 and last_request(rec)["model"] == "refusal-0.5"
    r = chat(client, model=f"{BASE_ID}+refusal", steering={"refusal": 0})  # body wins: base
    assert r.status_code == 200 and last_request(rec)["model"] == "frankly-base"
    r = chat(client, steering={"slop": 0.5, "refusal": 1.0})  # an exported combination
    assert r.status_code == 200 and last_request(rec)["model"] == "refusal-1.0+slop-0.5"


@pytest.mark.parametrize(
    "body, says",
    [
        ({"steering": {"refusal": 0.7}}, "refusal=0.7"),
        ({"model": f"{BASE_ID}+refusal:0.25"}, "refusal=0.25"),
        ({"steering": {"refusal": 0.5, "slop": 1.0}}, "refusal=0.5+slop=1"),
    ],
)
def test_steering_not_exported_is_a_400_naming_the_exported(served, body, says):
    client, _, rec = served
    n = len(records(rec))
    r = chat(client, **body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["code"] == "unsupported_by_engine" and err["param"] == "steering"
    assert says in err["message"]
    for exported in ("refusal=0.5", "refusal=1", "slop=1", "refusal=1+slop=0.5"):
        assert exported in err["message"]
    assert len(records(rec)) == n  # nothing reached vLLM


def test_conditional_is_a_400_naming_the_engine(served):
    client, _, _ = served
    r = chat(client, steering={"refusal": {"strength": 1.0, "when": "auto"}})
    assert r.status_code == 400
    assert "vllm engine" in r.json()["error"]["message"] and r.json()["error"]["code"] == "unsupported_by_engine"


def test_models_list_presets_it_can_run(served):
    client, _, _ = served
    ids = [m["id"] for m in client.get("/v1/models").json()["data"]]
    assert ids == [BASE_ID, f"{BASE_ID}+refusal", f"{BASE_ID}+slop"]  # no @auto presets: no conditional mode
    h = client.get("/health").json()
    assert h["status"] == "ok" and h["engine"] == "vllm"


def test_stream_usage_logprobs_and_stop(served, tok):
    client, _, rec = served
    body = {"stream": True, "stream_options": {"include_usage": True}, "logprobs": True, "top_logprobs": 2}
    with client.stream("POST", "/v1/chat/completions", json={"model": BASE_ID, "messages": MSGS, **body}) as r:
        lines = [x[6:] for x in r.iter_lines() if x.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    chunks = [json.loads(x) for x in lines[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == REFUSE
    assert chunks[-1]["usage"]["completion_tokens"] == len(tok.encode(REFUSE))
    sent = last_request(rec)
    assert sent["logprobs"] == 2 and sent["return_tokens_as_token_ids"] is True
    lp = [
        e
        for c in chunks
        if c["choices"] and c["choices"][0].get("logprobs")
        for e in c["choices"][0]["logprobs"]["content"]
    ]
    first = tok.encode(REFUSE)[0]
    assert lp[0]["token"] == tok.decode([first]) and lp[0]["logprob"] == -0.5
    assert [t["logprob"] for t in lp[0]["top_logprobs"]] == [-0.5, -1.5]
    assert lp[0]["top_logprobs"][1]["token"] == tok.decode([first + 1])
    # a stop string is frankly's: the text ends before it and the vLLM stream is closed (aborted there)
    r = chat(client, steering={"refusal": 1.0}, stop=["Step"])
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "Sure. "
    assert r.json()["choices"][0]["finish_reason"] == "stop"
    assert wait_for(lambda: any("aborted" in x for x in records(rec)))


def test_disconnect_cancels_the_vllm_request(fake_exe, tmp_path, tok, eos):
    eng, rec = make_engine(fake_exe, tmp_path, tok, eos, env={"FAKE_VLLM_DELAY": "0.05"})
    eng.start()
    try:
        req = GenerationRequest("r-cancel", [1, 2, 3], SamplingParams(max_tokens=300), {"slop": DirectionRequest(1.0)})

        async def run():
            gen = eng.generate(req)
            first = await gen.__anext__()
            await gen.aclose()  # what the serving layer does when the client goes away
            return first

        first = asyncio.run(run())
        assert first.token_ids and first.steering["slop"].applied == 1.0
        assert wait_for(lambda: {"aborted": "r-cancel"} in records(rec))
        assert wait_for(lambda: eng.num_running == 0 and eng.num_waiting == 0)
    finally:
        eng.shutdown(5)


def test_queue_limit_and_shutdown_ends_requests(fake_exe, tmp_path, tok, eos):
    from server.engine.errors import EngineOverloaded, EngineStopped

    eng, _ = make_engine(fake_exe, tmp_path, tok, eos, env={"FAKE_VLLM_DELAY": "0.2"})
    eng.start()
    ends, lock = [], threading.Lock()

    def emit(o):
        if o.finished:
            with lock:
                ends.append(o)

    for i in range(6):  # 4 forwarded + 2 waiting
        eng.submit(
            GenerationRequest(f"q{i}", [1, 2], SamplingParams(max_tokens=300), {"slop": DirectionRequest(1.0)}), emit
        )
    with pytest.raises(EngineOverloaded):
        eng.submit(GenerationRequest("q6", [1], SamplingParams()), emit)
    assert wait_for(lambda: eng.num_running == 4 and eng.num_waiting == 2)
    eng.shutdown(timeout=0.3)
    assert len(ends) == 6 and all(isinstance(o.error, EngineStopped) for o in ends)
    assert eng.supervisor.proc.poll() is not None and not eng.alive  # vLLM stopped with frankly
    with pytest.raises(EngineStopped):
        eng.submit(GenerationRequest("late", [1], SamplingParams()), emit)


def test_vllm_death_fails_requests_and_health(fake_exe, tmp_path, tok, eos):
    from server.app import build_app
    from server.settings import ModelSettings, ServerSettings
    from server.startup import direction_paths
    from server.vllm_setup import load_for_vllm

    ms = ModelSettings(engine="vllm")
    loaded, directions = load_for_vllm(ms, direction_paths(ms))
    eng, _ = make_engine(fake_exe, tmp_path, tok, eos)
    with TestClient(build_app(loaded, directions, ServerSettings(), ms, BASE_ID, engine=eng)) as client:
        assert client.get("/health").status_code == 200
        os.killpg(eng.supervisor.proc.pid, signal.SIGKILL)
        assert wait_for(lambda: not eng.alive)
        h = client.get("/health")
        assert h.status_code == 503 and h.json()["status"] == "unavailable"
        r = chat(client)
        assert r.status_code == 500
        assert (
            "vLLM server exited" in r.json()["error"]["message"] and "killed by SIGKILL" in r.json()["error"]["message"]
        )


def test_failed_start_says_why(fake_exe, tmp_path, tok, eos):
    eng, _ = make_engine(fake_exe, tmp_path, tok, eos, env={"FAKE_VLLM_EXIT": "3"})
    with pytest.raises(VllmStartError, match=r"exited before it was ready \(code 3\)(.|\n)*failing on purpose"):
        eng.start()


def test_illegal_instruction_is_named_with_what_to_do(fake_exe, tmp_path, tok, eos):
    """A vLLM build for another CPU dies with SIGILL: the error names it and what to do."""
    eng, _ = make_engine(fake_exe, tmp_path, tok, eos, env={"FAKE_VLLM_EXIT": str(-signal.SIGILL)})
    with pytest.raises(VllmStartError) as e:
        eng.start()
    msg = str(e.value)
    assert "killed by SIGILL" in msg and "illegal instruction" in msg and "vLLM build for this CPU" in msg
    assert "--engine llamacpp" in msg


def test_command_line(fake_exe, tmp_path, tok, eos):
    eng, rec = make_engine(fake_exe, tmp_path, tok, eos, extra=["--tensor-parallel-size", "2"])
    eng.start()
    eng.shutdown(5)
    argv = records(rec)[0]["argv"]
    assert argv[:2] == ["serve", "some/model"]
    assert argv[-2:] == ["--tensor-parallel-size", "2"]  # pass-through last, so it wins
    for flag, value in [
        ("--host", "127.0.0.1"),
        ("--served-model-name", "frankly-base"),
        ("--max-model-len", "512"),
        ("--max-num-seqs", "4"),
        ("--max-loras", str(len(MODELS) - 1)),
        ("--generation-config", "vllm"),
    ]:
        assert argv[argv.index(flag) + 1] == value
    mods = argv[argv.index("--lora-modules") + 1 : argv.index("--tensor-parallel-size")]
    assert sorted(m.split("=")[0] for m in mods) == sorted(n for c, n in MODELS.items() if c)
