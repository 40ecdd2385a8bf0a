"""Linear maps applied to K, V and Q around the quantized cache: pure torch, no state.

An orthonormal rotation ``R`` of the channels (Hadamard) spreads an outlier channel over all of them,
so per-token codes lose less; it needs no calibration. A calibrated *query-aware* transform ``T`` of
the keys goes further: from the second moments of K and Q (per KV head) it picks the linear map that
minimises the expected score error of per-token quantization. Either way attention is unchanged:

- keys are stored as ``k' = k @ A`` and queries read them as ``q' = q @ A^-T`` (``q'.k' = q.k``);
- values are stored as ``v' = v @ R`` and the output is rotated back, ``o = o' @ R^T``.
"""

from __future__ import annotations

import functools
import math

import torch


@functools.lru_cache(maxsize=8)
def hadamard(n: int) -> torch.Tensor:
    """The orthonormal ``n x n`` Walsh-Hadamard matrix (Sylvester's construction; ``n`` a power of two)."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"a Hadamard rotation needs a power-of-two head_dim, got {n}")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return (h / math.sqrt(n)).float()


def _sqrtm(c: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """Symmetric square root (or inverse square root) of positive semi-definite matrices ``[..., n, n]``."""
    e, u = torch.linalg.eigh(c)
    e = e.clamp_min(e.amax(dim=-1, keepdim=True) * 1e-8)
    return (u * e.pow(-0.5 if inverse else 0.5)[..., None, :]) @ u.transpose(-1, -2)


def qk_transform(key_cov: torch.Tensor, query_cov: torch.Tensor) -> torch.Tensor:
    """Per KV head, the key map ``A`` (``[kv_heads, d, d]``, row vectors: ``k' = k @ A``) from E[k k^T] and E[q q^T].

    Per-token quantization adds noise of about the same size to every channel of ``k'``; the score error it
    causes is ``q' . noise`` with ``q' = q @ A^-T``. Minimising ``E|k'|^2 * E|q'|^2`` over ``A`` gives
    ``A A^T = M = Ck^-1/2 (Ck^1/2 Cq Ck^1/2)^1/2 Ck^-1/2`` (the matrix geometric mean of ``Ck^-1`` and
    ``Cq``); we take ``A = M^1/2``, scaled to determinant 1. Computed in float64.
    """
    ck, cq = key_cov.double(), query_cov.double()
    eye = torch.eye(ck.shape[-1], dtype=torch.float64)
    ck = ck + 1e-6 * ck.diagonal(dim1=-2, dim2=-1).mean(-1)[..., None, None] * eye  # keep it invertible
    s, s_inv = _sqrtm(ck), _sqrtm(ck, inverse=True)
    m = s_inv @ _sqrtm(s @ cq @ s) @ s_inv
    a = _sqrtm(m)
    a = a / torch.exp(torch.linalg.slogdet(a)[1] / a.shape[-1])[..., None, None]
    return a.transpose(-1, -2).float()  # row-vector convention: k' = k @ A
