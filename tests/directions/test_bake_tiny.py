"""Baking on tiny random models: the baked model is the hooked model, and the bake directory is safe to write."""

from __future__ import annotations

import copy
import errno
import json
import os
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM

from directions import bake as bake_mod
from directions.bake import (
    BAKE_FILE,
    BakeExistsError,
    BakeNameError,
    BakeStorageError,
    BakeStrengthError,
    UnknownDirection,
    bake_model,
    bake_to_dir,
    validate_name,
)
from directions.bake_jobs import BakeJobs
from directions.hooks import SteeringHooks
from tests.tiny_models import PRE_NORM_ARCHS, random_direction_set, save_tiny_dir, tiny_model, tokens

TOL = 1e-4


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def _greedy(model, ids, n=8):
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[:, ids.shape[1] :]


def _hooked_and_baked(arch, strengths, n_dirs=1):
    model = tiny_model(arch)
    dirs = {f"d{i}": random_direction_set(model, f"d{i}", seed=i + 1) for i in range(n_dirs)}
    baked = copy.deepcopy(model)
    report = bake_model(baked, dirs, strengths)
    hooks = SteeringHooks(model, dirs)
    hooks.set_strengths({n: [s] for n, s in strengths.items()})
    return model, baked, hooks, report


@pytest.mark.parametrize("s", [0.5, 1.0, -0.5])
@pytest.mark.parametrize("arch", PRE_NORM_ARCHS)
def test_baked_equals_hooked(arch, s):
    model, baked, hooks, report = _hooked_and_baked(arch, {"d0": s})
    ids = tokens(seed=5, batch=2, length=9)
    hooked_logits = _logits(model, ids)
    baked_logits = _logits(baked, ids)
    assert (hooked_logits - baked_logits).abs().max() < TOL
    hooks.clear()
    assert (_logits(model, ids) - baked_logits).abs().max() > 10 * TOL  # the edit did something
    hooks.set_strengths({"d0": [s]})
    assert torch.equal(_greedy(model, ids[:1]), _greedy(baked, ids[:1]))
    assert report.edited and not report.post_norm


def test_bias_is_edited():
    model, baked, _hooks, report = _hooked_and_baked("llama_bias", {"d0": 1.0})
    assert "model.layers.0.self_attn.o_proj.bias" in report.edited
    assert "model.layers.0.mlp.down_proj.bias" in report.edited
    ids = tokens(seed=6)
    assert (_logits(model, ids) - _logits(baked, ids)).abs().max() < TOL


def test_two_directions_in_hook_order():
    model, baked, _hooks, _ = _hooked_and_baked("qwen2", {"d0": 1.0, "d1": -0.7}, n_dirs=2)
    ids = tokens(seed=7, batch=2)
    assert (_logits(model, ids) - _logits(baked, ids)).abs().max() < TOL


@pytest.mark.parametrize("arch", ["llama_tied", "gemma"])
def test_tied_embeddings_are_untied(arch):
    model, baked, _hooks, report = _hooked_and_baked(arch, {"d0": 1.0})
    assert model.config.tie_word_embeddings and report.untied
    assert baked.config.tie_word_embeddings is False
    assert baked.lm_head.weight is not baked.model.embed_tokens.weight
    assert torch.equal(baked.lm_head.weight, model.lm_head.weight)  # the head keeps the original
    ids = tokens(seed=8, batch=2)
    assert (_logits(model, ids) - _logits(baked, ids)).abs().max() < TOL


def test_post_norm_is_reported_and_measured():
    """Gemma-2 normalises o_proj/down_proj outputs before the residual add.

    Hooks and bake edit the same pre-norm writer output, so they agree with
    each other; what neither does is remove the direction from what reaches
    the residual stream, because the post-norm rescales per coordinate.
    Measure and report that instead of pretending.
    """
    model = tiny_model("gemma2")
    ds = random_direction_set(model, "d0")
    ds.layer_weights[:] = 1.0
    baked = copy.deepcopy(model)
    report = bake_model(baked, {"d0": ds}, {"d0": 1.0})
    assert report.post_norm and "residual" in report.note
    hooks = SteeringHooks(model, {"d0": ds})
    hooks.set_strengths({"d0": [1.0]})
    ids = tokens(seed=9, batch=2)
    diff = (_logits(model, ids) - _logits(baked, ids)).abs().max().item()
    assert diff < TOL
    hooks.clear()

    def added_component(m):  # |r . (what the attention block adds to the residual)|, after the post-norm
        seen = {}
        h = m.model.layers[0].post_attention_layernorm.register_forward_hook(lambda *a: seen.setdefault("o", a[2]))
        _logits(m, ids)
        h.remove()
        return (seen["o"] @ ds.directions[0]).abs().mean().item()

    kept = added_component(baked) / added_component(model)
    print(
        f"gemma2: hook/bake max|dlogit| = {diff:.1e}; after the post-norm {kept:.1%} of the component along r remains"
    )
    assert kept > 0.01  # not removed from the residual stream: reported, not hidden


# --- bake_to_dir ------------------------------------------------------------------------------------


@pytest.fixture
def tiny_source(tmp_path):
    model = tiny_model("llama_tied")
    src = save_tiny_dir(model, tmp_path / "src")
    return src, model, {"d0": random_direction_set(model, "d0")}


def test_bake_to_dir_loads_with_plain_transformers(tiny_source, tmp_path):
    src, model, dirs = tiny_source
    root = tmp_path / "baked"
    seen = []
    out = bake_to_dir(src, dirs, {"d0": 1.0}, "tiny-norefusal", bake_root=root, progress=lambda f, m: seen.append(f))
    assert out == (root / "tiny-norefusal").resolve()
    names = set(os.listdir(out))
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json", BAKE_FILE} <= names
    assert "chat_template.jinja" in names or "chat_template" in (out / "tokenizer_config.json").read_text()
    meta = json.loads((out / BAKE_FILE).read_text())
    assert meta["strengths"] == {"d0": 1.0} and "d0" in meta["directions"] and meta["untied_lm_head"]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["tie_word_embeddings"] is False
    assert seen[-1] == 1.0 and seen == sorted(seen)
    assert [p for p in os.listdir(root) if p.startswith(".")] == []

    loaded = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    hooks = SteeringHooks(model, dirs)
    hooks.set_strengths({"d0": [1.0]})
    ids = tokens(seed=10, batch=2)
    assert (_logits(model, ids) - _logits(loaded, ids)).abs().max() < TOL
    assert torch.equal(_greedy(model, ids[:1]), _greedy(loaded, ids[:1]))


def test_loaded_model_source_is_not_edited(tiny_source, tmp_path):
    src, model, dirs = tiny_source
    before = {k: v.clone() for k, v in model.state_dict().items()}
    loaded = SimpleNamespace(model=model, path=src, gguf=None, source="tiny")
    bake_to_dir(loaded, dirs, {"d0": 1.0}, "from-loaded", bake_root=tmp_path / "baked")
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def test_refuses_existing_target_unless_overwrite(tiny_source, tmp_path):
    src, _, dirs = tiny_source
    root = tmp_path / "baked"
    first = bake_to_dir(src, dirs, {"d0": 1.0}, "x", bake_root=root)
    with pytest.raises(BakeExistsError):
        bake_to_dir(src, dirs, {"d0": 0.5}, "x", bake_root=root)
    again = bake_to_dir(src, dirs, {"d0": 0.5}, "x", bake_root=root, overwrite=True)
    assert again == first and json.loads((first / BAKE_FILE).read_text())["strengths"] == {"d0": 0.5}
    assert sorted(os.listdir(root)) == ["x"]


def test_never_writes_over_the_source(tiny_source):
    src, _, dirs = tiny_source
    with pytest.raises(BakeExistsError):
        bake_to_dir(src, dirs, {"d0": 1.0}, src, overwrite=True)


def test_failure_mid_write_leaves_nothing(tiny_source, tmp_path, monkeypatch):
    src, _, dirs = tiny_source
    root = tmp_path / "baked"

    def boom(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", boom)  # what the final rename (directions.bake_io) calls
    with pytest.raises(BakeStorageError, match="no space left"):
        bake_to_dir(src, dirs, {"d0": 1.0}, "half", bake_root=root)
    assert os.listdir(root) == []


def test_permission_error_is_clear(tiny_source, tmp_path, monkeypatch):
    src, _, dirs = tiny_source
    root = tmp_path / "baked"

    def denied(*a, **k):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(bake_mod, "write_safetensors", denied)
    with pytest.raises(BakeStorageError, match="no permission") as e:
        bake_to_dir(src, dirs, {"d0": 1.0}, "denied", bake_root=root)
    assert e.value.code == "storage_error"
    assert os.listdir(root) == []


def test_failure_in_the_middle_of_files(tiny_source, tmp_path, monkeypatch):
    src, _, dirs = tiny_source
    root = tmp_path / "baked"
    real = bake_mod._save_hf_dir

    def half(model, tok, tmp, progress=None):
        real(model, tok, tmp, progress)
        raise RuntimeError("killed after the weights")

    monkeypatch.setattr(bake_mod, "_save_hf_dir", half)
    with pytest.raises(RuntimeError):
        bake_to_dir(src, dirs, {"d0": 1.0}, "half", bake_root=root)
    assert os.listdir(root) == []


def test_disk_space_checked_first(tiny_source, tmp_path, monkeypatch):
    src, _, dirs = tiny_source
    root = tmp_path / "baked"
    monkeypatch.setattr(bake_mod.shutil, "disk_usage", lambda p: SimpleNamespace(total=100, used=90, free=10))
    with pytest.raises(BakeStorageError, match="disk space"):
        bake_to_dir(src, dirs, {"d0": 1.0}, "big", bake_root=root)
    assert os.listdir(root) == []


def test_write_safetensors_roundtrip(tmp_path):
    from safetensors import safe_open

    tensors = {
        "f32": torch.randn(3, 5),
        "bf16": torch.randn(4, 2).to(torch.bfloat16),
        "scalar": torch.tensor(3, dtype=torch.int64),
        "empty": torch.zeros(0, 4),
        "flags": torch.tensor([True, False, True]),
        "f16_t": torch.randn(6, 3).half().t(),  # not contiguous
    }
    bake_mod.write_safetensors(tensors, tmp_path / "x.safetensors", {"k": "v"})
    with safe_open(str(tmp_path / "x.safetensors"), framework="pt") as f:
        assert f.metadata() == {"k": "v"}
        for k, v in tensors.items():
            assert torch.equal(f.get_tensor(k), v), k


@pytest.mark.parametrize("bad", ["../x", "/abs", "", ".", "..", "a/b", "-lead", "x" * 65, "sp ace", "ä"])
def test_name_validation(bad, tmp_path):
    with pytest.raises(BakeNameError) as e:
        validate_name(bad, tmp_path)
    assert e.value.param == "name"


def test_symlink_escape_is_refused(tmp_path):
    (tmp_path / "root").mkdir()
    (tmp_path / "root" / "link").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(BakeNameError):
        validate_name("link", tmp_path / "root")


def test_unknown_direction(tiny_source, tmp_path):
    src, _, dirs = tiny_source
    with pytest.raises(UnknownDirection) as e:
        bake_to_dir(src, dirs, {"nope": 1.0}, "x", bake_root=tmp_path / "b")
    assert e.value.param == "steering"


def test_bake_jobs(tiny_source, tmp_path):
    src, _, dirs = tiny_source
    jobs = BakeJobs(src, dirs, tmp_path / "jobs")
    job = jobs.start("j1", {"d0": 1.0})
    assert job.state in ("queued", "running") and job.id.startswith("bake-")
    with pytest.raises(BakeNameError):
        jobs.start("../j", {"d0": 1.0})
    with pytest.raises(UnknownDirection):
        jobs.start("j2", {"nope": 1.0})
    done = jobs.wait(job.id, timeout=60)
    assert done.state == "done" and done.progress == 1.0 and os.path.isdir(done.output), done
    with pytest.raises(BakeExistsError):
        jobs.start("j1", {"d0": 1.0})
    with pytest.raises(BakeStrengthError):
        jobs.start("j3", {"d0": float("inf")})
    assert [j.name for j in jobs.list()] == ["j1"] and jobs.get("bake-nope") is None


def test_bake_job_failure_is_reported(tmp_path):
    model = tiny_model("llama")
    jobs = BakeJobs(str(tmp_path / "gone"), {"d0": random_direction_set(model, "d0")}, tmp_path / "jobs")
    job = jobs.wait(jobs.start("j", {"d0": 1.0}).id, timeout=60)
    assert job.state == "failed" and job.error_code == "source_unavailable" and "gone" in job.error
    assert not (tmp_path / "jobs" / "j").exists()


# --- GGUF output ----------------------------------------------------------------------------------


def _tiny_gguf(model, path, *, tied: bool):
    """A GGUF holding the tiny model's writers the way llama.cpp stores them (embedding quantized to Q8_0)."""
    import gguf
    import numpy as np

    sd = model.state_dict()
    w = gguf.GGUFWriter(str(path), arch="llama")
    w.add_block_count(model.config.num_hidden_layers)
    w.add_string("general.name", "tiny")
    w.add_array("tokenizer.ggml.tokens", [f"t{i}" for i in range(model.config.vocab_size)])
    emb = sd["model.embed_tokens.weight"].numpy()
    q = gguf.quants.quantize(emb, gguf.GGMLQuantizationType.Q8_0)
    w.add_tensor("token_embd.weight", q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    if not tied:
        w.add_tensor("output.weight", sd["lm_head.weight"].numpy())
    for i in range(model.config.num_hidden_layers):
        w.add_tensor(f"blk.{i}.attn_norm.weight", sd[f"model.layers.{i}.input_layernorm.weight"].numpy())
        w.add_tensor(f"blk.{i}.attn_output.weight", sd[f"model.layers.{i}.self_attn.o_proj.weight"].numpy())
        w.add_tensor(
            f"blk.{i}.ffn_down.weight", sd[f"model.layers.{i}.mlp.down_proj.weight"].numpy().astype(np.float16)
        )
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return q


@pytest.mark.parametrize("dtype", ["f32", "f16", "q8_0"])
def test_gguf_replaces_only_the_writers(tmp_path, dtype):
    import gguf
    import numpy as np

    from directions.gguf_write import write_baked_gguf

    model = tiny_model("llama_tied")
    q = _tiny_gguf(model, tmp_path / "src.gguf", tied=True)
    baked = copy.deepcopy(model)
    report = bake_model(baked, {"d0": random_direction_set(model, "d0")}, {"d0": 1.0})
    sd = baked.state_dict()
    write_baked_gguf(
        tmp_path / "src.gguf", tmp_path / "out.gguf", sd, report.edited, dtype=dtype, extra_kv={"x.y": "z"}
    )

    src, out = gguf.GGUFReader(str(tmp_path / "src.gguf")), gguf.GGUFReader(str(tmp_path / "out.gguf"))
    t = {x.name: x for x in out.tensors}
    want = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16}.get(
        dtype, gguf.GGMLQuantizationType.Q8_0
    )
    # f16 rounds to 11 bits; q8_0 to 8 bits per block of 32 with an f16 scale (weights here are ~0.1-0.4).
    tol = {"f32": 0, "f16": 2e-3, "q8_0": 1e-2}[dtype]
    for hf, name in [
        ("model.embed_tokens.weight", "token_embd.weight"),
        ("model.layers.1.self_attn.o_proj.weight", "blk.1.attn_output.weight"),
        ("model.layers.0.mlp.down_proj.weight", "blk.0.ffn_down.weight"),
    ]:
        assert t[name].tensor_type == want
        got = gguf.quants.dequantize(t[name].data, t[name].tensor_type).reshape(sd[hf].shape)
        np.testing.assert_allclose(got.astype(np.float32), sd[hf].numpy(), atol=tol, rtol=0)
    # The tied head keeps the original embedding bytes and type; other tensors are copied as they were.
    assert t["output.weight"].tensor_type == gguf.GGMLQuantizationType.Q8_0
    assert np.array_equal(t["output.weight"].data, q)
    s = {x.name: x for x in src.tensors}
    assert np.array_equal(t["blk.0.attn_norm.weight"].data, s["blk.0.attn_norm.weight"].data)
    assert out.fields["general.name"].contents() == "tiny" and out.fields["x.y"].contents() == "z"
    assert out.fields["tokenizer.ggml.tokens"].contents() == src.fields["tokenizer.ggml.tokens"].contents()


def test_gguf_missing_tensor_is_a_clear_error(tmp_path):
    from directions.gguf_write import GGUFWriteError, write_baked_gguf

    model = tiny_model("llama_bias")  # writer biases the GGUF below lacks
    _tiny_gguf(model, tmp_path / "src.gguf", tied=False)
    baked = copy.deepcopy(model)
    report = bake_model(baked, {"d0": random_direction_set(model, "d0")}, {"d0": 1.0})
    with pytest.raises(GGUFWriteError, match=r"attn_output\.bias"):
        write_baked_gguf(tmp_path / "src.gguf", tmp_path / "out.gguf", baked.state_dict(), report.edited)


# --- the command ----------------------------------------------------------------------------------


def test_parse_steering():
    from directions.bake_cmd import parse_steering

    assert parse_steering(["refusal=1.0,slop=0.5", "x"]) == {"refusal": 1.0, "slop": 0.5, "x": 1.0}
    assert list(parse_steering(["b=1,a=2"])) == ["b", "a"]  # order kept: it is the order of the edits
    with pytest.raises(SystemExit):
        parse_steering(["a=lots"])


def test_bake_command(tiny_source, tmp_path, capsys):
    from directions.fileformat import save_direction
    from server.cli import main

    src, _, dirs = tiny_source
    path = save_direction(dirs["d0"], tmp_path / "d0.safetensors")
    out = tmp_path / "cli" / "tiny-baked"
    argv = ["bake", "--model", src, "--direction", f"d0={path}", "--steering", "d0=0.5", "--out", str(out)]
    assert main(argv) == 0
    assert str(out) in capsys.readouterr().out
    assert json.loads((out / BAKE_FILE).read_text())["strengths"] == {"d0": 0.5}
    assert main(argv) == 2  # exists
    assert "already exists" in capsys.readouterr().err
    assert main([*argv, "--overwrite"]) == 0
    assert main(["bake", "--model", src, "--direction", f"d0={path}", "--steering", "zz=1", "--out", str(out)]) == 2
    assert "unknown direction 'zz'" in capsys.readouterr().err
