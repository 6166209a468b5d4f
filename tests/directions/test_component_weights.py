"""Per-component writer weights (embedding / attention output / MLP down apart): the file format,
the one accessor, and hook == bake == LoRA export on tiny random models of several architectures."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from safetensors.torch import save_file

from directions.bake import bake_model
from directions.fileformat import COMPONENTS, DirectionFileError, load_direction, save_direction
from directions.hooks import SteeringHooks
from directions.lora import lora_pairs, write_peft_adapter
from directions.writers import find_writers
from tests.tiny_models import PRE_NORM_ARCHS, random_direction_set, tiny_model, tokens

TOL = 1e-4
ARCHS = ["llama", "qwen2", "llama_bias", "phi3", "gemma"]


def _with_components(model, seed: int = 7):
    """A random direction set whose attention and MLP writers get different, random weights;
    the embedding off, and one attention writer off entirely."""
    ds = random_direction_set(model, "d", seed=seed)
    n = ds.n_layers
    g = torch.Generator().manual_seed(seed)
    cw = torch.rand(len(COMPONENTS), n, generator=g) * 1.5
    cw[0] = 0.0  # embedding untouched
    cw[1, 0] = 0.0  # layer 0's attention output untouched, its MLP edited
    cw[2, 0] = 1.3
    ds.layer_weights[:] = torch.linspace(0.6, 1.2, n)
    ds.component_weights = cw
    return ds


def _hooked_logits(model, dirs, strengths, ids):
    hooks = SteeringHooks(model, dirs)
    hooks.set_strengths({k: [s] * ids.shape[0] for k, s in strengths.items()})
    try:
        with torch.no_grad():
            return model(ids).logits
    finally:
        hooks.remove()


def test_accessor_multiplies_layer_and_component_weights():
    model = tiny_model("llama")
    ds = _with_components(model)
    table = ds.writer_weights()
    assert table.shape == (3, ds.n_layers)
    for k, kind in enumerate(COMPONENTS):
        for layer in range(ds.n_layers):
            want = float(ds.layer_weights[layer]) * float(ds.component_weights[k, layer])
            assert ds.writer_weight(kind, layer) == pytest.approx(want)
            assert float(table[k, layer]) == pytest.approx(want)
    ds.component_weights = None
    assert torch.equal(ds.writer_weights(), ds.layer_weights.repeat(3, 1))


def test_old_file_loads_unchanged_and_all_ones_is_the_same_edit(tmp_path):
    model = tiny_model("qwen2")
    ds = random_direction_set(model, "d")
    p = save_direction(ds, tmp_path / "old.safetensors")
    old = load_direction(p)
    assert old.component_weights is None and old.metadata["format_version"] == "1"
    ones = copy.deepcopy(old)
    ones.component_weights = torch.ones(3, old.n_layers)
    ids = tokens(seed=2, batch=2, length=8)
    a = _hooked_logits(model, {"d": old}, {"d": 0.8}, ids)
    b = _hooked_logits(model, {"d": ones}, {"d": 0.8}, ids)
    assert torch.equal(a, b)


def test_component_weights_round_trip_and_bad_tensors(tmp_path):
    model = tiny_model("llama")
    ds = _with_components(model)
    p = save_direction(ds, tmp_path / "c.safetensors")
    back = load_direction(p)
    assert back.metadata["format_version"] == "2"
    assert torch.equal(back.component_weights, ds.component_weights)
    assert torch.equal(back.writer_weights(), ds.writer_weights())
    for bad, msg in ((torch.ones(2, ds.n_layers), "should be"), (-torch.ones(3, ds.n_layers), "negative")):
        q = tmp_path / "bad.safetensors"
        save_file({"directions": ds.directions, "layer_weights": ds.layer_weights, "component_weights": bad}, str(q))
        with pytest.raises(DirectionFileError, match=msg):
            load_direction(q)


def test_hook_edits_each_component_by_its_own_weight():
    """Layer 0 (embedding and attention weight 0): the attention output's component along r is
    untouched, the MLP output's is scaled by exactly 1 - s * w_mlp."""
    model = tiny_model("llama")
    ds = _with_components(model)
    writers = {(w.kind, w.layer): w.module for w in find_writers(model)}
    r, s = ds.directions[0], 0.5
    ids = tokens(seed=1, batch=1, length=6)

    def along_r(steer: bool) -> dict[str, torch.Tensor]:
        seen: dict[str, torch.Tensor] = {}
        hooks = SteeringHooks(model, {"d": ds})
        hooks.set_strengths({"d": [s if steer else 0.0]})
        # registered after the steering hooks, so these see the edited outputs
        probes = [
            writers[(k, 0)].register_forward_hook(lambda m, i, o, k=k: seen.__setitem__(k, o @ r))
            for k in ("attn", "mlp")
        ]
        with torch.no_grad():
            model(ids)
        for h in probes:
            h.remove()
        hooks.remove()
        return seen

    plain, steered = along_r(False), along_r(True)
    assert ds.writer_weight("attn", 0) == 0.0
    assert torch.equal(steered["attn"], plain["attn"])
    want = (1 - s * ds.writer_weight("mlp", 0)) * plain["mlp"]
    assert torch.allclose(steered["mlp"], want, atol=1e-5)
    assert (plain["mlp"] - want).abs().max() > 1e-3


@pytest.mark.parametrize("arch", [a for a in ARCHS if a in PRE_NORM_ARCHS])
@pytest.mark.parametrize("s", [0.5, 1.0, -0.5])
def test_bake_equals_hooks_with_component_weights(arch, s):
    model = tiny_model(arch)
    ds = _with_components(model)
    baked = copy.deepcopy(model)
    bake_model(baked, {"d": ds}, {"d": s})
    ids = tokens(seed=5, batch=2, length=9)
    want = _hooked_logits(model, {"d": ds}, {"d": s}, ids)
    with torch.no_grad():
        got = baked(ids).logits
        plain = model(ids).logits
    assert (got - want).abs().max().item() < TOL
    assert (want - plain).abs().max().item() > 100 * TOL
    # the same file without its component weights is a different edit: the weights are really used
    flat = copy.deepcopy(ds)
    flat.component_weights = None
    assert (_hooked_logits(model, {"d": flat}, {"d": s}, ids) - want).abs().max().item() > 100 * TOL


@pytest.mark.parametrize("arch", ["llama", "qwen2", "phi3"])
def test_lora_export_equals_hooks_with_component_weights(arch, tmp_path):
    model = tiny_model(arch)
    ds = _with_components(model)
    pairs = lora_pairs(model, ds)
    names = {p.module for p in pairs}
    assert "model.embed_tokens" not in names  # weight 0: no adapter
    assert "model.layers.0.self_attn.o_proj" not in names and "model.layers.0.mlp.down_proj" in names
    write_peft_adapter(tmp_path, pairs, "tiny", {"direction": "d"})
    pm = PeftModel.from_pretrained(tiny_model(arch), str(tmp_path)).eval()
    ids = tokens(seed=3, batch=2, length=9)
    for s in (0.5, 1.0):
        for m in pm.modules():
            if isinstance(m, LoraLayer):
                for k in m.scaling:
                    m.scaling[k] = s
        with torch.no_grad():
            got = pm(ids).logits
        want = _hooked_logits(model, {"d": ds}, {"d": s}, ids)
        assert (got - want).abs().max().item() < TOL, (arch, s)
