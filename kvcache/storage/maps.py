"""The linear maps of one layer's storage: what keys, queries and values pass through around the cache.

Built once per pool from the layer's codecs (a Hadamard rotation, the calibrated query-aware key
transform ``A`` from the parameters file) and applied by the transformers glue: stored keys are
``k @ k_map``, queries read them as ``q @ q_map`` with ``q_map = k_map^-T`` (so ``q.k`` is unchanged),
stored values are ``v @ v_map`` and the output is rotated back with ``v_map^T``.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import torch

from ..errors import ModeError
from ..modes import Codec
from ..transforms import hadamard

if TYPE_CHECKING:
    from .layout import LayerKV


@functools.lru_cache(maxsize=8)
def _hadamard_on(head_dim: int, block: int, device: str) -> torch.Tensor:
    """One Hadamard matrix per device, size and block, shared by every layer and pool that rotates:
    block-diagonal with ``head_dim / block`` orthonormal Hadamard blocks (``block == head_dim``: the whole head)."""
    return torch.block_diag(*[hadamard(block)] * (head_dim // block)).to(device)


def _rotation(codec: Codec, head_dim: int, device: str) -> torch.Tensor | None:
    block = codec.rotation_for(head_dim)
    if not block:
        return None
    if head_dim % block:
        raise ModeError(f"{codec.label()} rotates blocks of {block} channels, which do not divide this model's head_dim "
                        f"{head_dim}: pick a mode without rotation (llama.cpp itself stores such heads unrotated: use the "
                        "scheme's -norot variant)")
    if block & (block - 1):
        raise ModeError(f"a Hadamard rotation needs a power-of-two head_dim, this model's is {head_dim}: "
                        "pick a mode without rotation (e.g. int8-dynamic)")
    return _hadamard_on(head_dim, block, device)


def layer_maps(k_codec: Codec, v_codec: Codec, num_kv_heads: int, head_dim: int,
               transform: torch.Tensor | None = None, device: torch.device | str = "cpu",
               ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """``(k_map [kv_heads, d, d], q_map [kv_heads, d, d], v_map [d, d])`` on ``device``; None for an identity.

    ``transform``: the calibrated key transform ``A`` (``[kv_heads, d, d]``) when the K codec uses it. A
    rotation alone is one shared matrix (K's maps are views of it, expanded over the KV heads): no
    per-layer copies.
    """
    rot = _rotation(k_codec, head_dim, str(device))
    k_map = q_map = None
    if transform is not None:
        a = transform.double()
        r = (rot.cpu() if rot is not None else torch.eye(head_dim)).double()
        k_map = (a @ r).float().contiguous().to(device)
        q_map = (torch.linalg.inv(a).transpose(-1, -2) @ r).float().contiguous().to(device)
    elif rot is not None:
        k_map = q_map = rot.expand(num_kv_heads, head_dim, head_dim)
    return k_map, q_map, _rotation(v_codec, head_dim, str(device))


def _apply(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    return (x.float() @ m).to(x.dtype)


def map_kv(layer: "LayerKV", key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values (``[batch, kv_heads, n, d]``) as the layer stores them."""
    if layer.k_map is not None:
        key = _apply(key, layer.k_map[None])
    if layer.v_map is not None:
        value = _apply(value, layer.v_map)
    return key, value


def map_query(layer: "LayerKV", query: torch.Tensor) -> torch.Tensor:
    """Queries (``[batch, heads, n, d]``) as they read the stored keys: each KV head's ``q_map`` for its query heads."""
    if layer.q_map is None:
        return query
    b, hq, n, d = query.shape
    kvh = layer.num_kv_heads
    return _apply(query.view(b, kvh, hq // kvh, n, d), layer.q_map[None, :, None]).view(b, hq, n, d)


def unmap_output(layer: "LayerKV", out: torch.Tensor) -> torch.Tensor:
    """Attention output over stored values (last dim head_dim) rotated back to the model's values."""
    return out if layer.v_map is None else _apply(out, layer.v_map.T)
