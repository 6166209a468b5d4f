"""The engine protocol: the torch engine implements it, the asyncio bridge streams and cancels,
and the serving layer refuses what an engine's capabilities say it cannot do."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest
import torch
from fastapi.testclient import TestClient

from directions.fileformat import DirectionSet
from directions.strengths import DirectionRequest
from server.app import build_app
from server.engine.protocol import AsyncBridge, Engine, EngineCapabilities, EngineStats
from server.engine.torch_engine import EngineConfig, TorchEngine
from server.engine.types import GenerationRequest, SamplingParams, SteeringReport, StepOutput
from server.settings import ModelSettings, ServerSettings
from tests.tiny_models import tiny_model, tiny_tokenizer


def test_the_torch_engine_implements_the_protocol():
    eng = TorchEngine(tiny_model("llama"), tiny_tokenizer(), {}, EngineConfig())
    assert isinstance(eng, Engine)
    caps = eng.capabilities
    assert caps.name == "torch" and caps.supports_conditional and caps.per_row_strengths and caps.logprobs
    assert caps.bit_identical_at_zero and not caps.quantized_weights
    assert eng.stats() == EngineStats(running=0, waiting=0, decode_steps=0, batched_prefills=0)


class ThreadlessEngine(AsyncBridge):
    """An engine that answers on submit (in a thread, as a real engine would) and records cancels."""

    capabilities = EngineCapabilities(name="threadless")

    def __init__(self, events: int):
        self.events, self.cancelled = events, []

    def submit(self, req, emit):
        import threading

        def run():
            for i in range(self.events):
                emit(StepOutput(req.request_id, text=str(i), finish_reason="stop" if i == self.events - 1 else None))

        threading.Thread(target=run).start()

    def cancel(self, request_id):
        self.cancelled.append(request_id)


async def test_async_bridge_streams_to_the_end_and_cancels_when_left_early():
    req = GenerationRequest("r", [1], SamplingParams())
    eng = ThreadlessEngine(3)
    texts = [out.text async for out in eng.generate(req)]
    assert texts == ["0", "1", "2"] and eng.cancelled == []
    eng = ThreadlessEngine(5)
    gen = eng.generate(req)
    assert (await gen.__anext__()).text == "0"
    await gen.aclose()
    assert eng.cancelled == ["r"]


class PlainEngine:
    """An engine without conditional steering or logprobs (say, a quantized runtime)."""

    capabilities = EngineCapabilities(name="plainrt", per_row_strengths=True)
    num_running = num_waiting = 0
    alive = True

    def __init__(self):
        self.requests = []

    def stats(self):
        return EngineStats(0, 0)

    def start(self): ...
    def shutdown(self, timeout: float = 0): ...
    def cancel(self, request_id): ...

    async def generate(self, req):
        self.requests.append(req)
        reports = {n: SteeringReport(d.strength, d.when, d.strength) for n, d in req.steering.items()}
        yield StepOutput(req.request_id, text="ok", finish_reason="stop", steering=reports)
        await asyncio.sleep(0)


@pytest.fixture
def plain_client(tmp_path):
    ds = DirectionSet("refusal", torch.nn.functional.normalize(torch.ones(2, 8), dim=-1), torch.ones(2))
    ds.detect_vector, ds.detect_layer, ds.detect_threshold = torch.ones(8) / 8**0.5, 1, 0.5
    tok = tiny_tokenizer()
    loaded = SimpleNamespace(model=SimpleNamespace(config=SimpleNamespace(max_position_embeddings=64)), tokenizer=tok)
    ss = ServerSettings(api_keys=[], admin_key=None, bake_dir=str(tmp_path / "b"))
    engine = PlainEngine()
    with TestClient(build_app(loaded, {"refusal": ds}, ss, ModelSettings(), "tiny", engine=engine)) as c:
        yield c, engine


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "tiny", "steering": {"refusal": {"strength": 1, "when": "auto"}}}, "steering.refusal"),
        ({"model": "tiny+refusal@auto"}, "model"),
        ({"model": "tiny", "logprobs": True}, "logprobs"),
    ],
)
def test_a_request_the_engine_cannot_serve_is_a_400_naming_the_engine(plain_client, body, param):
    client, engine = plain_client
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "t5"}], **body})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["code"] == "unsupported_by_engine" and "plainrt" in err["message"]
    assert not engine.requests


def test_what_the_engine_can_do_still_works(plain_client):
    client, engine = plain_client
    r = client.post(
        "/v1/chat/completions", json={"model": "tiny+refusal:0.5", "messages": [{"role": "user", "content": "t5"}]}
    )
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "ok"
    assert engine.requests[0].steering == {"refusal": DirectionRequest(0.5)}
    models = [m["id"] for m in client.get("/v1/models").json()["data"]]
    assert models == ["tiny", "tiny+refusal"]  # no @auto preset on an engine without conditions
    assert client.get("/health").json()["engine"] == "plainrt"
