"""Kernel dispatch (store, decode, prefill): CUDA tensors take the Triton kernels, CPU tensors the plain-torch references.

Set ``KVQ_FORCE_REFERENCE=1`` to force the reference path on CUDA (for debugging a kernel). A layer whose
layout the kernels do not take (:func:`kvcache.kernels.common.unsupported`: e.g. 4-bit codes at head_dim 16,
4-bit groups that straddle the two halves of head_dim) runs the references on CUDA too.

Only the cache calls these, with slots and block tables it built itself (and that torch bounds-checks
on the reference path, which most tests take), so on a GPU they skip the kernels' index range checks: one
host sync each, two per layer per decode step, would stall the launch queue. ``KVQ_KERNEL_CHECKS=1``
turns them back on for debugging. Direct calls of the Triton wrappers check by default.
"""

from __future__ import annotations

import os

import torch

from ..storage.layout import LayerKV
from .reference import (
    decode_attention_reference,
    prefill_attention_reference,
    store_kv_reference,
)


def use_triton(t: torch.Tensor) -> bool:
    """True when ``t`` lives on a GPU and nobody asked for the reference path."""
    return t.is_cuda and os.environ.get("KVQ_FORCE_REFERENCE", "0") != "1"


def _kernels_take(layer: LayerKV, store: bool = False) -> bool:
    from .common import unsupported, unsupported_store

    return (unsupported_store if store else unsupported)(layer) is None


def store_kv(layer: LayerKV, key: torch.Tensor, value: torch.Tensor, slots: torch.Tensor) -> None:
    """Write (and quantize) ``[num_tokens, kv_heads, head_dim]`` K/V at ``slots``."""
    if use_triton(key) and _kernels_take(layer, store=True):
        from .common import range_checks_enabled
        from .paged_store import store_kv_triton

        return store_kv_triton(layer, key, value, slots, check_ranges=range_checks_enabled(default=False))
    return store_kv_reference(layer, key, value, slots)


def prefill_attention(
    query: torch.Tensor, layer: LayerKV, block_tables: torch.Tensor, kv_len: int, scale: float,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """A chunk of new tokens over the cached history (itself included): ``[batch, q_len, heads, head_dim]``.

    The Triton kernel takes fp16/bf16 queries; fp32 models take the reference (dequantize, then SDPA) on a GPU too.
    """
    if use_triton(query) and _kernels_take(layer):
        from .common import range_checks_enabled
        from .paged_prefill import PREFILL_DTYPES, prefill_attention_triton

        if query.dtype in PREFILL_DTYPES:
            return prefill_attention_triton(query, layer, block_tables, kv_len, scale, attention_mask,
                                            check_ranges=range_checks_enabled(default=False))
    return prefill_attention_reference(query, layer, block_tables, kv_len, scale, attention_mask)


def decode_attention(
    query: torch.Tensor, layer: LayerKV, block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float
) -> torch.Tensor:
    """Attention of one new token per sequence over its cached history, read in the stored format.

    fp32 queries over a layer with sinks take the reference on a GPU too: the kernel's tf32x3 sink tile
    spills registers on sm_90 (``python -m bench.kernel_compile``), and fp32 models are rare there.
    """
    fp32_sinks = query.dtype == torch.float32 and layer.sink_tokens > 0
    if use_triton(query) and _kernels_take(layer) and not fp32_sinks:
        from .common import range_checks_enabled
        from .paged_decode import decode_attention_triton

        return decode_attention_triton(query, layer, block_tables, seq_lens, scale,
                                       check_ranges=range_checks_enabled(default=False))
    return decode_attention_reference(query, layer, block_tables, seq_lens, scale)
