"""The edit, in one place.

Every module that writes into the residual stream (token embedding, attention
output projection, MLP down projection) has its output ``y`` at layer ``l``
mapped to::

    y <- y - c * (y . r_l) r_l        with c = s * w_l

(``w_l`` is the writer's weight, :meth:`directions.fileformat.DirectionSet.writer_weight`:
the layer weight times the optional weight of its component, embedding/attention/MLP)

and the bake applies the same map to the writer's weight and bias::

    W <- W - c * r_l (r_l^T W)        (Linear: W has d_model rows)
    E <- E - c * (E r_l) r_l^T        (Embedding: one row per token)
    b <- b - c * (r_l . b) r_l

Hooks, bake and tests all call these functions, so the hooked and baked
models are the same function for every strength, not only ``s = 1``.
"""

from __future__ import annotations

import torch


def project_out(y: torch.Tensor, r: torch.Tensor, coef: torch.Tensor | float) -> torch.Tensor:
    """Remove ``coef`` times the component of ``y`` along unit vector ``r``.

    ``y`` is (..., d); ``coef`` is a scalar or a tensor broadcastable against
    ``y[..., :1]`` (e.g. shape (batch, 1, 1) for per-row strengths).
    Computed in ``y``'s dtype with ``r`` cast to it; returns a new tensor.
    """
    r = r.to(dtype=y.dtype, device=y.device)
    proj = (y @ r).unsqueeze(-1)  # (..., 1)
    return y - (coef * proj) * r


def project_out_stacked(y: torch.Tensor, r: torch.Tensor, cr: torch.Tensor) -> torch.Tensor:
    """:func:`project_out` for several directions and per-row coefficients at once, in the form the int8
    kernel takes (``frankly::int8_linear``'s ``r``/``cr``; :class:`directions.quant.Int8Linear`): for each
    direction d in turn, ``y[b, t] -= (y[b, t] . r[d]) * cr[b, d]`` with ``cr[b, d] = c[b, d] * r[d]``.
    ``y`` is (B, T, N) or (B*T, N), ``r`` (D, N), ``cr`` (B, D, N); computed in fp32, returned in ``y``'s dtype."""
    shape, dtype = y.shape, y.dtype
    y3 = y.reshape(cr.shape[0], -1, shape[-1]).float()
    for d in range(r.shape[0]):
        y3 = y3 - (y3 @ r[d])[..., None] * cr[:, d][:, None, :]
    return y3.to(dtype).reshape(shape)


def bake_linear_weight(weight: torch.Tensor, r: torch.Tensor, coef: float) -> torch.Tensor:
    """Edit a Linear weight (out_features = d_model rows) whose output is the residual stream."""
    w32 = weight.to(torch.float32)
    r32 = r.to(torch.float32)
    out = w32 - coef * torch.outer(r32, r32 @ w32)
    return out.to(weight.dtype)


def bake_embedding_weight(weight: torch.Tensor, r: torch.Tensor, coef: float) -> torch.Tensor:
    """Edit an embedding table (one d_model row per token): each row is an output ``y``."""
    w32 = weight.to(torch.float32)
    return project_out(w32, r.to(torch.float32), coef).to(weight.dtype)


def bake_bias(bias: torch.Tensor, r: torch.Tensor, coef: float) -> torch.Tensor:
    """Edit a writer's bias; forgetting it breaks hook/bake equivalence."""
    return project_out(bias.to(torch.float32), r.to(torch.float32), coef).to(bias.dtype)


def normalize(v: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Unit vector(s) along the last dimension, in float32."""
    v = v.to(torch.float32)
    return v / v.norm(dim=-1, keepdim=True).clamp_min(eps)
