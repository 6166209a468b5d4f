"""Read the residual stream of chosen layers out of llama.cpp's graph, during a pass.

llama.cpp's context parameter ``cb_eval`` (a ``ggml_backend_sched_eval_callback``, what its
imatrix and eval-callback tools use) is called for every node of every computed graph,
first with ``ask=True`` (does the caller want this tensor?) and, for the nodes it wanted,
again with ``ask=False`` once the node is computed. :class:`LayerProbe` wants the nodes
named ``l_out-<i>`` (each architecture's graph names the output of decoder layer ``i`` so)
and copies their last column: the residual stream after layer ``i`` at the last token of the
pass. That is ``hidden_states[i + 1]`` in transformers' convention, the input of decoder
layer ``i + 1``, which is what the torch engine's probe reads for a detection layer
``L = i + 1`` (:meth:`directions.hooks.SteeringHooks.probe`).

The callback is a Python function behind ctypes, called for each of the graph's nodes (823
per pass for the demo model): one-token passes took 1-9 ms longer with it (57-68 against
60-77 ms, one thread, a loaded 2-core machine). It therefore belongs on a context that only
runs the prefills that need it, never on the context that decodes.
"""

from __future__ import annotations

import ctypes
from collections.abc import Iterable

import numpy as np

GGML_TYPE_F32 = 0


class _TensorHead(ctypes.Structure):
    """The leading fields of ``struct ggml_tensor`` (ggml.h): type, buffer, ne[4], nb[4]."""

    _fields_ = [
        ("type", ctypes.c_int),
        ("buffer", ctypes.c_void_p),
        ("ne", ctypes.c_int64 * 4),
        ("nb", ctypes.c_size_t * 4),
    ]


def _ggml():
    from llama_cpp._ggml import libggml

    libggml.ggml_get_name.argtypes = [ctypes.c_void_p]
    libggml.ggml_get_name.restype = ctypes.c_char_p
    libggml.ggml_backend_tensor_get.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t]
    libggml.ggml_backend_tensor_get.restype = None
    return libggml


def node_name(layer: int) -> str:
    """The graph node holding ``hidden_states[layer]`` (the input of decoder layer ``layer``, layer >= 1)."""
    if layer < 1:
        raise ValueError(f"detection layer {layer}: llama.cpp's graphs name layer outputs, so layers >= 1 only")
    return f"l_out-{layer - 1}"


class LayerProbe:
    """Captures ``hidden_states[L]`` at the last token of each pass for every ``L`` in ``layers``.

    After a pass, ``captured[L]`` is a float32 (d_model,) copy; a layer the graph did not
    produce stays absent. Call :meth:`reset` before a pass to forget the previous one's.
    """

    def __init__(self, layers: Iterable[int]):
        from llama_cpp import ggml_backend_sched_eval_callback

        self._g = _ggml()
        self.layers = sorted({int(L) for L in layers})
        self._wanted = {node_name(L).encode(): L for L in self.layers}
        self.captured: dict[int, np.ndarray] = {}
        self.errors: list[str] = []
        self.nodes_seen = 0
        # kept on the instance: llama.cpp holds the pointer for the context's lifetime
        self.callback = ggml_backend_sched_eval_callback(self._on_node)

    def reset(self) -> None:
        self.captured = {}

    def _on_node(self, tensor, ask, _user) -> bool:
        try:
            self.nodes_seen += 1
            name = self._g.ggml_get_name(tensor)
            L = self._wanted.get(name)
            if L is None:
                return False
            if ask:
                return True
            self.captured[L] = self._last_column(tensor, name)
        except Exception as e:  # an exception must not cross into C; the layer stays absent
            self.errors.append(f"{type(e).__name__}: {e}")
        return True  # False on a computed node would stop the rest of the graph

    def _last_column(self, tensor, name: bytes) -> np.ndarray:
        head = _TensorHead.from_address(tensor)
        if head.type != GGML_TYPE_F32:
            raise TypeError(f"{name.decode()} is ggml type {head.type}, not F32")
        d, n = int(head.ne[0]), int(head.ne[1])
        out = np.empty(d, np.float32)
        self._g.ggml_backend_tensor_get(tensor, out.ctypes.data, (n - 1) * int(head.nb[1]), d * 4)
        return out
