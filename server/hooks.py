"""Forward hooks that project directions out of every residual-stream writer.

Strengths are per row: before each forward pass the engine sets a (batch,)
strength tensor per direction. When every strength of the pass is zero the
hooks are removed entirely, so the plain model runs untouched (bit-identical
logits).
"""

from __future__ import annotations

import torch
from torch import nn

from directions.edit import project_out
from directions.fileformat import DirectionSet
from directions.writers import Writer, find_writers


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
        # Directions in the model's dtype on its device: (n_layers, d) and (n_layers,)
        self.dirs = {
            n: (ds.directions.to(self._device, self._dtype), ds.layer_weights.to(self._device, self._dtype))
            for n, ds in directions.items()
        }
        self._coef: dict[str, torch.Tensor] = {}  # name -> (n_layers, B, 1, 1)
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
            coef[name] = (w[:, None] * s[None, :]).view(w.shape[0], s.shape[0], 1, 1)
        self._coef = coef
        if coef and not self._handles:
            self._install()
        elif not coef and self._handles:
            self.remove()

    def clear(self) -> None:
        self.set_strengths({})

    def _install(self) -> None:
        for w in self.writers:
            self._handles.append(w.module.register_forward_hook(self._make_hook(w.layer)))

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def _make_hook(self, layer: int):
        def hook(module, inputs, output):
            y = output
            for name, coef in self._coef.items():
                c = coef[layer]
                if y.dim() == 2:  # (tokens, d) layouts
                    c = c.view(-1, 1)
                y = project_out(y, self.dirs[name][0][layer], c)
            return y

        return hook

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()
