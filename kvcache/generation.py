"""The decode loop's pieces, shared by the chat engine and the evaluation: feed tokens, pick the next one."""

from __future__ import annotations

import torch

from .cache import PagedKVCache
from .compat import cache_kwargs


@torch.inference_mode()
def forward_tokens(model: torch.nn.Module, cache: PagedKVCache, ids: torch.Tensor, last_only: bool = True) -> torch.Tensor:
    """Run ``ids`` (``[batch, n]``) through the model, storing their K/V in ``cache``; return logits (fp32)."""
    out = model(input_ids=ids, use_cache=True, logits_to_keep=1 if last_only else 0, **cache_kwargs(cache))
    return out.logits.float()


def next_token(
    logits: torch.Tensor, temperature: float = 0.0, top_p: float = 1.0, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Next token per row from ``[batch, vocab]`` logits: greedy at temperature 0, else nucleus sampling."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        outside = sorted_p.cumsum(dim=-1) - sorted_p > top_p  # keep the smallest prefix reaching top_p
        sorted_p = sorted_p.masked_fill(outside, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.inference_mode()
def greedy_generate(model: torch.nn.Module, cache: PagedKVCache, ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """``new_tokens`` greedy tokens per row (``[batch, new_tokens]``), every step read back through ``cache``."""
    logits = forward_tokens(model, cache, ids)[:, -1]
    out = []
    for _ in range(new_tokens):
        tok = next_token(logits)
        out.append(tok)
        logits = forward_tokens(model, cache, tok[:, None])[:, -1]
    return torch.stack(out, dim=1)
