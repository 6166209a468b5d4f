"""A thin, typed wrapper of llama.cpp's low-level API (through ``llama-cpp-python``'s ctypes bindings).

Only what frankly needs: load a GGUF, load LoRA adapters and set their
scales per pass, decode a batch of (token, position, sequence) entries with
logits where asked, drop a sequence from the KV cache. ``llama-cpp-python``
is an optional dependency (``pip install 'frankly[llamacpp]'`` compiles
llama.cpp); importing this module does not need it, constructing does.
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np


class LlamaCppError(RuntimeError):
    """llama.cpp refused a model, an adapter or a batch; the message says which."""


def _lib():
    try:
        import llama_cpp
    except ImportError as e:
        raise LlamaCppError(
            "llama-cpp-python is not installed: pip install 'frankly[llamacpp]' (it compiles llama.cpp, 10-30 minutes)"
        ) from e
    return llama_cpp


_backend_lock = threading.Lock()
_backend_ready = False
_log = logging.getLogger("frankly.llamacpp")
_LEVELS = {3: logging.WARNING, 4: logging.ERROR}  # ggml_log_level WARN, ERROR; DEBUG/INFO/CONT dropped
_log_callback = None  # kept alive: llama.cpp holds the pointer


def _route_logs(C) -> None:
    """llama.cpp prints hundreds of INFO lines per model load to stderr: keep its warnings and errors only,
    through Python logging."""
    global _log_callback

    def cb(level, text, _user):
        if level in _LEVELS and text:
            _log.log(_LEVELS[level], "%s", text.decode("utf-8", "replace").rstrip())

    _log_callback = C.llama_log_callback(cb)
    C.llama_log_set(_log_callback, ctypes.c_void_p(0))


class LlamaCpp:
    """One llama.cpp model and context. Not thread-safe: one thread drives it."""

    def __init__(
        self,
        model_path: str | Path,
        *,
        n_ctx: int = 4096,
        n_seq_max: int = 1,
        n_batch: int = 512,
        n_threads: int | None = None,
        n_gpu_layers: int = 0,
    ):
        global _backend_ready
        C = self._C = _lib()
        with _backend_lock:
            if not _backend_ready:
                _route_logs(C)
                C.llama_backend_init()
                _backend_ready = True
        mp = C.llama_model_default_params()
        mp.n_gpu_layers = n_gpu_layers
        self.model_path = str(model_path)
        if not Path(model_path).is_file():
            raise LlamaCppError(f"GGUF file not found: {model_path}")
        self.model = C.llama_model_load_from_file(self.model_path.encode(), mp)
        if not self.model:
            raise LlamaCppError(f"llama.cpp could not load {model_path}")
        threads = n_threads or max(1, os.cpu_count() or 1)
        cp = C.llama_context_default_params()
        cp.n_ctx, cp.n_batch, cp.n_ubatch, cp.n_seq_max = n_ctx, n_batch, n_batch, n_seq_max
        cp.n_threads = cp.n_threads_batch = threads
        cp.no_perf = True
        self.ctx = C.llama_init_from_model(self.model, cp)
        if not self.ctx:
            C.llama_model_free(self.model)
            raise LlamaCppError(f"llama.cpp could not create a context for {model_path} (n_ctx={n_ctx})")
        self.n_ctx, self.n_seq_max, self.n_batch = n_ctx, n_seq_max, n_batch
        self.vocab = C.llama_model_get_vocab(self.model)
        self.n_vocab = int(C.llama_vocab_n_tokens(self.vocab))
        self.mem = C.llama_get_memory(self.ctx)
        self._adapters: dict[str, object] = {}
        self._scales: tuple = ()
        self._batch = C.llama_batch_init(n_batch, 0, 1)

    # --- adapters ------------------------------------------------------------------------------

    def load_adapter(self, name: str, path: str | Path) -> None:
        """Load a LoRA adapter GGUF under ``name`` (inactive until :meth:`set_scales` names it)."""
        ptr = self._C.llama_adapter_lora_init(self.model, str(path).encode())
        if not ptr:
            raise LlamaCppError(f"llama.cpp could not load the LoRA adapter {path} for {self.model_path}")
        self._adapters[name] = ptr

    @property
    def adapters(self) -> list[str]:
        return list(self._adapters)

    def set_scales(self, scales: dict[str, float]) -> bool:
        """Activate adapters at these scales for the next passes; zero scales are left out entirely,
        so all-zero runs the base graph. Returns whether anything changed."""
        active = tuple(sorted((n, float(s)) for n, s in scales.items() if s != 0.0))
        if active == self._scales:
            return False
        for n, _ in active:
            if n not in self._adapters:
                raise LlamaCppError(f"no adapter {n!r} loaded (loaded: {', '.join(self._adapters) or 'none'})")
        C = self._C
        arr = (C.llama_adapter_lora_p_ctypes * max(1, len(active)))(*[self._adapters[n] for n, _ in active])
        sc = (ctypes.c_float * max(1, len(active)))(*[s for _, s in active])
        if C.llama_set_adapters_lora(self.ctx, arr if active else None, len(active), sc if active else None):
            raise LlamaCppError(f"llama.cpp refused the adapter scales {dict(active)}")
        self._scales = active
        return True

    # --- decoding ------------------------------------------------------------------------------

    def decode(self, tokens: Sequence[int], pos: Sequence[int], seq: Sequence[int], want: Sequence[bool]) -> np.ndarray:
        """One forward pass over these entries; returns the logits (n_wanted, n_vocab) in entry order."""
        n = len(tokens)
        if n == 0:
            return np.zeros((0, self.n_vocab), np.float32)
        if n > self.n_batch:
            raise LlamaCppError(f"batch of {n} entries is over n_batch={self.n_batch}")
        b = self._batch
        b.n_tokens = n
        for i in range(n):
            b.token[i] = int(tokens[i])
            b.pos[i] = int(pos[i])
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = int(seq[i])
            b.logits[i] = 1 if want[i] else 0
        rc = self._C.llama_decode(self.ctx, b)
        if rc != 0:
            raise LlamaCppError(f"llama_decode failed ({rc}): the KV cache is full or the batch is invalid")
        rows = [i for i in range(n) if want[i]]
        out = np.empty((len(rows), self.n_vocab), np.float32)
        for k, i in enumerate(rows):
            ptr = self._C.llama_get_logits_ith(self.ctx, i)
            out[k] = np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))
        return out

    def prefill(self, tokens: Sequence[int], seq: int = 0, start: int = 0) -> np.ndarray:
        """Feed a prompt to ``seq`` in n_batch chunks; returns the last position's logits (n_vocab,)."""
        last = None
        for i in range(0, len(tokens), self.n_batch):
            chunk = tokens[i : i + self.n_batch]
            flags = [False] * len(chunk)
            if i + len(chunk) == len(tokens):
                flags[-1] = True
            out = self.decode(chunk, range(start + i, start + i + len(chunk)), [seq] * len(chunk), flags)
            if len(out):
                last = out[-1]
        if last is None:
            raise LlamaCppError("empty prompt")
        return last

    def clear(self, seq: int = -1) -> None:
        """Drop ``seq`` (or every sequence with -1) from the KV cache."""
        self._C.llama_memory_seq_rm(self.mem, seq, -1, -1)

    def greedy(self, prompt: Sequence[int], n: int, seq: int = 0) -> tuple[list[int], np.ndarray]:
        """Greedy continuation of ``prompt`` (n tokens) and the first position's logits; clears ``seq`` first."""
        self.clear(seq)
        logits = self.prefill(list(prompt), seq)
        first, out = logits.copy(), []
        pos = len(prompt)
        for _ in range(n):
            t = int(np.argmax(logits))
            out.append(t)
            logits = self.decode([t], [pos], [seq], [True])[0]
            pos += 1
        self.clear(seq)
        return out, first

    def close(self) -> None:
        C = getattr(self, "_C", None)
        if C is None:
            return
        if getattr(self, "_batch", None) is not None:
            C.llama_batch_free(self._batch)
            self._batch = None
        for ptr in self._adapters.values():
            C.llama_adapter_lora_free(ptr)
        self._adapters = {}
        if getattr(self, "ctx", None):
            C.llama_free(self.ctx)
            self.ctx = None
        if getattr(self, "model", None):
            C.llama_model_free(self.model)
            self.model = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
