"""Every serving engine's KV-cache schemes, reproduced: one module per engine, each a table of modes named
``ENGINE:FLAG`` built from the codec's pieces, and the encoder rules (that engine's arithmetic) they need.

Each scheme names the engine's source it reproduces (``KVMode.source``) and counts bytes as the engine
stores them; ``RULES`` maps a rule name to its encoder (:data:`kvcache.encoding.Rule`).
"""

from __future__ import annotations

from ..codec import KVMode

ENGINES = ("vllm", "sglang", "lmdeploy", "llamacpp", "hf")
RULES: dict = {}
ENGINE_MODES: dict[str, KVMode] = {}
