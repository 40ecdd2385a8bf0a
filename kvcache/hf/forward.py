"""Forwards of token ids through a model and a :class:`PagedKVCache` (teacher-forced scoring, retrieval, tests).

Long inputs go through in chunks (:func:`prefill_chunks`): each chunk's K/V are stored, then its queries
attend the stored history plus the chunk itself, so peak activation memory is one chunk's whatever the
length, and only the logits a caller asks for are computed (the lm head over a 49K vocabulary is a tenth
of a small model's FLOPs).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from .cache import PagedKVCache
from .compat import cache_kwargs


@torch.inference_mode()
def forward_tokens(model: torch.nn.Module, cache: PagedKVCache, ids: torch.Tensor, last_only: bool = True) -> torch.Tensor:
    """Run ``ids`` (``[batch, n]``) through the model, storing their K/V in ``cache``; return logits (fp32)."""
    out = model(input_ids=ids, use_cache=True, logits_to_keep=1 if last_only else 0, **cache_kwargs(cache))
    return out.logits.float()


@torch.inference_mode()
def forward_hidden(model: torch.nn.Module, cache: PagedKVCache, ids: torch.Tensor) -> torch.Tensor:
    """Run ``ids`` (``[batch, n]``) through the decoder, storing their K/V in ``cache``; the final hidden states.

    :func:`output_logits` turns any of them into logits, so callers pay the lm head only where they score.
    """
    return model.get_decoder()(input_ids=ids, use_cache=True, **cache_kwargs(cache)).last_hidden_state


@torch.inference_mode()
def output_logits(model: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """Logits (fp32) of final hidden states, as the causal-LM head computes them."""
    return model.get_output_embeddings()(hidden).float()


def prefill_chunks(model: torch.nn.Module, cache: PagedKVCache, ids: torch.Tensor,
                   chunk_tokens: int) -> Iterator[tuple[int, torch.Tensor]]:
    """Feed ``ids`` (``[batch, n]``) in chunks of ``chunk_tokens``; yields ``(start, hidden states of the chunk)``."""
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be at least 1, got {chunk_tokens}")
    for start in range(0, ids.shape[1], chunk_tokens):
        yield start, forward_hidden(model, cache, ids[:, start:start + chunk_tokens])


@torch.inference_mode()
def last_logits(model: torch.nn.Module, cache: PagedKVCache, ids: torch.Tensor, chunk_tokens: int) -> torch.Tensor:
    """Feed ``ids`` in chunks and return the logits of the last position only (``[batch, vocab]``)."""
    hidden = None
    for _, hidden in prefill_chunks(model, cache, ids, chunk_tokens):
        pass
    if hidden is None:
        raise ValueError("no tokens to feed")
    return output_logits(model, hidden[:, -1])
