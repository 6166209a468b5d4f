"""clients/bench.py against a live frankly server: 2 streams x 4 tokens x 2 requests, sane JSON."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


def test_bench_smoke(demo_server, tmp_path):
    out = tmp_path / "bench.json"
    cmd = [
        sys.executable,
        str(ROOT / "clients" / "bench.py"),
        "--url",
        demo_server.url,
        "--streams",
        "2",
        "--max-tokens",
        "4",
        "--requests",
        "2",
        "--warmup",
        "0",
        "--json-out",
        str(out),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    data = json.loads(out.read_text())
    assert len(data["runs"]) == 1
    run = data["runs"][0]
    assert run["streams"] == 2
    assert run["requests"] == 2
    assert run["completed"] == 2
    assert run["errors"] == 0, run["error_samples"]
    assert 0 < run["tokens"] <= 2 * 4
    assert run["tokens_source"] == "usage"  # frankly honours stream_options.include_usage
    assert run["agg_tok_s"] > 0
    assert run["wall_s"] > 0
    assert 0 < run["ttft_p50_s"] <= run["ttft_p95_s"]
    assert run["itl_p50_s"] is None or run["itl_p50_s"] >= 0
    assert set(run["finish_reasons"]) <= {"length", "stop"}
    # the table row went to stdout
    assert "| 2 | 2 | 0 |" in proc.stdout


def test_steering_overhead_smoke(tmp_path):
    """scripts/steering_overhead.py on the demo model, int8, 8 timed steps: table and JSON,
    4 steps a side, positive times, the overhead from the medians."""
    out = tmp_path / "overhead.json"
    cmd = [sys.executable, str(ROOT / "scripts" / "steering_overhead.py"), "--weights", "int8"]
    cmd += ["--steps", "8", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "overhead" in proc.stdout and "int8" in proc.stdout
    (row,) = json.loads(out.read_text())["rows"]
    assert row["steps_per_side"] == 4 and row["plain_ms"] > 0 and row["steered_ms"] > 0
    assert row["overhead"] == row["steered_ms"] / row["plain_ms"] - 1


def test_llamacpp_scaling_smoke(tmp_path):
    """scripts/llamacpp_scaling.py on the demo GGUF, 1 and 2 rows, 2 passes each: table and JSON."""
    out = tmp_path / "scaling.json"
    cmd = [sys.executable, str(ROOT / "scripts" / "llamacpp_scaling.py"), "--batches", "1,2", "--steps", "2"]
    cmd += ["--context", "8", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = json.loads(out.read_text())["rows"]
    assert [r["rows"] for r in rows] == [1, 2] and rows[0]["x_one_row"] == 1.0
    assert all(r["ms_per_pass"] > 0 and r["tok_s"] > 0 for r in rows)


def test_llamacpp_engine_scaling_smoke(tmp_path):
    """scripts/llamacpp_scaling.py --engine: frankly's llama.cpp engine in process, 1 and 2 requests
    of 3 tokens, off and refusal 1.0, one round: every request completes, rates are positive."""
    out = tmp_path / "engine.json"
    cmd = [sys.executable, str(ROOT / "scripts" / "llamacpp_scaling.py"), "--engine", "--batches", "1,2"]
    cmd += ["--tokens", "3", "--repeats", "1", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = json.loads(out.read_text())["engine"]
    assert [r["steering"] for r in rows] == ["off", "refusal 1.0"]
    assert all(r["one"] > 0 and r["many"] > 0 and r["ratio"] == r["many"] / r["one"] for r in rows)
