"""Differences between the transformers versions we support (5.17 on the GPU machine, newer here)."""

from __future__ import annotations

import inspect

from transformers.models.llama.modeling_llama import LlamaModel

# transformers 5.2x renamed ``past_key_values`` to ``cache`` in forward() and generate().
CACHE_KWARG = "cache" if "cache" in inspect.signature(LlamaModel.forward).parameters else "past_key_values"


def cache_kwargs(cache: object) -> dict[str, object]:
    """``{name: cache}`` under the keyword this transformers version expects."""
    return {CACHE_KWARG: cache}


def output_cache(outputs: object) -> object:
    """The cache a model forward returned, whatever the attribute is called."""
    return getattr(outputs, CACHE_KWARG, None)
