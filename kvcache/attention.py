"""The ``kvq`` attention implementation, registered with transformers.

When K/V come from a :class:`~kvcache.cache.PagedKVCache` (a :class:`PagedView`), attention reads
the stored blocks: a decode step goes through ``kernels.decode_attention`` (Triton on GPU,
reading int8 directly); a prefill chunk dequantizes the history into a scratch buffer and calls
SDPA. Plain tensors (no cache, or another cache) go straight to transformers' SDPA.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from .cache import PagedView
from .kernels import decode_attention, gather_kv

ATTN_IMPLEMENTATION = "kvq"


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
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    view = key
    b, hq, q_len, d = query.shape
    scale = scaling if scaling is not None else d**-0.5
    storage, cache = view.storage, view.cache
    if q_len == 1 and attention_mask is None:
        out = decode_attention(query[:, :, 0], storage, cache.block_table_tensor(), view.seq_lens(b, query.device), scale)
        return out[:, None], None
    k, v = gather_kv(storage, cache.block_table_tensor(), view.end, query.dtype)
    return sdpa_attention_forward(module, query, k, v, attention_mask, dropout=dropout, scaling=scale, **kwargs)


def register_attention() -> str:
    """Register ``kvq`` with transformers (idempotent) and return its name for ``attn_implementation``."""
    AttentionInterface.register(ATTN_IMPLEMENTATION, kvq_attention)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)
    return ATTN_IMPLEMENTATION
