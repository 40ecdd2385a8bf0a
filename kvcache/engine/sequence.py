"""One request of the scheduler: its tokens, where its K/V live in the shared pool, and when it stops."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

Sampler = Callable[[torch.Tensor], int]  # next token from one row of fp32 logits ([vocab])


def num_blocks(num_tokens: int, block_size: int) -> int:
    """Blocks that hold ``num_tokens`` tokens."""
    return -(-num_tokens // block_size)


@dataclass(eq=False)
class Sequence:
    id: int
    token_ids: list[int]  # prompt, then the generated tokens
    max_new_tokens: int
    eos_ids: frozenset[int] = frozenset()
    block_table: list[int] = field(default_factory=list)  # block ids in the shared pool, in order
    num_cached: int = 0  # tokens whose K/V are stored
    finished: bool = False
    sampler: Sampler | None = None  # None: greedy
    keep_blocks: bool = False  # at the end its blocks stay with their owner (a chat session's next turn)
    error: str | None = None  # why it was refused (the pool cannot hold it)
    cut_short: str | None = None  # why max_new_tokens was lowered (the whole pool holds no more)
    prefill_s: float = 0.0  # compute seconds of its prefill
    decode_s: float = 0.0  # compute seconds of the decode steps it was in (a batched step counts fully)
    preemptions: int = 0  # times its blocks were taken back (it prefilled its tokens so far again)
    num_shared: int = 0  # first tokens found stored in blocks other sequences share (prefix caching): not prefilled
    num_registered: int = 0  # its full blocks offered to the pool's prefix cache so far
    num_prompt_tokens: int = field(init=False)

    def __post_init__(self) -> None:
        self.num_prompt_tokens = len(self.token_ids)

    @property
    def generated_ids(self) -> list[int]:
        """Tokens generated so far (an EOS that ended the sequence included)."""
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_pending(self) -> int:
        """Tokens not stored yet: 1 while it decodes (the last token), more while its prompt is prefilled."""
        return len(self.token_ids) - self.num_cached

    @property
    def max_tokens_cached(self) -> int:
        """Tokens it may store: the prompt and every generated token but the last (never fed back)."""
        return self.num_prompt_tokens + self.max_new_tokens - 1
