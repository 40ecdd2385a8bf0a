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


def key_eigenbasis(key_cov: torch.Tensor, query_cov: torch.Tensor, transform: torch.Tensor,
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per KV head, where allocated key codes live: ``(basis [kv_heads, d, d], weight [kv_heads, d])``, keys stored as
    ``k @ basis``.

    After the query-aware transform ``A`` (:func:`qk_transform`) the key and query second moments are equal; their
    eigenvectors ``U`` decorrelate both, so per-channel noise costs ``sum_i E[q_i^2] E[n_i^2]`` in score error and
    bits can be given where it pays (transform coding). ``basis = A U diag(1/sigma)`` (descending variance, each
    channel of unit second moment, what one per-token scale and N(0, 1) levels expect); ``weight`` is each
    channel's E[q^2] in that basis: the score error of unit noise there. Computed in float64.
    """
    ck, cq, a = key_cov.double(), query_cov.double(), transform.double()
    lam, u = torch.linalg.eigh(a.transpose(-1, -2) @ ck @ a)
    lam, u = lam.flip(-1), u.flip(-1)
    lam = lam.clamp_min(lam[..., :1] * 1e-8)
    basis = a @ u / lam.sqrt()[..., None, :]
    inv = torch.linalg.inv(basis)
    weight = (inv @ cq @ inv.transpose(-1, -2)).diagonal(dim1=-2, dim2=-1)
    return basis.float(), weight.clamp_min(0).float()


def _mean_phase(omega: torch.Tensor, offsets: int) -> torch.Tensor:
    """``mean(exp(i * omega * t) for t in 0..offsets-1)``, elementwise (a geometric series, in closed form)."""
    half = torch.sin(omega / 2)
    ratio = torch.sin(omega * offsets / 2) / torch.where(half.abs() < 1e-12, torch.ones_like(half), half) / offsets
    mean = torch.polar(torch.ones_like(omega), omega * (offsets - 1) / 2) * ratio
    return torch.where(half.abs() < 1e-12, torch.ones_like(mean), mean)


def rope_averaged(cov: torch.Tensor, inv_freq: torch.Tensor, offsets: int) -> torch.Tensor:
    """E[x x^T] of vectors that RoPE turns on by a further ``0..offsets-1`` positions, from their E[x x^T] ``[..., d, d]``.

    Keys and queries are calibrated after RoPE at the positions of the calibration windows (say 0-511); at
    position 6,000 the same vectors are turned by other angles, and the slow RoPE pairs have not turned at
    all within 512 positions. A key transform fitted to the former misfits the latter (measured: its error
    grows 5-12x over a long window). Averaging the moments over the positions a context spans fits all of
    them. RoPE as transformers applies it (``rotate_half``: channel ``i`` pairs with ``i + d/2`` and turns by
    ``inv_freq[i]`` per position), taken as complex channels ``z = x[:h] + i x[h:]`` turned by ``exp(i theta t)``:
    ``E[z z^H]`` picks up the mean phase of ``theta_i - theta_j``, ``E[z z^T]`` that of ``theta_i + theta_j``.
    """
    d = cov.shape[-1]
    h = d // 2
    if inv_freq.shape != (h,):
        raise ValueError(f"RoPE over {2 * inv_freq.numel()} of {d} channels: only full-width RoPE can be averaged")
    if offsets <= 1:
        return cov
    c = cov.double()
    uu, uw, wu, ww = c[..., :h, :h], c[..., :h, h:], c[..., h:, :h], c[..., h:, h:]
    hermitian = torch.complex(uu + ww, wu - uw)  # E[z z^H]
    plain = torch.complex(uu - ww, wu + uw)  # E[z z^T]
    theta = inv_freq.double()
    hermitian = hermitian * _mean_phase(theta[:, None] - theta[None, :], offsets)
    plain = plain * _mean_phase(theta[:, None] + theta[None, :], offsets)
    s, diff = plain + hermitian, plain - hermitian
    top = torch.cat([s.real / 2, diff.imag / 2], -1)  # [E[u u^T], E[u w^T]]
    bottom = torch.cat([s.imag / 2, -diff.real / 2], -1)  # [E[w u^T], E[w w^T]]
    return torch.cat([top, bottom], -2).to(cov.dtype)
