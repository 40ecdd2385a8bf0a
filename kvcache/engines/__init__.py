"""Every serving engine's KV-cache schemes, reproduced: one module per engine, each a table of modes named
``ENGINE:FLAG`` built from the codec's pieces, and the encoder rules (that engine's arithmetic) they need.

Each scheme names the engine's source it reproduces (``KVMode.source``), counts bytes as the engine stores them,
and has a test on values worked out by hand from that definition (tests/test_engines.py).
"""

from __future__ import annotations

from collections.abc import Iterable

from ..codec import OUR_ENGINE, KVMode
from . import hf, llamacpp, lmdeploy, sglang, vllm

ENGINES = ("vllm", "sglang", "lmdeploy", "llamacpp", "hf")
_MODULES = (vllm, sglang, lmdeploy, llamacpp, hf)
RULES: dict = {name: rule for m in _MODULES for name, rule in m.RULES.items()}
ENGINE_MODES: dict[str, KVMode] = {mode.name: mode for m in _MODULES for mode in m.MODES}
ALIASES: dict[str, str] = {**lmdeploy.ALIASES}  # old names of engine schemes


def engine_order(named: Iterable[str] = ()) -> list[str]:
    """The order every listing groups modes by engine: ours first, then :data:`ENGINES`, then any other in ``named``."""
    return list(dict.fromkeys([OUR_ENGINE, *ENGINES, *named]))
