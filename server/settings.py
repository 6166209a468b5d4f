"""Settings: one source order, CLI flags > env ``FRANKLY_*`` > config file (TOML).

Model settings and server settings are separate objects; the CLI builds both
and passes plain values down (the engine never sees the CLI namespace).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

CONFIG_ENV = "FRANKLY_CONFIG"


class _Base(BaseSettings):
    @classmethod
    def settings_customise_sources(
        cls, settings_cls, init_settings, env_settings, dotenv_settings, file_secret_settings
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        path = os.environ.get(CONFIG_ENV)
        if path and Path(path).is_file():
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=path))
        return tuple(sources)


class ModelSettings(_Base):
    model_config = SettingsConfigDict(env_prefix="FRANKLY_", extra="ignore")

    model: str = Field("demo", description="hub id, local model directory, .gguf file, or 'demo'")
    engine: Literal["torch", "llamacpp", "vllm"] = Field(
        "torch",
        description="torch: transformers with hooks (every feature, fp32/bf16); llamacpp: llama.cpp on the "
        "GGUF itself, quantized, steering through LoRA adapters (faster on CPUs; "
        "needs the llamacpp extra and a .gguf model or demo); vllm: a vllm serve that frankly starts, one "
        "LoRA adapter per exported strength (GPU clusters; see --vllm-strengths)",
    )
    served_model_name: str | None = Field(
        None, description="model id clients use (default: 'qwen-demo' for demo, else the directory/file name)"
    )
    device: str = Field("auto", description="auto, cpu, cuda, cuda:N or mps")
    dtype: str = Field(
        "auto",
        description="auto (fp32 on CPU, bf16/fp16 on GPUs), float32, bfloat16, float16; with --weights int8 the "
        "activations' dtype (auto: float32 on frankly's kernel, bfloat16 on torch's; bfloat16 halves the KV cache)",
    )
    directions: list[str] = Field(default_factory=list, description="NAME=PATH direction file (repeat the flag)")
    no_default_directions: bool = Field(False, description="skip the directions shipped for the demo model")
    allow_fingerprint_mismatch: bool = Field(
        False, description="load directions whose config hash differs (shape must still match)"
    )
    max_model_len: int | None = Field(
        None, ge=16, description="context limit (default: the model's max_position_embeddings, capped at 8192)"
    )
    num_threads: int | None = Field(
        None,
        ge=1,
        description="CPU threads: torch's (default: all cores), or llama.cpp's for one-token passes "
        "(default: half the cores)",
    )
    num_threads_batch: int | None = Field(
        None,
        ge=1,
        description="llama.cpp engine: threads for passes of several tokens (prompts, batched decode steps); "
        "default: all cores, as llama_cpp.server",
    )
    weights: Literal["auto", "float", "int8"] = Field(
        "auto",
        description="auto: int8 for the torch engine on an x86-64 CPU with AVX2 and FMA (with --dtype auto or "
        "float32 and no --packed-weights), where it measured 4x faster than float; float everywhere else; "
        "float: weights in --dtype; int8: CPU, every linear layer (LM head included) int8 per "
        "channel on frankly's own AVX2 kernel with fp32 activations (--int8-kernel; bf16 on torch's), a GGUF read "
        "tensor by tensor without an fp32 copy, lean decoder layers (one op each for the norms, the rotary "
        "embedding, a decode step's attention over the bf16 KV cache and the MLP's activation) and the weights on "
        "transparent huge pages (FRANKLY_HUGE_PAGES=0: off); torch engine only",
    )
    int8_kernel: Literal["auto", "frankly", "aten"] = Field(
        "auto",
        description="--weights int8 matmul: frankly (its own AVX2/FMA kernel, compiled with g++ for this CPU on "
        "first use and cached), aten (torch's _weight_int8pack_mm), auto (frankly where it builds, else aten "
        "with a warning saying why)",
    )
    kv_dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto",
        description="torch engine KV cache: auto (bfloat16 under --weights int8 with fp32 activations and SDPA "
        "attention: half the cache's memory, attention still in fp32; otherwise the activations' dtype), float32, bfloat16",
    )
    packed_weights: bool = Field(
        False,
        description="CPU, float32: prepack every linear weight for oneDNN once at load (batched decode much "
        "faster, single stream ~20% slower, logits differ from plain transformers by ~1e-5 relative)",
    )
    vllm_path: str | None = Field(
        None, description="vllm executable for --engine vllm (default: vllm on PATH, else /opt/vllmvenv/bin/vllm)"
    )
    vllm_strengths: Annotated[list[float], NoDecode] = Field(
        default_factory=lambda: [0.5, 1.0],
        description="--engine vllm: strengths exported as one adapter per direction each (comma-separated; "
        "requests may ask for exactly these; default 0.5,1.0)",
    )
    vllm_combinations: list[str] = Field(
        default_factory=list,
        description="--engine vllm: also export this several-direction steering, NAME=S,NAME=S (repeat the flag)",
    )
    vllm_args: str = Field(
        "", description="--engine vllm: extra vllm serve arguments, one string (e.g. '--tensor-parallel-size 2')"
    )
    vllm_ready_timeout_s: float = Field(900.0, gt=0, description="--engine vllm: how long vLLM may take to start")

    @field_validator("vllm_strengths", mode="before")
    @classmethod
    def _split_strengths(cls, v):
        if isinstance(v, str | float | int):
            v = [v]
        return [float(x) for item in v for x in (str(item).split(",")) if x.strip()]


class ServerSettings(_Base):
    model_config = SettingsConfigDict(env_prefix="FRANKLY_", extra="ignore")

    host: str = Field("127.0.0.1", description="bind address; loopback unless told otherwise")
    port: int = Field(8000, ge=0, le=65535, description="TCP port")
    api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="accepted bearer key for /v1/* (repeat the flag, or env FRANKLY_API_KEYS=a,b; none: open)",
    )
    api_key_file: str | None = Field(None, description="file with one API key per line")
    admin_key: str | None = Field(
        None, description="key for state-changing routes (/v1/bake); those routes are off when unset"
    )
    cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="allowed CORS origin (repeat the flag; closed by default)"
    )
    bake_dir: str = Field("./baked", description="directory baked models are written under, by name")
    max_batch_size: int = Field(8, ge=1, le=256, description="rows in the running batch")
    max_queue: int = Field(64, ge=0, description="waiting requests beyond the batch; over it: 429 with Retry-After")
    max_body_bytes: int = Field(2_000_000, ge=1024, description="largest accepted request body")
    default_max_tokens: int = Field(512, ge=1, description="max_tokens when a request gives none")
    max_tokens_cap: int = Field(4096, ge=1, description="largest max_tokens a request may ask for")
    max_n: int = Field(4, ge=1, description="largest n (choices per request)")
    max_directions_per_request: int = Field(8, ge=1, description="directions one request may steer")
    max_abs_strength: float = Field(4.0, gt=0, description="|strength| bound per direction")
    max_stop: int = Field(4, ge=0, description="stop sequences per request")
    max_stop_len: int = Field(64, ge=1, description="characters per stop sequence")
    max_logprobs: int = Field(20, ge=0, description="largest top_logprobs")
    request_timeout_s: float = Field(600.0, gt=0, description="a request running longer ends with an error")
    shutdown_grace_s: float = Field(30.0, ge=0, description="on SIGTERM, how long in-flight requests may finish")
    log_unknown_fields: bool = Field(True, description="log request fields frankly ignores")

    @field_validator("api_keys", "cors_origins", mode="before")
    @classmethod
    def _split(cls, v):
        if isinstance(v, str):
            return [x.strip() for x in v.split(",") if x.strip()]
        return v

    def all_api_keys(self) -> list[str]:
        keys = list(self.api_keys)
        if self.api_key_file:
            keys += [
                ln.strip()
                for ln in Path(self.api_key_file).read_text().splitlines()
                if ln.strip() and not ln.startswith("#")
            ]
        return keys
