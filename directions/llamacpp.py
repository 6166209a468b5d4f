"""A thin, typed wrapper of llama.cpp's low-level API (through ``llama-cpp-python``'s ctypes bindings).

Only what frankly needs: load a GGUF, load LoRA adapters and set their
scales per pass, decode a batch of (token, position, sequence) entries with
logits where asked, drop a sequence from the KV cache, copy a sequence's KV
state from one context to another, and read the residual stream of chosen
layers during a pass (:class:`directions.llamacpp_probe.LayerProbe`).
``llama-cpp-python`` is an optional dependency (``pip install 'frankly[llamacpp]'``
compiles llama.cpp); importing this module does not need it, constructing does.

:class:`LlamaCpp` owns the model, its adapters and a main :class:`Context`
(its ``decode``/``prefill``/``clear``/``set_scales`` are the main context's);
:meth:`LlamaCpp.new_context` opens more contexts on the same weights.
"""

from __future__ import annotations

import ctypes
import logging
import os
import struct
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


def _cpu_lib():
    """llama-cpp-python's ggml CPU backend library (None if it is not where the package keeps it)."""
    import llama_cpp

    path = Path(llama_cpp.__file__).parent / "lib" / "libggml-cpu.so"
    try:
        return ctypes.CDLL(str(path))
    except OSError:
        return None


def use_extra_buffer_types() -> bool:
    """Whether llama.cpp may put weights in its extra CPU buffer types (``use_extra_bufts``: the AMX
    tiles and the repacked Q4 layouts). ``FRANKLY_LLAMACPP_EXTRA_BUFTS=1`` / ``0`` decides; otherwise
    yes, except on a build with AMX kernels: on this project's build machine (a Xeon with AMX, in a
    Firecracker VM) every ``llama_decode`` crashed with SIGSEGV in ``ggml_backend_amx_mul_mat``, and
    plain CPU buffers ran. llama-cpp-python compiles with ``-march=native``, so a build on an AMX CPU
    has those kernels."""
    env = os.environ.get("FRANKLY_LLAMACPP_EXTRA_BUFTS", "").strip()
    if env in ("0", "1"):
        return env == "1"
    lib = _cpu_lib()
    has_amx = getattr(lib, "ggml_cpu_has_amx_int8", None) if lib is not None else None
    return not (has_amx is not None and has_amx())


class Context:
    """One llama.cpp context on a loaded model: its KV cache (``n_seq_max`` sequences), its batch and
    its adapter scales. Not thread-safe: one thread drives it."""

    def __init__(
        self,
        owner: LlamaCpp,
        n_ctx: int,
        n_seq_max: int,
        n_batch: int,
        threads: int,
        probe=None,
        threads_batch: int | None = None,
    ):
        C = self._C = owner._C
        self.owner = owner
        cp = C.llama_context_default_params()
        cp.n_ctx, cp.n_batch, cp.n_ubatch, cp.n_seq_max = n_ctx, n_batch, n_batch, n_seq_max
        cp.n_threads, cp.n_threads_batch = threads, threads_batch or threads
        cp.no_perf = True
        self.probe = probe
        if probe is not None:  # llama.cpp calls it for every graph node of every pass of this context
            cp.cb_eval = probe.callback
        self.ctx = C.llama_init_from_model(owner.model, cp)
        if not self.ctx:
            raise LlamaCppError(f"llama.cpp could not create a context for {owner.model_path} (n_ctx={n_ctx})")
        self.n_ctx, self.n_seq_max, self.n_batch = n_ctx, n_seq_max, n_batch
        self.n_vocab = owner.n_vocab
        self.mem = C.llama_get_memory(self.ctx)
        self._scales: tuple = ()
        self._batch = C.llama_batch_init(n_batch, 0, 1)

    @property
    def scales(self) -> tuple:
        """The active (name, scale) pairs, sorted by name (zero scales left out)."""
        return self._scales

    def set_scales(self, scales: dict[str, float]) -> bool:
        """Activate adapters at these scales for the next passes; zero scales are left out entirely,
        so all-zero runs the base graph. Returns whether anything changed. A change makes llama.cpp
        reserve its compute graphs again at the next pass (~30 ms for the demo model on this machine)."""
        active = tuple(sorted((n, float(s)) for n, s in scales.items() if s != 0.0))
        if active == self._scales:
            return False
        adapters = self.owner._adapters
        for n, _ in active:
            if n not in adapters:
                raise LlamaCppError(f"no adapter {n!r} loaded (loaded: {', '.join(adapters) or 'none'})")
        C = self._C
        arr = (C.llama_adapter_lora_p_ctypes * max(1, len(active)))(*[adapters[n] for n, _ in active])
        sc = (ctypes.c_float * max(1, len(active)))(*[s for _, s in active])
        if C.llama_set_adapters_lora(self.ctx, arr if active else None, len(active), sc if active else None):
            raise LlamaCppError(f"llama.cpp refused the adapter scales {dict(active)}")
        self._scales = active
        return True

    def decode(
        self, tokens: Sequence[int], pos: Sequence[int], seq: Sequence[int], want: Sequence[bool], copy: bool = True
    ) -> np.ndarray:
        """One forward pass over these entries; returns the logits (n_wanted, n_vocab) in entry order.
        With ``copy=False`` they are a view of llama.cpp's buffer, valid until this context's next pass."""
        n = len(tokens)
        if n == 0:
            return np.zeros((0, self.n_vocab), np.float32)
        if n > self.n_batch:
            raise LlamaCppError(f"batch of {n} entries is over n_batch={self.n_batch}")
        b = self._batch
        b.n_tokens = n
        n_out = 0
        for i in range(n):
            b.token[i] = int(tokens[i])
            b.pos[i] = int(pos[i])
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = int(seq[i])
            b.logits[i] = 1 if want[i] else 0
            n_out += 1 if want[i] else 0
        rc = self._C.llama_decode(self.ctx, b)
        if rc != 0:
            raise LlamaCppError(f"llama_decode failed ({rc}): the KV cache is full or the batch is invalid")
        if n_out == 0:
            return np.zeros((0, self.n_vocab), np.float32)
        # the wanted rows are contiguous, in batch order
        out = np.ctypeslib.as_array(self._C.llama_get_logits(self.ctx), shape=(n_out, self.n_vocab))
        return out.copy() if copy else out

    def prefill(self, tokens: Sequence[int], seq: int = 0, start: int = 0) -> np.ndarray:
        """Feed a prompt to ``seq`` in n_batch chunks; returns a copy of the last position's logits (n_vocab,)."""
        last = None
        for i in range(0, len(tokens), self.n_batch):
            chunk = tokens[i : i + self.n_batch]
            flags = [False] * len(chunk)
            if i + len(chunk) == len(tokens):
                flags[-1] = True
            out = self.decode(chunk, range(start + i, start + i + len(chunk)), [seq] * len(chunk), flags, copy=False)
            if len(out):
                last = out[-1].copy()
        if last is None:
            raise LlamaCppError("empty prompt")
        return last

    def clear(self, seq: int = -1) -> None:
        """Drop ``seq`` (or every sequence with -1) from the KV cache."""
        self._C.llama_memory_seq_rm(self.mem, seq, -1, -1)

    def copy_seq_to(self, dst: Context, seq: int, dst_seq: int) -> None:
        """Copy ``seq``'s KV cells (positions included) into ``dst_seq`` of ``dst``, a context on the same model
        (``llama_state_seq_get_data`` / ``llama_state_seq_set_data``); ``dst_seq`` is cleared first.

        The state records the source's KV stream count (one per sequence, llama.cpp's default
        non-unified cache), which the destination checks. A one-sequence source state is
        rewritten for a destination with more streams: the same stream block, then an empty
        block for each other stream (the reader puts the cells into ``dst_seq``'s own stream).
        Raises :class:`LlamaCppError` if llama.cpp does not take the state (an unknown layout)."""
        C = self._C
        size = C.llama_state_seq_get_size(self.ctx, seq)
        buf = (ctypes.c_uint8 * size)()
        if not size or C.llama_state_seq_get_data(self.ctx, buf, size, seq) != size:
            raise LlamaCppError(f"llama.cpp could not read the state of sequence {seq}")
        data = bytes(buf)
        if dst.n_seq_max != self.n_seq_max:
            data = restream(data, self.n_seq_max, dst.n_seq_max)
        dst.clear(dst_seq)
        src = (ctypes.c_uint8 * len(data)).from_buffer_copy(data)
        if not C.llama_state_seq_set_data(dst.ctx, src, len(data), dst_seq):
            raise LlamaCppError(f"llama.cpp did not load the state of sequence {seq} into sequence {dst_seq}")

    def close(self) -> None:
        C = self._C
        if getattr(self, "_batch", None) is not None:
            C.llama_batch_free(self._batch)
            self._batch = None
        if getattr(self, "ctx", None):
            C.llama_free(self.ctx)
            self.ctx = None


_STATE_HEAD = struct.Struct("<IiI")  # llama_state_seq_get_data: magic, seq id, then the KV cache's stream count


def restream(state: bytes, n_from: int, n_to: int) -> bytes:
    """A sequence state of a one-stream context, for a context with ``n_to`` streams (see :meth:`Context.copy_seq_to`)."""
    magic, seq, n_stream = _STATE_HEAD.unpack_from(state)
    if n_from != 1 or n_stream != 1:
        raise LlamaCppError(f"cannot move a sequence state of {n_stream} KV streams to a context with {n_to}")
    return _STATE_HEAD.pack(magic, seq, n_to) + state[_STATE_HEAD.size :] + bytes(4 * (n_to - 1))


class LlamaCpp:
    """One llama.cpp model, its LoRA adapters and its main context. Not thread-safe: one thread drives it."""

    def __init__(
        self,
        model_path: str | Path,
        *,
        n_ctx: int = 4096,
        n_seq_max: int = 1,
        n_batch: int = 512,
        n_threads: int | None = None,
        n_gpu_layers: int = 0,
        n_threads_batch: int | None = None,
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
        if hasattr(mp, "use_extra_bufts"):
            mp.use_extra_bufts = use_extra_buffer_types()
            if not mp.use_extra_bufts:
                _log.info("llama.cpp extra CPU buffer types (AMX, repacked Q4) off")
        self.model_path = str(model_path)
        self._adapters: dict[str, object] = {}
        self._contexts: list[Context] = []
        if not Path(model_path).is_file():
            raise LlamaCppError(f"GGUF file not found: {model_path}")
        self.model = C.llama_model_load_from_file(self.model_path.encode(), mp)
        if not self.model:
            raise LlamaCppError(f"llama.cpp could not load {model_path}")
        self.vocab = C.llama_model_get_vocab(self.model)
        self.n_vocab = int(C.llama_vocab_n_tokens(self.vocab))
        self.n_layer = int(C.llama_model_n_layer(self.model))
        self.threads = n_threads or max(1, os.cpu_count() or 1)
        self.threads_batch = n_threads_batch or self.threads  # passes of several tokens
        try:
            self.main = self.new_context(n_ctx, n_seq_max, n_batch)
        except LlamaCppError:
            self.close()
            raise
        self.n_ctx, self.n_seq_max, self.n_batch = n_ctx, n_seq_max, n_batch

    def new_context(self, n_ctx: int, n_seq_max: int = 1, n_batch: int | None = None, probe=None) -> Context:
        """Another context on the same weights and adapters (closed with this object). ``probe``
        (a :class:`directions.llamacpp_probe.LayerProbe`) becomes its graph evaluation callback."""
        c = Context(self, n_ctx, n_seq_max, n_batch or self.main.n_batch, self.threads, probe, self.threads_batch)
        self._contexts.append(c)
        return c

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

    # --- the main context ----------------------------------------------------------------------

    def set_scales(self, scales: dict[str, float]) -> bool:
        return self.main.set_scales(scales)

    def decode(
        self, tokens: Sequence[int], pos: Sequence[int], seq: Sequence[int], want: Sequence[bool], copy: bool = True
    ) -> np.ndarray:
        return self.main.decode(tokens, pos, seq, want, copy)

    def prefill(self, tokens: Sequence[int], seq: int = 0, start: int = 0) -> np.ndarray:
        return self.main.prefill(tokens, seq, start)

    def clear(self, seq: int = -1) -> None:
        self.main.clear(seq)

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
        for c in getattr(self, "_contexts", []):
            c.close()
        self._contexts = []
        for ptr in self._adapters.values():
            C.llama_adapter_lora_free(ptr)
        self._adapters = {}
        if getattr(self, "model", None):
            C.llama_model_free(self.model)
            self.model = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
