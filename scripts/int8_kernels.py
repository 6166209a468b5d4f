#!/usr/bin/env python
"""Weight formats for the torch engine, side by side in one run (demo model, greedy decode).

For each format: bare-model decode tok/s at batch 1 and 8 (the same KV-cache loop
for all), the weight bytes one token reads, the bandwidth that implies against
this machine's measured read bandwidth (``scripts/bandwidth.py``'s torch_read),
and first-token KL against fp32 on chat-templated harmless validation prompts.

Formats: fp32; bf16; ``int8-dynamic`` (torch.ao ``quantize_dynamic``, fbgemm,
int8 activations, per-channel weights: the fast kernel that loses quality);
``int8`` (frankly's ``--weights int8``: weight-only per-channel int8 on frankly's own
kernel ``frankly.int8_linear``, fp32 activations between layers, quantized from the fp32 load);
``int8-aten`` (what ``--int8-kernel aten`` serves: the same weights on torch's
``aten._weight_int8pack_mm``, bf16 activations);
``int8-gguf`` / ``int8-gguf-aten`` (the same two, read straight from the GGUF, ``directions.gguf_load``);
``int4-gguf`` (the GGUF's Q4_K / Q4_0 / Q4_1 tensors as they are on
``aten._weight_int4pack_mm_for_cpu``, the other tensors int8).

Speeds are the best of ``--rounds`` interleaved rounds (every format once per round), so a
machine shared with other jobs slows all formats alike; the first format is the "x fp32" base.

    python scripts/int8_kernels.py [--model demo|FILE.gguf] [--formats fp32,int8,...] [--prompts 16] [--tokens 24]
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from directions import kernels, lean
from directions.models import load_model
from directions.quant import Int4Linear, Int8Linear, fuse_shared_inputs, quantize_model, weights_to_huge_pages

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bandwidth import measure

VAL = Path(__file__).resolve().parent.parent / "directions/prompts/refusal/harmless_val.txt"


def decode_tps(model, ids: torch.Tensor, batch: int, n: int) -> float:
    x = ids.repeat(batch, 1)
    with torch.no_grad():
        out = model(x, use_cache=True)
        cache, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
        t0 = time.perf_counter()
        for _ in range(n):
            out = model(nxt, past_key_values=cache, use_cache=True)
            cache, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
        return batch * n / (time.perf_counter() - t0)


def first_token_logprobs(model, prompts) -> list[torch.Tensor]:
    with torch.no_grad():
        return [model(p).logits[0, -1].float().log_softmax(-1) for p in prompts]


def bytes_per_token(model) -> int:
    """Bytes of the weights one decode step reads: every linear layer (and head), not the embedding table."""
    total = 0
    for m in model.modules():
        if isinstance(m, Int8Linear):
            total += m.weight_q.numel() + m.scale.numel() * m.scale.element_size()
        elif isinstance(m, Int4Linear):
            total += m.weight_packed.numel() + m.scale_zero.numel() * m.scale_zero.element_size()
        elif isinstance(m, torch.nn.Linear):
            total += m.weight.numel() * m.weight.element_size()
        elif type(m).__name__ == "Linear" and hasattr(m, "_packed_params"):  # torch.ao dynamic
            total += m.in_features * m.out_features
    return total


def formats(base, spec: str, wanted: set[str]):
    """(name, model, int8 kernel) for each wanted format, each as ``frankly serve`` would run it:
    the int8 formats on frankly's kernel with fp32 activations, the ``-aten`` ones on torch's kernel
    with bf16 activations (:func:`directions.models.quantized_compute_dtype`)."""
    if "fp32" in wanted:
        yield "fp32", base, "aten"
    for name, kernel, dtype in (("int8-gguf", "frankly", "float32"), ("int8-gguf-aten", "aten", "bfloat16")):
        if name in wanted:
            yield name, load_model(spec, device="cpu", dtype=dtype, weights="int8").model, kernel
    if "int4-gguf" in wanted:  # torch's int4 kernel, bf16 activations; its int8 tensors on the current kernel
        yield "int4-gguf", load_model(spec, device="cpu", weights="int4").model, "frankly"
    if "bf16" in wanted:
        yield "bf16", copy.deepcopy(base).to(torch.bfloat16), "aten"
    for name, kernel, dtype in (("int8", "frankly", torch.float32), ("int8-aten", "aten", torch.bfloat16)):
        if name in wanted:
            q = copy.deepcopy(base)
            quantize_model(q, compute_dtype=dtype)
            fuse_shared_inputs(q)  # q/k/v and gate/up as one call each, as load_model does
            lean.install(q)  # and the lean decoder layers, as load_model does
            weights_to_huge_pages(q)  # and the weights on huge pages
            yield name, q, kernel
    if "int8-dynamic" not in wanted:
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

        qspec = {n: per_channel_dynamic_qconfig for n, m in base.named_modules() if isinstance(m, torch.nn.Linear)}
        yield "int8-dynamic", quantize_dynamic(copy.deepcopy(base), qspec, dtype=torch.qint8), "aten"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=16, help="harmless validation prompts for the KL")
    ap.add_argument("--tokens", type=int, default=24, help="decode steps timed per batch size")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds (best of)")
    ap.add_argument("--model", default="demo", help="demo or a .gguf file (the *-gguf formats need one)")
    ap.add_argument(
        "--formats",
        default="fp32,bf16,int8-dynamic,int8-aten,int8,int8-gguf,int4-gguf",
        help="comma-separated: fp32 bf16 int8-dynamic int8 int8-aten int8-gguf int8-gguf-aten int4-gguf",
    )
    args = ap.parse_args(argv)
    lm = load_model(args.model)
    tok = lm.tokenizer
    lines = VAL.read_text().splitlines()[: args.prompts]
    prompts = [
        tok.apply_chat_template(
            [{"role": "user", "content": q}], add_generation_prompt=True, return_tensors="pt", return_dict=True
        )["input_ids"]
        for q in lines
    ]
    bw = measure(mib=512, repeats=3)["torch_read_gbs"]
    ref = first_token_logprobs(lm.model, prompts)
    print(f"read bandwidth (torch_read): {bw:.1f} GB/s; KL over {len(prompts)} harmless val prompts")
    print(
        f"{'format':<13} {'MB/token':>9} {'tok/s b1':>9} {'tok/s b8':>9} {'b1 x fp32':>9} {'b1 % of bw':>10} "
        f"{'KL mean':>8} {'KL max':>8} {'same top1':>9}"
    )
    models = list(formats(lm.model, args.model, set(args.formats.split(","))))
    print(f"frankly's int8 kernel: {kernels.choose().describe()}")
    speed = {name: [0.0, 0.0] for name, _, _ in models}
    for _ in range(args.rounds):  # interleaved, best of rounds: a shared machine's load hits every format alike
        for name, model, kernel in models:
            with kernels.using(kernel):
                speed[name][0] = max(speed[name][0], decode_tps(model, prompts[0], 1, args.tokens))
                speed[name][1] = max(speed[name][1], decode_tps(model, prompts[0], 8, args.tokens))
    base_tps = speed[models[0][0]][0]
    for name, model, kernel in models:
        b1, b8 = speed[name]
        with kernels.using(kernel):
            lp = first_token_logprobs(model, prompts)
        kls = [float((r.exp() * (r - x)).sum()) for r, x in zip(ref, lp, strict=True)]
        top = sum(int(r.argmax() == x.argmax()) for r, x in zip(ref, lp, strict=True))
        mb = bytes_per_token(model) / 1e6
        frac = 100 * b1 * mb / 1e3 / bw
        print(
            f"{name:<13} {mb:>9.0f} {b1:>9.1f} {b8:>9.1f} {b1 / base_tps:>9.2f} {frac:>9.0f}% "
            f"{sum(kls) / len(kls):>8.4f} {max(kls):>8.4f} {top:>5}/{len(prompts)}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
