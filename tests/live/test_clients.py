"""The runnable client examples (clients/python_openai.py, clients/curl.sh) against a live demo server."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import httpx
import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.slow

MAX_TOKENS = "4"  # mechanics only; keep the model runs short


def _directions(server) -> dict[str, dict]:
    return {d["name"]: d for d in httpx.get(server.v1 + "/directions", timeout=30).json()["data"]}


@pytest.fixture(scope="module")
def steer_server(demo_server, server_factory, tmp_path_factory):
    """The demo server of each engine when the refusal direction is shipped (its condition runs on both
    engines); else one with a generated conditional test direction."""
    if (ROOT / "directions" / "shipped" / "qwen-demo-refusal.safetensors").is_file():
        assert "refusal" in _directions(demo_server), "the shipped refusal direction did not load"
        return demo_server
    import torch
    from transformers import AutoConfig

    from directions.fileformat import DirectionSet, save_direction
    from directions.models import locate

    cfg = AutoConfig.from_pretrained(locate("demo")[0])
    n, d = cfg.num_hidden_layers, cfg.hidden_size
    g = torch.Generator().manual_seed(0)
    dirs = torch.randn(n, d, generator=g)
    detect = torch.randn(d, generator=g)
    ds = DirectionSet(
        "refusal",
        directions=dirs / dirs.norm(dim=-1, keepdim=True),
        layer_weights=torch.ones(n),
        metadata={"method": "random test direction"},
        detect_vector=detect / detect.norm(),
        detect_layer=n // 2,
        detect_threshold=0.0,
    )
    path = save_direction(ds, tmp_path_factory.mktemp("directions") / "refusal-test.safetensors", config=cfg)
    return server_factory("--engine", demo_server.engine, "--no-default-directions", "--direction", f"refusal={path}")


def _run(cmd: list[str], env: dict) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if k not in ("OPENAI_API_KEY", "OPENAI_BASE_URL", "API_KEY", "MODEL")}
    p = subprocess.run(cmd, cwd=ROOT, env={**full, **env}, capture_output=True, text=True, timeout=800)
    assert p.returncode == 0, f"exit {p.returncode}\nstdout:\n{p.stdout[-4000:]}\nstderr:\n{p.stderr[-4000:]}"
    return p


def test_python_openai_client(steer_server):
    conditional = _directions(steer_server)["refusal"].get("conditional")
    p = _run(
        [
            sys.executable,
            "clients/python_openai.py",
            "--base-url",
            steer_server.v1,
            "--max-tokens",
            MAX_TOKENS,
            "--direction",
            "refusal",
        ],
        {},
    )
    out = p.stdout
    base = steer_server.base_id
    for frag in (
        "== models",
        f"  {base}\n",
        f"  {base}+refusal\n",
        f"== chat ({base}, no steering)",
        "steering applied: {}",
        "== streaming chat",
        f"tokens: {MAX_TOKENS}; steering applied (final chunk): {{}}",
        "X-Steering: refusal=1\n",
        'steering applied: {"refusal": {"strength": 1.0, "applied": 1.0',
        f"== steering via model id {base}+refusal\n",
        'steering applied (final chunk): {"refusal": {"strength": 0.5, "applied": 0.5',
        "BadRequestError: 400",
        "unknown_direction",
    ):
        assert frag in out, f"{frag!r} not in output:\n{out}"
    if conditional:
        assert '"when": "auto", "fired": ' in out, out
    else:
        assert "skipped: direction 'refusal' has no calibrated condition" in out, out
    assert out.rstrip().endswith("ok")


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl not installed")
def test_curl_script(steer_server):
    conditional = _directions(steer_server)["refusal"].get("conditional")
    p = _run(
        ["bash", "clients/curl.sh"], {"BASE_URL": steer_server.url, "MAX_TOKENS": MAX_TOKENS, "DIRECTION": "refusal"}
    )
    out = p.stdout
    low = out.lower()
    assert "x-steering: refusal=1\r\n" in low or "x-steering: refusal=1\n" in low, out
    assert '"steering":{"refusal":{"strength":1.0,"applied":1.0' in out, out
    assert f'"model":"{steer_server.base_id}+refusal:0.5"' in out and '"strength":0.5,"applied":0.5' in out, out
    # Two streams, each ending with [DONE]; the JSON-string steering one reports what was applied.
    assert out.count("data: [DONE]") == 2, out
    assert '"steering": {"refusal": {"strength": 1.0, "applied": 1.0' in out, out
    assert '"code":"unknown_direction"' in out
    if conditional and shutil.which("jq"):
        assert '"when":"auto","fired":' in out, out
    else:
        assert "skipped:" in out
    assert out.rstrip().endswith("ok")
    # Every non-stream response body the script printed is valid JSON.
    for line in out.splitlines():
        if line.startswith('{"id":"chatcmpl'):
            json.loads(line)
