"""The ``kvq`` attention implementation, registered with transformers.

When K/V come from a :class:`~kvcache.hf.cache.PagedKVCache` (a :class:`PagedView`), attention reads
the stored blocks: a decode step goes through ``kernels.decode_attention`` and a prefill chunk
through ``kernels.prefill_attention`` (Triton on a GPU, reading int8 directly; on a CPU the
references, which dequantize the history and call SDPA). Plain tensors (no cache, or another
cache) go straight to transformers' SDPA. A sliding layer's window (transformers' ``sliding_window``
argument) is applied here, per row, not left to the mask transformers may or may not pass.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from ..errors import ConfigError
from ..kernels import decode_attention, prefill_attention
from ..storage.context import Phase, StepContext
from ..storage.maps import map_query, unmap_output
from .cache import PagedView

ATTN_IMPLEMENTATION = "kvq"
QUERY_OBSERVER = "kvq_query_observer"  # the attention module's attribute that, while set, sees its queries


@contextlib.contextmanager
def observing_queries(attention: torch.nn.Module, observer: Callable[[torch.Tensor], None]) -> Iterator[None]:
    """While active, ``observer(query)`` sees every post-RoPE query ``kvq`` attention gets in the ``attention``
    module (calibration). The observer is that module's own state, not the process's: two models (or two layers)
    observed at once never feed each other's statistics."""
    if getattr(attention, QUERY_OBSERVER, None) is not None:
        raise RuntimeError(f"{type(attention).__name__} already has a query observer")
    setattr(attention, QUERY_OBSERVER, observer)
    try:
        yield
    finally:
        delattr(attention, QUERY_OBSERVER)


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
        observer = getattr(module, QUERY_OBSERVER, None)
        if observer is not None:
            observer(query)
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    ctx, storage = key.context, key.storage
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    query = map_query(storage, query)  # rotated / transformed keys are read by the matching queries
    window = kwargs.get("sliding_window") or None  # this layer's window (Mistral's, Qwen2's sliding layers)
    if storage.residual:  # an emulated transformers residual window: attended in segments, re-quantized between
        from .residual import residual_attention

        if ctx.phase is Phase.PREFILL and ctx.start + ctx.num_new != ctx.end:
            raise RuntimeError("a prefill step's rows must all be equally long (the scheduler prefills one row at a time)")
        if window and ctx.end > window:
            raise ConfigError(f"the hf: residual schemes attend full windows only: this model's sliding window is "
                              f"{window} tokens, so use at most {window} tokens or another KV mode")
        return unmap_output(storage, residual_attention(query, storage, ctx, scale, attention_mask)), None
    if ctx.phase is Phase.PREFILL and ctx.start + ctx.num_new != ctx.end:
        raise RuntimeError("a prefill step's rows must all be equally long (the scheduler prefills one row at a time)")
    mask = _step_mask(attention_mask, ctx, window, query.device)
    if ctx.phase is Phase.DECODE and mask is None:
        out = decode_attention(query[:, :, 0], storage, ctx.block_tables, ctx.seq_lens, scale)
        return unmap_output(storage, out[:, None]), None
    out = prefill_attention(query, storage, ctx.block_tables, ctx.end, scale, mask)
    return unmap_output(storage, out), None


def _step_mask(attention_mask: torch.Tensor | None, ctx: StepContext, window: int | None,
               device: torch.device) -> torch.Tensor | None:
    """What this step's queries attend: None when it is each row's own causal history (the kernels' default).

    transformers builds its mask at the longest row's positions, and only when it cannot skip it. Rows of equal
    length keep it (it may carry padding). Otherwise each row attends its own positions, within ``window`` when
    the layer slides, whether or not transformers passed a mask (the scheduler's rows never carry padding).
    """
    if ctx.start + ctx.num_new == ctx.end and attention_mask is not None:
        return attention_mask[..., : ctx.end] if attention_mask.dim() == 4 else attention_mask  # as SDPA trims it
    if not window or ctx.end <= window:
        return None
    pos = ctx.positions.to(device)[:, :, None]  # [batch, q_len, 1]
    cols = torch.arange(ctx.end, device=device)
    return ((cols <= pos) & (cols > pos - window))[:, None]  # [batch, 1, q_len, kv_len]


def register_attention() -> str:
    """Register ``kvq`` with transformers (idempotent) and return its name for ``attn_implementation``."""
    AttentionInterface.register(ATTN_IMPLEMENTATION, kvq_attention)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)
    return ATTN_IMPLEMENTATION
