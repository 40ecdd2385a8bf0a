"""Defaults and places, written once: every room (CLI, app, engine, measurements) reads them from here."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from .errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
ASSETS = ROOT / "assets"
SYSTEM_PROMPT_FILE = ASSETS / "prompts" / "politics_tutor_zh.txt"  # the seed recipe's politics-exam tutor
EXAMPLES_FILE = ASSETS / "prompts" / "examples.json"
EVAL_DIR = ASSETS / "eval"



def cache_root() -> Path:
    """Where converted models and the log live: ``$KVQ_CACHE_DIR`` or ``~/.cache/kvq-studio``."""
    return Path(os.environ.get("KVQ_CACHE_DIR") or Path.home() / ".cache" / "kvq-studio")


# ``--dtype``: what a model computes in (weights, activations, so its K/V); unset, the loader's default.
DTYPES = ("float32", "bfloat16", "float16")
DTYPE_HELP = ("the dtype the model computes in (default: float32 on the CPU; on a GPU bfloat16 for a bf16 "
              "checkpoint where the GPU has it, else float16); the KV cache's 16-bit floats are bf16 for bfloat16, "
              "else fp16")
BASELINE_MODE = "fp16"  # what every quantized mode is compared with (the left pane, the evaluation's reference)
BLOCK_SIZE = 64  # tokens per block of the paged cache
PREFILL_CHUNK = 512  # prompt tokens the engine prefills per step: a long prompt stalls other sessions one chunk at a time
MAX_NUM_SEQS = 128  # sequences a scheduler runs at once (vLLM's max_num_seqs, LMDeploy's max_batch_size): one sink slot each
CHUNK_TOKENS = 1024  # tokens per prefill forward of a measurement: long windows fit a small machine chunk by chunk


@dataclass(frozen=True)
class EngineConfig:
    """How the engine lays out its KV pools.

    ``cache_max_entry_count``: a fraction in (0, 1] preallocates that share of the memory free after the
    weights load (LMDeploy's meaning since 0.2.2), split evenly between the ``pools_sharing`` pools (the app's
    fp16 and quantized panes: 2); ``cache_blocks`` N (``--cache-blocks N``) gives each pool the memory of N
    fp16 blocks; neither grows each pool on demand. ``max_num_seqs``: sequences each pool's scheduler runs at
    once (a fixed pool holds a sink slot for each, or one per block if it has fewer). ``prefill_chunk``: prompt tokens prefilled per step between decode
    steps (None: every prompt whole, stalling the other sessions for its length).
    """

    block_size: int = BLOCK_SIZE
    cache_max_entry_count: float | None = None
    cache_blocks: int | None = None
    pools_sharing: int = 1
    max_num_seqs: int = MAX_NUM_SEQS
    prefill_chunk: int | None = PREFILL_CHUNK

    def __post_init__(self) -> None:
        if self.block_size < 1:
            raise ConfigError(f"block_size must be at least 1, got {self.block_size}")
        if self.max_num_seqs < 1:
            raise ConfigError(f"max_num_seqs must be at least 1 sequence, got {self.max_num_seqs}")
        if self.pools_sharing < 1:
            raise ConfigError(f"pools_sharing must be at least 1, got {self.pools_sharing}")
        if self.prefill_chunk is not None and self.prefill_chunk < 1:
            raise ConfigError(f"prefill_chunk must be at least 1 token (or None for whole prompts), got {self.prefill_chunk}")
        check_pool_size(self.cache_max_entry_count, self.cache_blocks)

    @property
    def pool_size(self) -> PoolSize:
        return PoolSize(self.cache_max_entry_count, self.cache_blocks)


class PoolSize(NamedTuple):
    """A fixed pool's size, one of two settings (neither: the pool grows on demand); ``EngineConfig(**size._asdict())``."""

    cache_max_entry_count: float | None = None  # a fraction in (0, 1] of the memory free after the weights load
    cache_blocks: int | None = None  # the memory of N fp16 blocks


def check_pool_size(cache_max_entry_count: float | None, cache_blocks: int | None) -> None:
    """One setting at most, each in its range (a whole number of blocks is ``cache_blocks``, not a count > 1)."""
    if cache_max_entry_count is not None and cache_blocks is not None:
        raise ConfigError("give cache_max_entry_count (a fraction of free memory) or cache_blocks (a number of blocks), not both")
    if cache_max_entry_count is not None and not 0 < cache_max_entry_count <= 1:
        raise ConfigError(f"cache_max_entry_count {cache_max_entry_count} is not a fraction in (0, 1] of the free memory; "
                          "for a number of blocks set cache_blocks")
    if cache_blocks is not None and (isinstance(cache_blocks, bool) or not isinstance(cache_blocks, int) or cache_blocks < 1):
        raise ConfigError(f"cache_blocks must be a whole number of blocks, at least 1, got {cache_blocks!r}")


def parse_pool_size(cache_max_entry_count: str | float | None, cache_blocks: str | int | None) -> PoolSize:
    """``--cache-max-entry-count F`` and ``--cache-blocks N`` as one pool size (both unset: grow on demand)."""
    size = PoolSize(parse_cache_max_entry_count(cache_max_entry_count), parse_cache_blocks(cache_blocks))
    check_pool_size(*size)
    return size


def parse_cache_max_entry_count(text: str | float | int | None) -> float | None:
    """LMDeploy's ``--cache-max-entry-count``: ``"0.5"`` -> 0.5 of the free memory, ``"1"`` -> all of it,
    ``""``/None/0 -> None (grow on demand). A number of blocks is its own setting (:func:`parse_cache_blocks`)."""
    if text is None or (isinstance(text, str) and not text.strip()):
        return None
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise ConfigError(f"cache_max_entry_count must be a fraction in (0, 1], got {text!r}") from None
    if value == 0:
        return None
    if not 0 < value <= 1:
        hint = f": for a number of blocks pass --cache-blocks {int(value)}" if value > 1 and value.is_integer() else ""
        raise ConfigError(f"cache_max_entry_count {text} is not a fraction in (0, 1] of the free memory{hint}")
    return value


def parse_cache_blocks(text: str | int | None) -> int | None:
    """``--cache-blocks N``: each pool gets the memory of N fp16 blocks (None: not given)."""
    if text is None or (isinstance(text, str) and not text.strip()):
        return None
    try:
        value = int(str(text).strip())
    except ValueError:
        raise ConfigError(f"--cache-blocks takes a whole number of blocks, got {text!r}") from None
    if value < 1:
        raise ConfigError(f"--cache-blocks must be at least 1 block, got {value}")
    return value


def parse_pool_setting(text: str | float | None) -> PoolSize:
    """The app's pool box: ``"400 blocks"`` -> 400 blocks, else a fraction as :func:`parse_cache_max_entry_count`."""
    raw = str(text if text is not None else "").strip()
    if raw.endswith("blocks"):
        return parse_pool_size(None, raw.removesuffix("blocks"))
    return parse_pool_size(raw, None)
