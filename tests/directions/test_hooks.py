"""SteeringHooks on tiny random models of several architectures: the edit, per-row strengths, the probe."""

from __future__ import annotations

import pytest
import torch

from directions.hooks import SteeringHooks
from tests.tiny_models import ARCHS, random_direction_set, tiny_model, tokens

ARCH_LIST = list(ARCHS)


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.fixture(params=ARCH_LIST)
def arch(request):
    return request.param


def test_zero_strength_installs_nothing_and_is_bit_identical(arch):
    model = tiny_model(arch)
    ids = tokens(batch=2)
    plain = _logits(model, ids)
    hooks = SteeringHooks(model, {"a": random_direction_set(model, "a")})
    hooks.set_strengths({"a": [0.0, 0.0]})
    assert not hooks.installed
    assert all(not w.module._forward_hooks for w in hooks.writers)
    assert torch.equal(_logits(model, ids), plain)
    # Installing and then zeroing again leaves no hook behind either.
    hooks.set_strengths({"a": [1.0, 0.0]})
    assert hooks.installed
    hooks.set_strengths({"a": [0.0, 0.0]})
    assert not hooks.installed and all(not w.module._forward_hooks for w in hooks.writers)
    assert torch.equal(_logits(model, ids), plain)


def test_writer_outputs_lose_the_component(arch):
    """At s = 1 each writer's output keeps (1 - w_l) of its component along r_l: none where w_l = 1."""
    model = tiny_model(arch)
    ds = random_direction_set(model, "a")
    ds.layer_weights[0] = 1.0  # at least the embedding and layer 0 are removed completely
    hooks = SteeringHooks(model, {"a": ds})
    before, after, handles = {}, {}, []
    for w in hooks.writers:  # registered before ours: sees the raw output
        handles.append(w.module.register_forward_hook(lambda m, i, o, n=w.name: before.__setitem__(n, o.detach())))
    hooks.set_strengths({"a": [1.0]})
    for w in hooks.writers:  # registered after ours: sees the edited output
        handles.append(w.module.register_forward_hook(lambda m, i, o, n=w.name: after.__setitem__(n, o.detach())))
    _logits(model, tokens())
    for w in hooks.writers:
        r, wl = ds.directions[w.layer], float(ds.layer_weights[w.layer])
        comp_before, comp_after = before[w.name] @ r, after[w.name] @ r
        scale = before[w.name].norm(dim=-1).max()
        torch.testing.assert_close(comp_after, (1 - wl) * comp_before, atol=1e-5 * float(scale), rtol=0)
        if wl == 1.0:
            assert comp_after.abs().max() < 1e-5 * scale
        # Only the component along r changed.
        rest_before = before[w.name] - comp_before.unsqueeze(-1) * r
        rest_after = after[w.name] - comp_after.unsqueeze(-1) * r
        torch.testing.assert_close(rest_after, rest_before, atol=1e-5, rtol=1e-5)
    for h in handles:
        h.remove()


def test_per_row_strengths_match_rows_alone(arch):
    model = tiny_model(arch)
    hooks = SteeringHooks(model, {"a": random_direction_set(model, "a")})
    ids = tokens(seed=3, batch=3)
    strengths = [0.0, 1.0, -0.5]
    hooks.set_strengths({"a": strengths})
    batched = _logits(model, ids)
    for row, s in enumerate(strengths):
        hooks.set_strengths({"a": [s]})
        alone = _logits(model, ids[row : row + 1])
        torch.testing.assert_close(batched[row : row + 1], alone, atol=1e-5, rtol=0)
    hooks.clear()
    plain = _logits(model, ids[:1])
    torch.testing.assert_close(batched[:1], plain, atol=1e-5, rtol=0)  # strength 0 row is the plain model
    assert not torch.allclose(batched[1:2], _logits(model, ids[1:2]), atol=1e-3)  # strength 1 row changed


def test_two_directions_per_row(arch):
    model = tiny_model(arch)
    dirs = {"a": random_direction_set(model, "a", seed=1), "b": random_direction_set(model, "b", seed=2)}
    hooks = SteeringHooks(model, dirs)
    ids = tokens(seed=4, batch=3)
    sa, sb = [1.0, 0.5, 0.0], [0.0, 0.5, -1.0]
    hooks.set_strengths({"a": sa, "b": sb})
    batched = _logits(model, ids)
    for row in range(3):
        hooks.set_strengths({"a": [sa[row]], "b": [sb[row]]})
        alone = _logits(model, ids[row : row + 1])
        torch.testing.assert_close(batched[row : row + 1], alone, atol=1e-5, rtol=0)
    # Both directions act: row 1 differs from either direction alone.
    hooks.set_strengths({"a": [0.5]})
    only_a = _logits(model, ids[1:2])
    hooks.set_strengths({"b": [0.5]})
    only_b = _logits(model, ids[1:2])
    assert not torch.allclose(batched[1:2], only_a, atol=1e-4)
    assert not torch.allclose(batched[1:2], only_b, atol=1e-4)
    hooks.clear()


def test_probe_reads_the_input_of_decoder_layers_at_the_last_position(arch):
    """The condition's probe: hidden_states[L] at the last token, for the layers asked; none else."""
    from directions.writers import decoder_layers

    model = tiny_model(arch)
    hooks = SteeringHooks(model, {})
    ids = tokens(seed=5, batch=2)
    with torch.no_grad():
        ref = model(ids, output_hidden_states=True).hidden_states
    n = len(decoder_layers(model))
    with hooks.probe([1, n + 3]) as captured, torch.no_grad():
        model(ids)
    assert set(captured) == {1}  # a layer the model does not have is left out
    torch.testing.assert_close(captured[1], ref[1][:, -1].float())
    assert all(not layer._forward_pre_hooks for layer in decoder_layers(model))  # removed after the block


def test_edited_installs_for_the_block_only(arch):
    from directions.hooks import edited

    model = tiny_model(arch)
    ids = tokens(seed=6)
    plain = _logits(model, ids)
    with edited(model, {"a": random_direction_set(model, "a")}) as hooks:
        hooks.set_strengths({"a": [1.0]})
        assert not torch.allclose(_logits(model, ids), plain, atol=1e-4)
    assert torch.equal(_logits(model, ids), plain)
    with edited(model, {}) as none:
        assert none is None
