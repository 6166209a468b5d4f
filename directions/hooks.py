"""Forward hooks on the model: the steering edit on every residual-stream writer, and a probe
that reads the residual stream entering chosen decoder layers (the condition of conditional
ablation). Both go through :class:`SteeringHooks`, the one owner of a model's hooks.

Strengths are per row: before each forward pass the engine sets a (batch,) strength tensor
per direction. When every strength of the pass is zero the edit hooks are removed entirely,
so the plain model runs untouched (bit-identical logits).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from directions.edit import project_out
from directions.fileformat import COMPONENTS, DirectionSet
from directions.writers import Writer, decoder_layers, find_writers


class SteeringHooks:
    """Owns the hook handles of one model and the per-row strengths of the current pass.

    Only the inference thread touches an instance; it is not shared between
    concurrent passes.
    """

    def __init__(self, model: nn.Module, directions: dict[str, DirectionSet]):
        self.model = model
        self.writers: list[Writer] = find_writers(model)
        p = next(model.parameters())
        self._dtype, self._device = p.dtype, p.device
        # Directions in the model's dtype on its device: (n_layers, d), and the writer weights
        # (3, n_layers) in COMPONENTS row order (DirectionSet.writer_weights, shared with bake/LoRA)
        self.dirs = {
            n: (ds.directions.to(self._device, self._dtype), ds.writer_weights().to(self._device, self._dtype))
            for n, ds in directions.items()
        }
        self._coef: dict[str, torch.Tensor] = {}  # name -> (3, n_layers, B, 1, 1)
        self._handles: list = []

    @property
    def installed(self) -> bool:
        return bool(self._handles)

    def set_strengths(self, strengths: dict[str, torch.Tensor | list[float]]) -> None:
        """Set per-row strengths (name -> (batch,)) for the next forward passes.

        Directions whose strengths are all zero are dropped; if none is left
        the hooks are removed.
        """
        coef = {}
        for name, s in strengths.items():
            if name not in self.dirs:
                raise KeyError(name)
            s = torch.as_tensor(s, dtype=self._dtype, device=self._device)
            if not torch.any(s != 0):
                continue
            w = self.dirs[name][1]
            coef[name] = (w[:, :, None] * s[None, None, :]).view(*w.shape, s.shape[0], 1, 1)
        self._coef = coef
        if coef and not self._handles:
            self._install()
        elif not coef and self._handles:
            self.remove()

    def clear(self) -> None:
        self.set_strengths({})

    @contextmanager
    def probe(self, layers: Iterable[int]) -> Iterator[dict[int, torch.Tensor]]:
        """Capture, during the passes inside the block, the fp32 input of each decoder layer in
        ``layers`` at the last position: ``captured[L]`` is (batch, d_model). With left-padded rows
        that is each row's last prompt token (``hidden_states[L]``, the file format's convention).
        A layer the model does not have is skipped (its key stays absent)."""
        captured: dict[int, torch.Tensor] = {}
        wanted = set(layers)
        all_layers = decoder_layers(self.model) if wanted else []
        handles = []
        for L in wanted:
            if len(all_layers) <= L:
                continue

            def pre(module, args, kwargs, L=L):
                h = args[0] if args else kwargs["hidden_states"]
                captured[L] = h[:, -1].float().clone()

            handles.append(all_layers[L].register_forward_pre_hook(pre, with_kwargs=True))
        try:
            yield captured
        finally:
            for h in handles:
                h.remove()

    def _install(self) -> None:
        for w in self.writers:
            self._handles.append(w.module.register_forward_hook(self._make_hook(COMPONENTS.index(w.kind), w.layer)))

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def _make_hook(self, comp: int, layer: int):
        def hook(module, inputs, output):
            y = output
            for name, coef in self._coef.items():
                c = coef[comp, layer]
                if y.dim() == 2:  # (tokens, d) layouts
                    c = c.view(-1, 1)
                y = project_out(y, self.dirs[name][0][layer], c)
            return y

        return hook

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()


@contextmanager
def edited(model: nn.Module, directions: dict[str, DirectionSet] | None) -> Iterator[SteeringHooks | None]:
    """Hooks for ``directions`` on ``model`` for the duration of the block (None without directions)."""
    if not directions:
        yield None
        return
    hooks = SteeringHooks(model, directions)
    try:
        yield hooks
    finally:
        hooks.remove()
