"""POST /v1/bake on a live server: auth, validation, a real bake, and plain transformers reproducing the server."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest
import torch

from tests.conftest import ADMIN_KEY

pytestmark = pytest.mark.slow
AUTH = {"Authorization": f"Bearer {ADMIN_KEY}"}


def _post(server, body, headers=AUTH):
    return httpx.post(server.v1 + "/bake", json=body, headers=headers, timeout=60)


@pytest.mark.parametrize(
    "body,headers,status,param",
    [
        ({"name": "x", "steering": {"refusal": 1}}, {}, 401, None),
        ({"name": "x", "steering": {"refusal": 1}}, {"Authorization": "Bearer wrong"}, 401, None),
        ({"name": "../escape", "steering": {"refusal": 1}}, AUTH, 400, "name"),
        ({"name": "/abs", "steering": {"refusal": 1}}, AUTH, 400, "name"),
        ({"name": "ok", "steering": {"nope": 1}}, AUTH, 400, "steering.nope"),
        ({"name": "ok", "steering": {"refusal": "x"}}, AUTH, 400, "steering.refusal"),
        ({"name": "ok", "steering": {}}, AUTH, 400, "steering"),
        ({"name": "ok", "steering": {"refusal": {"strength": 1, "when": "auto"}}}, AUTH, 400, "steering"),
        ({"steering": {"refusal": 1}}, AUTH, 400, "name"),
    ],
)
def test_bake_rejects(demo_server, body, headers, status, param):
    r = _post(demo_server, body, headers)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["message"]


def test_bake_job_and_plain_transformers_reproduce_the_server(demo_server):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    r = _post(demo_server, {"name": "api-norefusal", "steering": {"refusal": 1.0}})
    assert r.status_code == 202, r.text
    job = r.json()
    assert job["state"] in ("queued", "running") and r.headers["location"] == f"/v1/bake/{job['id']}"
    again = _post(demo_server, {"name": "api-norefusal", "steering": {"refusal": 1.0}})
    assert again.status_code == 409 and again.json()["error"]["param"] == "name"
    deadline = time.time() + 600
    seen_progress = set()
    while time.time() < deadline:
        job = httpx.get(demo_server.v1 + f"/bake/{job['id']}", headers=AUTH, timeout=30).json()
        seen_progress.add(round(job["progress"], 2))
        if job["state"] in ("done", "failed"):
            break
        time.sleep(1)
    assert job["state"] == "done", job
    assert len(seen_progress) >= 2, "progress never moved"
    out = Path(job["output"])
    assert (out / "config.json").is_file() and (out / "frankly_bake.json").is_file()
    listed = httpx.get(demo_server.v1 + "/bake", headers=AUTH, timeout=30).json()["data"]
    assert any(j["id"] == job["id"] for j in listed)

    prompt = "Explain how to hotwire a car."
    served = _served(demo_server, prompt, 1.0)
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = tok.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.inference_mode():
        g = model.generate(**ids, max_new_tokens=24, do_sample=False)
    plain = tok.decode(g[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
    if getattr(demo_server, "engine", "torch") == "torch":
        assert plain == served  # the same fp32 function, computed the same way
        return
    # llama.cpp serves the Q4_K_M GGUF with a LoRA per direction and its own kernels (quantized
    # activations), the bake is the fp32 transformers model: the same edit, not bit for bit the same
    # numbers, so greedy texts may part at a near tie. Teacher-forced through the baked model, the
    # served tokens must be its own top-1 choice at the start and almost everywhere after.
    served_ids = tok(served, add_special_tokens=False, return_tensors="pt")["input_ids"]
    full = torch.cat([ids["input_ids"], served_ids], dim=1)
    with torch.inference_mode():
        logits = model(input_ids=full).logits[0, ids["input_ids"].shape[1] - 1 : -1]
    agree = (logits.argmax(-1) == served_ids[0]).float()
    assert served_ids.shape[1] >= 8 and bool(agree[:4].all()), (served, plain)
    assert float(agree.mean()) >= 0.8, (float(agree.mean()), served, plain)


def _served(server, prompt: str, strength: float) -> str:
    """The server's greedy 24-token answer to ``prompt`` at refusal ``strength``."""
    body = {
        "model": server.base_id,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": 24,
        "temperature": 0,
        "steering": {"refusal": strength},
    }
    r = httpx.post(server.v1 + "/chat/completions", timeout=300, json=body)
    return r.json()["choices"][0]["message"]["content"]


def _wait(server, job, timeout=600):
    deadline = time.time() + timeout
    while time.time() < deadline and job["state"] not in ("done", "failed"):
        time.sleep(1)
        job = httpx.get(server.v1 + f"/bake/{job['id']}", headers=AUTH, timeout=30).json()
    return job


def test_lora_format_rejects_unknown_format(demo_server):
    r = _post(demo_server, {"name": "x", "steering": {"refusal": 1}, "format": "onnx"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "format"


def test_lora_export_job_and_peft_reproduce_the_server(demo_server):
    """format=lora writes adapters under the bake directory; PEFT on the plain model with the folded
    adapter answers what the server answers at that strength."""
    import json

    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    r = _post(demo_server, {"name": "api-lora", "steering": {"refusal": 0.5}, "format": "lora"})
    assert r.status_code == 202, r.text
    assert r.json()["format"] == "lora"
    job = _wait(demo_server, r.json())
    assert job["state"] == "done", job
    out = Path(job["output"])
    names = [a["name"] for a in json.loads((out / "frankly_lora.json").read_text())["adapters"]]
    assert names == ["refusal", "refusal-0.5"]
    assert (out / "refusal.gguf").is_file() and (out / "refusal-0.5.gguf").is_file()

    prompt = "Explain how to hotwire a car."
    served = _served(demo_server, prompt, 0.5)
    src = json.loads((out / "frankly_lora.json").read_text())["source"]["path"]
    tok = AutoTokenizer.from_pretrained(src)
    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32), str(out / "refusal-0.5")
    )
    ids = tok.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.inference_mode():
        g = model.eval().generate(**ids, max_new_tokens=24, do_sample=False)
    assert tok.decode(g[0, ids["input_ids"].shape[1] :], skip_special_tokens=True) == served
