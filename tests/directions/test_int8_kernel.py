"""frankly's own int8 kernel (``directions.kernels``): built here with g++, checked against fp32 and
against torch's kernel, and the fallbacks when it cannot be built."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from directions import kernels
from directions.quant import Int8Linear, quantize_model, quantize_rows
from tests.tiny_models import tiny_model, tokens


def _reference(x, q, s, b):
    return x.float() @ (q.float() * s.float()[:, None]).T + (0 if b is None else b.float())


@pytest.mark.parametrize("k", [16, 96, 128, 896, 1040, 37, 200])  # multiples of 16 (int16 path) and not (fp32 path)
@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 8, 9])
def test_kernel_matches_fp32_for_every_row_count_and_width(built, k, m):
    g = torch.Generator().manual_seed(k * 31 + m)
    w = torch.randn(67, k, generator=g) * torch.logspace(-2, 0, 67)[:, None]
    q, s = quantize_rows(w)
    b = torch.randn(67, generator=g)
    x = torch.randn(m, k, generator=g)
    x[:, 3] *= 300.0  # an outlier channel, as Qwen2's activations have: blocks keep the rest precise
    want = _reference(x, q, s, b)
    got = torch.ops.frankly.int8_linear(x, q, s, b)
    assert got.shape == (m, 67) and got.dtype == torch.float32
    # the int16 path rounds each x to half a step of its 128-input block (block max / 32767): the
    # error of each output is bounded by that, weighted by |w|; the fp32 path only by fp32 sums
    wd = (q.float() * s[:, None]).abs()
    if k % 16 == 0:
        half = torch.zeros(m, k)
        for b0 in range(0, k, 128):
            half[:, b0 : b0 + 128] = x[:, b0 : b0 + 128].abs().amax(1, keepdim=True) / 32767 / 2
        bound = half @ wd.T
    else:
        bound = torch.zeros(m, 67)
    fp32 = 1e-5 * (x.abs() @ wd.T) + 1e-5
    assert torch.all((got - want).abs() <= bound + fp32)
    no_bias = torch.ops.frankly.int8_linear(x, q, s, None)
    torch.testing.assert_close(no_bias + b, got, rtol=1e-5, atol=1e-4)


def test_kernel_keeps_bf16_in_and_out_and_leading_dims(built):
    q, s = quantize_rows(torch.randn(40, 64))
    x = torch.randn(2, 3, 64).to(torch.bfloat16)
    y = torch.ops.frankly.int8_linear(x, q, s.to(torch.bfloat16), None)
    assert y.shape == (2, 3, 40) and y.dtype == torch.bfloat16
    want = _reference(x.reshape(6, 64), q, s.to(torch.bfloat16), None).reshape(2, 3, 40)
    torch.testing.assert_close(y.float(), want, rtol=1e-2, atol=1e-2)  # the output rounded to bf16


def test_kernel_rejects_bad_shapes_with_a_message(built):
    q, s = quantize_rows(torch.randn(8, 32))
    with pytest.raises(RuntimeError, match="features"):
        torch.ops.frankly.int8_linear(torch.randn(1, 31), q, s, None)
    with pytest.raises(RuntimeError, match="int8"):
        torch.ops.frankly.int8_linear(torch.randn(1, 32), q.float(), s, None)


def test_int8_linear_agrees_across_the_two_kernels(built):
    lin = nn.Linear(256, 72, bias=True)
    layer = Int8Linear.from_linear(lin)
    x = torch.randn(4, 7, 256)
    with kernels.using("frankly"):
        ours = layer(x)
    with kernels.using("aten"):
        theirs = layer(x)
    assert ours.dtype == theirs.dtype == torch.bfloat16 and ours.shape == theirs.shape == (4, 7, 72)
    exact = _reference(x.to(torch.bfloat16).reshape(-1, 256), layer.weight_q, layer.scale, layer.bias)
    err_ours = (ours.float().reshape(-1, 72) - exact).abs().max()
    err_theirs = (theirs.float().reshape(-1, 72) - exact).abs().max()
    assert err_ours <= err_theirs * 1.5 + 1e-3  # fp32 sums: no less exact than torch's kernel


def test_a_quantized_model_gives_the_same_tokens_on_either_kernel(built):
    model = tiny_model("qwen2")
    quantize_model(model)
    ids = tokens(batch=2)
    with torch.no_grad():
        with kernels.using("aten"):
            a = model(ids).logits.float().log_softmax(-1)
        with kernels.using("frankly"):
            b = model(ids).logits.float().log_softmax(-1)
    kl = (a.exp() * (a - b)).sum(-1).mean()
    assert kl < 1e-3, kl
    top2 = a.topk(2, -1).values
    clear = (top2[..., 0] - top2[..., 1]) > 0.05  # a random tiny model has near-ties; those may flip
    assert clear.any() and torch.equal(a.argmax(-1)[clear], b.argmax(-1)[clear])


def test_auto_falls_back_to_torch_and_says_why_without_a_compiler(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("FRANKLY_CACHE_DIR", str(tmp_path))  # nothing cached: it would have to build
    kernels.reset_for_tests()
    try:
        k = kernels.choose("auto", quiet=True)
        assert k.name == "aten" and "no C++ compiler" in k.why
        assert "aten._weight_int8pack_mm" in k.describe() and "compiler" in caplog.text
        with pytest.raises(kernels.KernelError, match="no C\\+\\+ compiler"):
            kernels.choose("frankly", quiet=True)
        layer = Int8Linear.from_linear(nn.Linear(32, 8))
        assert layer(torch.randn(2, 32)).shape == (2, 8)  # the layer still runs, on torch's kernel
    finally:
        kernels.reset_for_tests()


def test_a_compile_error_is_reported_with_the_compiler_output(monkeypatch, tmp_path):
    bad = tmp_path / "bad.cpp"
    bad.write_text("this is not C++\n")
    monkeypatch.setattr(kernels, "SOURCE", bad)
    monkeypatch.setenv("FRANKLY_CACHE_DIR", str(tmp_path))
    with pytest.raises(kernels.KernelError, match="building frankly's int8 kernel failed"):
        kernels.build(quiet=True)
    assert not list(tmp_path.glob("kernels/*/*.so"))  # no half-written library left to load next time


def test_aten_choice_builds_nothing_and_unknown_choices_are_refused(monkeypatch, tmp_path):
    monkeypatch.setenv("FRANKLY_CACHE_DIR", str(tmp_path))
    kernels.reset_for_tests()
    try:
        assert kernels.choose("aten").name == "aten"
        assert not (tmp_path / "kernels").exists()
        with pytest.raises(kernels.KernelError, match="unknown int8 kernel"):
            kernels.choose("fastest")
    finally:
        kernels.reset_for_tests()


def test_int8_activations_are_fp32_on_frankly_kernel_and_bf16_on_torchs(built):
    from directions.models import quantized_compute_dtype

    with kernels.using("frankly"):
        assert quantized_compute_dtype("int8") is torch.float32  # the kernel widens them itself
        assert quantized_compute_dtype("int4") is torch.bfloat16  # torch's int4 kernel
    with kernels.using("aten"):
        assert quantized_compute_dtype("int8") is torch.bfloat16  # _weight_int8pack_mm is fast only on bf16


def test_an_fp32_activation_int8_model_is_closer_to_fp32_than_a_bf16_one(built):
    import copy

    base = tiny_model("qwen2")
    ids = tokens(batch=2)
    with torch.no_grad():
        ref = base(ids).logits.float().log_softmax(-1)
    kls = {}
    for dt in (torch.float32, torch.bfloat16):
        m = copy.deepcopy(base)
        quantize_model(m, compute_dtype=dt)
        if dt is torch.bfloat16:
            m.to(torch.bfloat16)
        with torch.no_grad(), kernels.using("frankly"):
            lp = m(ids).logits.float().log_softmax(-1)
        kls[dt] = float((ref.exp() * (ref - lp)).sum(-1).mean())
    assert kls[torch.float32] < kls[torch.bfloat16], kls


def test_dtype_chooses_the_int8_activations_and_refuses_float16(built):
    from directions.models import ModelLoadError, quantized_compute_dtype

    with kernels.using("frankly"):
        assert quantized_compute_dtype("int8", "bfloat16") is torch.bfloat16  # half the KV cache
    with kernels.using("aten"):
        assert quantized_compute_dtype("int8", "float32") is torch.float32
    with pytest.raises(ModelLoadError, match="float32 or bfloat16"):
        quantized_compute_dtype("int8", "float16")


# --- the steering edit inside the kernel call (SteeringHooks on int8 writers) ---


def _unit_rows(d, n, seed):
    r = torch.randn(d, n, generator=torch.Generator().manual_seed(seed))
    return r / r.norm(dim=-1, keepdim=True)


@pytest.mark.parametrize("shape", [(2, 3, 96), (4, 96), (1, 1, 96)])
def test_kernel_projects_out_each_direction_of_each_batch_row(built, shape):
    q, s = quantize_rows(torch.randn(48, 96))
    x = torch.randn(*shape)
    B = shape[0]
    r = _unit_rows(2, 48, 1)
    strengths = torch.tensor([[0.5, 1.0], [0.0, 1.0], [0.3, 0.0], [1.0, 1.0]])[:B]
    cr = strengths[:, :, None] * r[None]  # (B, D, N)
    plain = torch.ops.frankly.int8_linear(x, q, s, None)
    got = torch.ops.frankly.int8_linear(x, q, s, None, r, cr)
    want = plain.reshape(B, -1, 48)
    for d in range(2):  # one direction after the other, as the hooks do
        want = want - (want @ r[d])[..., None] * cr[:, d][:, None, :]
    torch.testing.assert_close(got, want.reshape(plain.shape), atol=1e-5, rtol=1e-5)
    # strength 1 on a row leaves nothing along that direction (for the last direction applied)
    full = strengths[:, 1] == 1.0
    along = (got.reshape(B, -1, 48) @ r[1])[full]
    assert along.abs().max() < 1e-4
    # rows at strength 0 for every direction are exactly the plain output
    zero = torch.ops.frankly.int8_linear(x, q, s, None, r, torch.zeros_like(cr))
    assert torch.equal(zero, plain)


def test_kernel_refuses_steering_terms_of_the_wrong_shape(built):
    q, s = quantize_rows(torch.randn(48, 96))
    x = torch.randn(3, 96)
    r = _unit_rows(1, 48, 2)
    with pytest.raises(RuntimeError, match="r must be"):
        torch.ops.frankly.int8_linear(x, q, s, None, _unit_rows(1, 40, 2), torch.zeros(3, 1, 40))
    with pytest.raises(RuntimeError, match="do not split"):
        torch.ops.frankly.int8_linear(x, q, s, None, r, torch.zeros(2, 1, 48))
    with pytest.raises(RuntimeError, match="needs cr"):
        torch.ops.frankly.int8_linear(x, q, s, None, r, None)


def _steered(model, dirs, strengths, ids):
    from directions.hooks import SteeringHooks

    hooks = SteeringHooks(model, dirs)
    hooks.set_strengths(strengths)
    try:
        with torch.no_grad():
            return model(ids).logits, hooks
    finally:
        hooks.remove()


def test_int8_writers_take_the_edit_inside_the_kernel_with_no_hook(built, monkeypatch):
    from tests.tiny_models import random_direction_set

    model = tiny_model("qwen2")
    quantize_model(model, compute_dtype=torch.float32)
    dirs = {"a": random_direction_set(model, "a", seed=1), "b": random_direction_set(model, "b", seed=2)}
    ids = tokens(seed=3, batch=3)
    strengths = {"a": [1.0, 0.0, 0.5], "b": [0.0, 0.0, -1.0]}
    with torch.no_grad():
        plain = model(ids).logits
    from directions.hooks import SteeringHooks

    hooks = SteeringHooks(model, dirs)
    hooks.set_strengths(strengths)
    int8_writers = [w for w in hooks.writers if isinstance(w.module, Int8Linear)]
    assert int8_writers and all(not w.module._forward_hooks for w in int8_writers)
    assert any(w.module.steer for w in int8_writers) and all(len(w.module.steer) <= 1 for w in int8_writers)
    with torch.no_grad():
        fused = model(ids).logits
    hooks.set_strengths({"a": [0.0] * 3})
    assert not hooks.installed and all(not w.module.steer for w in int8_writers)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, plain)  # nothing left behind
    # the same edit through forward hooks (what other writers and torch's kernel get)
    monkeypatch.setattr(Int8Linear, "fused_steering", lambda self: False)
    hooked, _ = _steered(model, dirs, strengths, ids)
    assert all(w.module._forward_hooks == {} for w in int8_writers)  # removed again
    torch.testing.assert_close(fused, hooked, atol=1e-4, rtol=1e-4)
    assert torch.equal(fused[1], plain[1])  # the row at strength 0 is the plain model's, bit for bit
    assert (fused[0] - plain[0]).abs().max() > 1e-2  # and the steered rows did change


def test_two_hook_owners_on_one_int8_model_both_apply(built, monkeypatch):
    from directions.hooks import SteeringHooks
    from tests.tiny_models import random_direction_set

    model = tiny_model("qwen2")
    quantize_model(model, compute_dtype=torch.float32)
    a, b = random_direction_set(model, "a", seed=1), random_direction_set(model, "b", seed=2)
    ids = tokens(seed=5, batch=2)

    def both():
        h1, h2 = SteeringHooks(model, {"a": a}), SteeringHooks(model, {"b": b})
        h1.set_strengths({"a": [1.0, 0.5]})
        h2.set_strengths({"b": [0.5, 1.0]})
        with torch.no_grad():
            out = model(ids).logits
        h1.remove()
        h2.remove()
        return out

    fused = both()
    monkeypatch.setattr(Int8Linear, "fused_steering", lambda self: False)
    torch.testing.assert_close(fused, both(), atol=1e-4, rtol=1e-4)


def test_an_edit_installed_on_frankly_kernel_still_applies_if_the_kernel_changes(built):
    from tests.tiny_models import random_direction_set

    model = tiny_model("qwen2")
    quantize_model(model, compute_dtype=torch.float32)
    dirs = {"a": random_direction_set(model, "a", seed=1)}
    ids = tokens(seed=6, batch=2)
    from directions.hooks import SteeringHooks

    hooks = SteeringHooks(model, dirs)
    hooks.set_strengths({"a": [1.0, 1.0]})
    with torch.no_grad():
        ours = model(ids).logits
        with kernels.using("aten"):
            theirs = model(ids).logits
            hooks.remove()
            plain = model(ids).logits
    assert (theirs - plain).abs().max() > 1e-2  # steered, not silently plain
    a, b = ours.float().log_softmax(-1), theirs.float().log_softmax(-1)
    assert (a.exp() * (a - b)).sum(-1).mean() < 1e-2  # the two kernels' bf16/fp32 rounding apart


# --- siblings that read one input (q/k/v, gate/up) as one kernel call ---


def _kernel_calls(model, ids) -> int:
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as prof:
        model(ids)
    return sum(e.count for e in prof.key_averages() if e.key == "frankly::int8_linear")


def test_fused_siblings_give_the_same_logits_bit_for_bit_and_store_nothing_twice(built):
    from directions.quant import fuse_shared_inputs

    model = tiny_model("qwen2")
    quantize_model(model, compute_dtype=torch.float32)
    ids = tokens(seed=7, batch=2)
    with torch.no_grad():
        before = model(ids).logits
    calls_before = _kernel_calls(model, ids)
    bytes_before = sum(b.numel() * b.element_size() for b in model.buffers())
    groups = fuse_shared_inputs(model)
    assert groups == 2 * model.config.num_hidden_layers  # q/k/v and gate/up in every layer
    attn = model.model.layers[0].self_attn
    base = attn.q_proj.weight_q.untyped_storage().data_ptr()
    assert attn.k_proj.weight_q.untyped_storage().data_ptr() == base  # views of one stacked tensor
    assert sum(b.numel() * b.element_size() for b in model.buffers()) == bytes_before  # as module buffers
    with torch.no_grad():
        after = model(ids).logits
    assert torch.equal(before, after)  # each output row depends only on its weight row and x
    layers = model.config.num_hidden_layers
    assert _kernel_calls(model, ids) == calls_before - 3 * layers  # 5 reader calls a layer become 2
    assert fuse_shared_inputs(model) == 0  # already fused


def test_a_fused_sibling_called_alone_or_on_another_input_computes_its_own(built):
    from directions.quant import fuse_shared_inputs

    model = tiny_model("qwen2")
    quantize_model(model, compute_dtype=torch.float32)
    attn = model.model.layers[0].self_attn
    d = attn.q_proj.in_features
    x1, x2 = torch.randn(1, 3, d), torch.randn(1, 3, d)
    want = {n: getattr(attn, n)(x) for n in ("q_proj", "k_proj", "v_proj") for x in (x1,)}
    want2 = attn.k_proj(x2)
    fuse_shared_inputs(model)
    assert torch.equal(attn.q_proj(x1), want["q_proj"])  # computes q, k, v
    assert torch.equal(attn.k_proj(x2), want2)  # another input: not x1's k
    assert torch.equal(attn.k_proj(x1), want["k_proj"])
    assert torch.equal(attn.v_proj(x1), want["v_proj"])
    assert torch.equal(attn.v_proj(x1), want["v_proj"])  # served twice: the second computes again


def test_fused_siblings_keep_outputs_per_thread(built):
    import threading

    from directions.quant import fuse_shared_inputs

    model = tiny_model("qwen2")
    quantize_model(model, compute_dtype=torch.float32)
    mlp = model.model.layers[1].mlp
    d = mlp.gate_proj.in_features
    xs = [torch.randn(2, d) for _ in range(2)]
    want = [(mlp.gate_proj(x), mlp.up_proj(x)) for x in xs]
    fuse_shared_inputs(model)
    got, barrier = [None, None], threading.Barrier(2)

    def run(i):
        g = mlp.gate_proj(xs[i])
        barrier.wait()  # both threads hold pending outputs before either takes its up projection
        got[i] = (g, mlp.up_proj(xs[i]))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(2):
        assert torch.equal(got[i][0], want[i][0]) and torch.equal(got[i][1], want[i][1])


def test_fused_siblings_share_one_call_for_an_input_in_another_dtype(built):
    """The siblings recognise the input as the caller passed it, before the cast to the compute dtype."""
    from torch.profiler import ProfilerActivity, profile

    from directions.quant import fuse_shared_inputs

    model = tiny_model("qwen2")
    quantize_model(model, compute_dtype=torch.float32)
    mlp = model.model.layers[0].mlp
    x = torch.randn(1, 2, mlp.gate_proj.in_features).to(torch.bfloat16)
    want = (mlp.gate_proj(x), mlp.up_proj(x))
    fuse_shared_inputs(model)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        got = (mlp.gate_proj(x), mlp.up_proj(x))
    calls = sum(e.count for e in prof.key_averages() if e.key == "frankly::int8_linear")
    assert calls == 1
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_cpu_supported_reads_the_cpu_flags(monkeypatch):
    monkeypatch.setattr(kernels.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(kernels, "_cpu_flags", lambda: "fpu sse2 avx avx2 fma bmi2")
    assert kernels.cpu_supported()
    monkeypatch.setattr(kernels, "_cpu_flags", lambda: "fpu sse2 avx")
    assert not kernels.cpu_supported()
    monkeypatch.setattr(kernels.platform, "machine", lambda: "aarch64")
    monkeypatch.setattr(kernels, "_cpu_flags", lambda: "fp asimd avx2 fma")
    assert not kernels.cpu_supported()
