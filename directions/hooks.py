"""Forward hooks on the model: the steering edit on every residual-stream writer, and a probe
that reads the residual stream entering chosen decoder layers (the condition of conditional
ablation). Both go through :class:`SteeringHooks`, the one owner of a model's hooks.

Strengths are per row: before each forward pass the engine sets a (batch,) strength tensor
per direction. When every strength of the pass is zero the edit hooks are removed entirely,
so the plain model runs untouched (bit-identical logits).

Int8 writers on frankly's kernel (:class:`directions.quant.Int8Linear`) take the edit inside their
own matmul call instead of through a hook (the same arithmetic, in fp32): a hook call and two
small ops per writer and step were 2-3 ms of a 45 ms int8 decode step.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

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
        # the writers each direction touches (weight != 0): the others get no term at all
        sites = {(COMPONENTS.index(w.kind), w.layer) for w in self.writers}
        self._touches = {
            n: sites & {(c, layer) for c, layer in (w != 0).nonzero().tolist()} for n, (_, w) in self.dirs.items()
        }
        # per writer (component, layer): the pass's terms, (r as a (d, 1) column, c*r as (B, 1, d))
        self._terms: dict[tuple[int, int], list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self._handles: list = []
        # writers that do the edit inside their own forward (int8 layers on frankly's kernel,
        # ``fused_steering()``): no hook; each gets the pass's terms stacked, (r [D, d], c*r [B, D, d]) in fp32
        self._fused: dict[tuple[int, int], nn.Module] = {}
        self._active = False

    @property
    def installed(self) -> bool:
        return self._active

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
            coef[name] = s
        # Each writer's edit y - sum_n c_n (y . r_n) r_n, with c_n = s_n * w_n per row, is computed
        # as y - (y @ r_n) * (c_n r_n): one matmul and one addcmul per direction, the products
        # c_n r_n made here once per pass composition instead of in every hook call.
        terms: dict[tuple[int, int], list[tuple[torch.Tensor, torch.Tensor]]] = {}
        for name, s in coef.items():
            dirs, w = self.dirs[name]
            for comp, layer in self._touches[name]:
                r = dirs[layer]
                cr = (w[comp, layer] * s)[:, None, None] * r  # (B, 1, d)
                terms.setdefault((comp, layer), []).append((r.view(-1, 1), cr))
        self._terms = terms
        if coef and not self._active:
            self._install()
        elif not coef and self._active:
            self.remove()
        self._push_fused()

    def _push_fused(self) -> None:
        """Hand each fused writer its stacked terms for the pass (or take them back)."""
        me = id(self)
        for key, module in self._fused.items():
            terms = self._terms.get(key) if self._active else None
            if terms:
                r = torch.stack([r_col.view(-1) for r_col, _ in terms]).float()
                cr = torch.cat([c for _, c in terms], dim=1).float()
                module.steer[me] = (r, cr)
            else:
                module.steer.pop(me, None)

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
        self._fused = {}
        for w in self.writers:
            key = (COMPONENTS.index(w.kind), w.layer)
            fused = getattr(w.module, "fused_steering", None)
            if fused is not None and fused():
                self._fused[key] = w.module
            else:
                self._handles.append(w.module.register_forward_hook(self._make_hook(*key)))
        self._active = True

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self._active = False
        self._push_fused()
        self._fused = {}

    def _make_hook(self, comp: int, layer: int):
        key = (comp, layer)

        def hook(module, inputs, output):
            terms = self._terms.get(key)
            if not terms:
                return None  # the output as it is
            y = output
            for r_col, cr in terms:
                if r_col.dtype != y.dtype:  # a writer computing in another dtype than the model's parameters
                    r_col, cr = r_col.to(y.dtype), cr.to(y.dtype)
                if y.dim() == 2:  # (tokens, d) layouts: one token per row
                    cr = cr.view(-1, cr.shape[-1])
                y = torch.addcmul(y, y @ r_col, cr, value=-1)
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
