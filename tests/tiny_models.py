"""Seeded tiny random causal LMs of several architectures, and random direction sets for them.

Each model builds in milliseconds (hidden 64, 2-3 layers, vocab 128, fp32,
eval mode). Weights use a larger init range than transformers' default so
logits are far from uniform and greedy decoding is not a tie-break lottery.
"""

from __future__ import annotations

import random

import torch
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    GemmaConfig,
    LlamaConfig,
    MistralConfig,
    Phi3Config,
    Qwen2Config,
)

from directions.fileformat import DirectionSet

VOCAB = 128
COMMON = dict(
    hidden_size=64,
    intermediate_size=128,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=VOCAB,
    max_position_embeddings=256,
    initializer_range=0.1,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)

# name -> (config class, extra config kwargs). "llama_bias" puts biases on the
# writers themselves (o_proj, down_proj); qwen2's biases sit on q/k/v only.
ARCHS: dict[str, tuple[type, dict]] = {
    "llama": (LlamaConfig, dict(num_hidden_layers=3)),
    "llama_bias": (LlamaConfig, dict(num_hidden_layers=2, attention_bias=True, mlp_bias=True)),
    "llama_tied": (LlamaConfig, dict(num_hidden_layers=2, tie_word_embeddings=True)),
    "qwen2": (Qwen2Config, dict(num_hidden_layers=3)),
    "mistral": (MistralConfig, dict(num_hidden_layers=2, sliding_window=None)),
    "gemma": (GemmaConfig, dict(num_hidden_layers=2, head_dim=16)),
    "phi3": (Phi3Config, dict(num_hidden_layers=2)),
    "gemma2": (Gemma2Config, dict(num_hidden_layers=2, head_dim=16)),  # post-norm: writers are normalised
}
POST_NORM = {"gemma2"}
PRE_NORM_ARCHS = [a for a in ARCHS if a not in POST_NORM]


def tiny_config(arch: str):
    cls, extra = ARCHS[arch]
    return cls(**{**COMMON, **extra})


def tiny_model(arch: str, seed: int = 0) -> torch.nn.Module:
    """A seeded random fp32 model of ``arch`` in eval mode, gradients off."""
    cfg = tiny_config(arch)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            # Default init zeroes biases and makes norms uniform, which would hide a missed bias edit
            # and make a post-norm a plain rescale (which keeps orthogonality): perturb both.
            if name.endswith("bias"):
                p.normal_(0.0, 0.1)
            elif "norm" in name:
                p.add_(torch.randn_like(p) * 0.3)
    model.eval()
    model.requires_grad_(False)
    return model


def random_direction_set(model: torch.nn.Module, name: str = "test", seed: int = 1) -> DirectionSet:
    """Unit random vector per layer and random non-negative layer weights (one weight forced to 0)."""
    cfg = model.config
    n, d = cfg.num_hidden_layers, cfg.hidden_size
    g = torch.Generator().manual_seed(seed)
    dirs = torch.randn(n, d, generator=g)
    dirs = dirs / dirs.norm(dim=-1, keepdim=True)
    weights = torch.rand(n, generator=g) * 1.5
    if n > 2:
        weights[-1] = 0.0
    return DirectionSet(name=name, directions=dirs, layer_weights=weights, metadata={"name": name})


def tokens(seed: int = 0, batch: int = 1, length: int = 7) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, length), generator=g)


CHAT_TEMPLATE = "{% for m in messages %}<s> {{ m['content'] }} </s> {% endfor %}"


def tiny_tokenizer():
    """A word-level tokenizer over the tiny vocabulary ("<pad>", "<s>", "</s>", "t3" ... "t127"), with a chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"t{i}": i for i in range(3, VOCAB)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", chat_template=CHAT_TEMPLATE
    )


def save_tiny_dir(model: torch.nn.Module, path) -> str:
    """Write ``model`` and the tiny tokenizer as a Hugging Face directory; returns the path."""
    model.save_pretrained(str(path))
    tiny_tokenizer().save_pretrained(str(path))
    return str(path)


def tiny_prompts(lo: int, hi: int, n: int, seed: int) -> list[str]:
    """``n`` seeded prompts of 3-8 tiny-vocabulary words with ids in [lo, hi)."""
    rnd = random.Random(seed)
    return [" ".join(f"t{rnd.randrange(lo, hi)}" for _ in range(rnd.randrange(3, 9))) for _ in range(n)]


def tiny_extract_data(n_train: int = 12, n_val: int = 10):
    """Two separable prompt sets (ids 3-39 against 60-99), train and validation, for extraction tests."""
    from directions.selection import ExtractData

    return ExtractData(
        pos_train=tiny_prompts(3, 40, n_train, 1),
        neg_train=tiny_prompts(60, 100, n_train, 2),
        pos_val=tiny_prompts(3, 40, n_val, 3),
        neg_val=tiny_prompts(60, 100, n_val, 4),
    )


def tiny_refusal_direction(tmp_path, detect: bool = True, n_val: int = 12):
    """A tiny llama directory, separable prompt sets (16 train prompts per side), and a refusal
    direction file extracted from them at layer 1 (with a condition unless ``detect`` is false):
    (model, model_dir, data, ds, path)."""
    from directions import extract, selection
    from directions.fileformat import save_direction

    model = tiny_model("llama")
    model_dir = save_tiny_dir(model, tmp_path / "model")
    data = tiny_extract_data(n_train=16, n_val=n_val)
    ds = selection.select_and_build(
        model,
        tiny_tokenizer(),
        data,
        "refusal",
        selection.SelectConfig(layers=[1], batch_size=4, detect=detect),
        [extract.Candidate("single", 1)],
    )
    return model, model_dir, data, ds, save_direction(ds, tmp_path / "r.safetensors", config=model.config)
