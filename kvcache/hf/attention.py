"""The ``kvq`` attention implementation, registered with transformers.

When K/V come from a :class:`~kvcache.hf.cache.PagedKVCache` (a :class:`PagedView`), attention reads
the stored blocks: a decode step goes through ``kernels.decode_attention`` and a prefill chunk
through ``kernels.prefill_attention`` (Triton on a GPU, reading int8 directly; on a CPU the
references, which dequantize the history and call SDPA). Plain tensors (no cache, or another
cache) go straight to transformers' SDPA.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from ..kernels import decode_attention, prefill_attention
from ..storage.context import Phase, StepContext
from ..storage.maps import map_query, unmap_output
from .cache import PagedView

ATTN_IMPLEMENTATION = "kvq"
_query_observer: Callable[[int, torch.Tensor], None] | None = None


@contextlib.contextmanager
def observing_queries(observer: Callable[[int, torch.Tensor], None]) -> Iterator[None]:
    """While active, ``observer(layer_idx, query)`` sees every post-RoPE query ``kvq`` attention gets (calibration)."""
    global _query_observer
    _query_observer = observer
    try:
        yield
    finally:
        _query_observer = None


def kvq_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor | PagedView,
    value: torch.Tensor | PagedView,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Attention over a paged, possibly quantized, cache (``query`` is ``[batch, heads, q_len, head_dim]``)."""
    if not isinstance(key, PagedView):
        if _query_observer is not None:
            _query_observer(module.layer_idx, query)
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    ctx, storage = key.context, key.storage
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    query = map_query(storage, query)  # rotated / transformed keys are read by the matching queries
    if storage.residual:  # an emulated transformers residual window: attended in segments, re-quantized between
        from .residual import residual_attention

        if ctx.phase is Phase.PREFILL and ctx.start + ctx.num_new != ctx.end:
            raise RuntimeError("a prefill step's rows must all be equally long (the scheduler prefills one row at a time)")
        return unmap_output(storage, residual_attention(query, storage, ctx, scale, attention_mask)), None
    if ctx.phase is Phase.DECODE:
        if attention_mask is None:
            out = decode_attention(query[:, :, 0], storage, ctx.block_tables, ctx.seq_lens, scale)
            return unmap_output(storage, out[:, None]), None
        mask = _decode_mask(attention_mask, ctx, kwargs.get("sliding_window"))
        return unmap_output(storage, prefill_attention(query, storage, ctx.block_tables, ctx.end, scale, mask)), None
    if ctx.start + ctx.num_new != ctx.end:
        raise RuntimeError("a prefill step's rows must all be equally long (the scheduler prefills one row at a time)")
    if attention_mask is not None and attention_mask.dim() == 4:
        attention_mask = attention_mask[:, :, :, : ctx.end]  # as transformers' SDPA path trims it
    out = prefill_attention(query, storage, ctx.block_tables, ctx.end, scale, attention_mask)
    return unmap_output(storage, out), None


def _decode_mask(attention_mask: torch.Tensor, ctx: StepContext, window: int | None) -> torch.Tensor:
    """The mask a decode step attends with. transformers builds its mask at the longest row's position; rows of
    equal length keep it (it may carry padding), rows of unequal length (the scheduler's, which passes no padding)
    each attend their own length, within ``window`` when the layer slides."""
    if ctx.start + 1 == ctx.end:
        return attention_mask[..., : ctx.end] if attention_mask.dim() == 4 else attention_mask
    cols = torch.arange(ctx.end, device=attention_mask.device)
    lens = ctx.seq_lens.to(attention_mask.device)[:, None]
    own = cols < lens
    if window:
        own &= cols >= lens - window
    return own[:, None, None]


def register_attention() -> str:
    """Register ``kvq`` with transformers (idempotent) and return its name for ``attn_implementation``."""
    AttentionInterface.register(ATTN_IMPLEMENTATION, kvq_attention)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)
    return ATTN_IMPLEMENTATION
