"""Model specs: where each kind of spec points, dtype and device choices, clear errors."""

from __future__ import annotations

import pytest
import torch

from directions.models import ModelLoadError, load_model, locate, resolve_device, resolve_dtype
from tests.tiny_models import save_tiny_dir, tiny_model


def test_locate_kinds(tmp_path):
    d = save_tiny_dir(tiny_model("llama"), tmp_path / "m")
    assert locate(d) == (d, None)
    assert locate("org/model") == ("org/model", None)  # a hub id
    (tmp_path / "empty").mkdir()
    for bad in (str(tmp_path / "empty"), str(tmp_path / "nope"), "./missing", str(tmp_path / "x.gguf")):
        with pytest.raises(ModelLoadError):
            locate(bad)
    (tmp_path / "w.bin").write_bytes(b"pickle")
    with pytest.raises(ModelLoadError, match="pickle"):
        locate(str(tmp_path / "w.bin"))


def test_dtype_and_device():
    assert resolve_dtype("auto", "cpu") == torch.float32
    assert resolve_dtype("bf16", "cpu") == torch.bfloat16
    with pytest.raises(ModelLoadError, match="unknown dtype"):
        resolve_dtype("int3", "cpu")
    assert resolve_device("cpu") == "cpu"
    assert resolve_device("auto") in ("cuda", "mps", "cpu")


def test_load_model_from_a_directory(tmp_path):
    lm = load_model(save_tiny_dir(tiny_model("qwen2"), tmp_path / "m"), device="cpu")
    assert lm.dtype == torch.float32 and lm.device == "cpu" and lm.gguf is None
    assert not lm.model.training and not any(p.requires_grad for p in lm.model.parameters())
    assert lm.tokenizer.pad_token_id is not None


def test_stored_dtype_keeps_the_checkpoint_dtype(tmp_path):
    model = tiny_model("llama").to(torch.bfloat16)
    lm = load_model(save_tiny_dir(model, tmp_path / "m"), device="cpu", dtype="stored")
    assert lm.dtype == torch.bfloat16 and next(lm.model.parameters()).dtype == torch.bfloat16
    assert load_model(str(tmp_path / "m"), device="cpu").dtype == torch.float32  # auto on CPU
