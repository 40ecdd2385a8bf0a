"""One forward of token ids through a model and a :class:`PagedKVCache` (teacher-forced scoring, tests)."""

from __future__ import annotations

import torch

from .cache import PagedKVCache
from .compat import cache_kwargs


@torch.inference_mode()
def forward_tokens(model: torch.nn.Module, cache: PagedKVCache, ids: torch.Tensor, last_only: bool = True) -> torch.Tensor:
    """Run ``ids`` (``[batch, n]``) through the model, storing their K/V in ``cache``; return logits (fp32)."""
    out = model(input_ids=ids, use_cache=True, logits_to_keep=1 if last_only else 0, **cache_kwargs(cache))
    return out.logits.float()
