"""Attention variants a config asks for, and what KVQ Studio does about each: honoured, capped or refused.

A sliding window of ``W`` tokens equals full causal attention while a sequence holds at most ``W`` tokens (a query
at position ``p`` attends ``p - W + 1 .. p``), so a model with a window shorter than its context is served with
its context capped at the window: within it the cache's full attention is exact. Softcapped attention logits
(Gemma 2) change every score, so a config that sets them is refused at load.
"""

from __future__ import annotations

from typing import Any

from ..errors import ContextTooLong, ModelLoadError

# Families whose transformers attention applies ``config.sliding_window`` to every layer, whatever ``layer_types``
# says (Qwen2/Qwen3/Qwen2-MoE read ``layer_types`` and slide only the layers it marks "sliding_attention").
_ONE_WINDOW = ("mistral", "qwen3_moe")

# Causal families the loader refuses for their attention, with why (shown in the one-line refusal).
REFUSED_ATTENTION = {
    "gemma2": "softcapped attention logits",
    "gemma3": "sliding-window layers between global ones, with its own masks",
    "gemma3_text": "sliding-window layers between global ones, with its own masks",
    "gpt_oss": "learned attention sinks",
}


def _text_config(config: Any) -> Any:
    return getattr(config, "text_config", None) or config


def attention_window(config: Any) -> int | None:
    """The sliding window (tokens) of the config's sliding layers; None when no layer slides.

    Mistral: ``sliding_window`` when set. Qwen2/Qwen3: only with ``use_sliding_window`` true, and only if
    ``layer_types`` (built from ``max_window_layers``) marks a layer "sliding_attention". Any other config with a
    ``sliding_window`` and no ``layer_types`` to say otherwise counts as sliding (the safe side: its context is
    capped, never attended wrongly).
    """
    config = _text_config(config)
    window = getattr(config, "sliding_window", None)
    if not isinstance(window, int) or window <= 0 or getattr(config, "use_sliding_window", True) is False:
        return None
    types = getattr(config, "layer_types", None)
    if types is not None and "sliding_attention" not in types and getattr(config, "model_type", None) not in _ONE_WINDOW:
        return None
    return window


def _capping_window(config: Any) -> int | None:
    """The window when it is shorter than the model's positions (then it caps the context), else None."""
    window, positions = attention_window(config), getattr(_text_config(config), "max_position_embeddings", None)
    if window is None or (isinstance(positions, int) and positions <= window):
        return None
    return window


def context_limit(config: Any) -> int | None:
    """The most tokens a sequence may hold: the model's positions, capped at its sliding window (None: no limit known)."""
    window = _capping_window(config)
    if window is not None:
        return window
    positions = getattr(_text_config(config), "max_position_embeddings", None)
    return positions if isinstance(positions, int) else None


def window_note(config: Any, name: str) -> str | None:
    """The one-line note shown at load when a sliding window caps the context; None when none does."""
    window = _capping_window(config)
    if window is None:
        return None
    return f"{name}'s sliding window is {window} tokens; KVQ Studio attends full windows only: at most {window} tokens"


def check_window(config: Any, tokens: int, what: str, name: str = "the model") -> None:
    """Refuse, in one line naming the window, ``tokens`` (``what``: the flag or thing, e.g. ``--seqlen``) beyond a
    capping window."""
    window = _capping_window(config)
    if window is not None and tokens > window:
        raise ContextTooLong(f"{what} {tokens} is too long: {window_note(config, name)}")


def check_attention(config: Any, name: str) -> None:
    """Refuse a config of a supported family whose attention the cache cannot honour (softcapped logits)."""
    cap = getattr(_text_config(config), "attn_logit_softcapping", None)
    if cap:
        raise ModelLoadError(
            f"{name} softcaps its attention logits (attn_logit_softcapping {cap}), which the kvq cache's attention "
            "does not: use a model without it"
        )


def rope_inv_freq(model: Any) -> Any:
    """The RoPE frequencies (radians per position, ``[head_dim / 2]``) the model turns keys and queries by, or None.

    Read from transformers' rotary embedding buffer, so scaled RoPE (Llama 3, linear, dynamic at its base
    length) comes as the model applies it; the calibration keeps them so the key transform can be fitted to
    the positions of a long context (:func:`kvcache.transforms.rope_averaged`).
    """
    for name, buf in model.named_buffers():
        if name.endswith("rotary_emb.inv_freq"):
            return buf.detach().double().cpu()
    return None
