"""The shape of a model's KV cache, read from its config, and a fingerprint to match files to models."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class KVShape:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    num_heads: int

    @classmethod
    def from_config(cls, config: Any) -> "KVShape":
        """Read from a transformers config; ``head_dim`` falls back to hidden_size / heads."""
        config = getattr(config, "text_config", None) or config
        num_heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // num_heads
        num_kv_heads = getattr(config, "num_key_value_heads", None) or num_heads
        return cls(config.num_hidden_layers, num_kv_heads, head_dim, num_heads)

    def float_bytes_per_token(self, itemsize: int = 2) -> int:
        """Bytes of one token's K and V, all layers and KV heads, unquantized in ``itemsize``-byte floats."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * itemsize

    def __str__(self) -> str:
        return f"{self.num_layers} layers x {self.num_kv_heads} KV heads x head_dim {self.head_dim}"


def config_hash(config: Any) -> str:
    """Short hash of the config fields that decide K/V values and shapes (not paths or dtypes)."""
    d = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    keys = (
        "model_type", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
        "hidden_size", "intermediate_size", "vocab_size", "rope_theta", "rope_scaling", "rope_parameters",
        "max_position_embeddings",
    )
    picked = {k: d.get(k) for k in keys}
    blob = json.dumps(picked, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
