"""One forward's step context: where its new tokens go and what each row attends to.

Whoever schedules a step builds it once (the engine's scheduler for a batch of sequences, or the cache
itself inside ``model.generate()``); every layer's cache update and attention read it. Rows keep their
own lengths: row ``r``'s new tokens sit at positions ``starts[r] .. starts[r] + num_new - 1``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch

from .layout import slot_mapping


class Phase(enum.Enum):
    PREFILL = "prefill"  # a chunk of new tokens per row (a prompt, or a new turn over the cached history)
    DECODE = "decode"  # one new token per row, each row over its own length


@dataclass
class StepContext:
    phase: Phase
    num_new: int  # tokens fed per row
    positions: torch.Tensor  # [batch, num_new] int64: each new token's position in its row
    slots: torch.Tensor  # [batch * num_new] int64: where each new token's K/V are stored, row by row
    block_tables: torch.Tensor  # [batch, max_blocks] int32, rows padded with block 0 (never read past a row's length)
    seq_lens: torch.Tensor  # [batch] int32: tokens each row holds after this step
    start: int  # the shortest row's length before this step
    end: int  # the longest row's length after this step

    @property
    def batch(self) -> int:
        return self.block_tables.shape[0]

    @classmethod
    def build(cls, tables: list[list[int]], starts: list[int], num_new: int, block_size: int,
              device: torch.device | str) -> "StepContext":
        """The context of feeding ``num_new`` tokens to rows whose block tables already cover them."""
        width = max(len(t) for t in tables)
        block_tables = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32, device=device)
        positions = torch.tensor(starts, device=device)[:, None] + torch.arange(num_new, device=device)
        return cls(
            phase=Phase.DECODE if num_new == 1 else Phase.PREFILL, num_new=num_new, positions=positions,
            slots=slot_mapping(block_tables, positions, block_size).reshape(-1), block_tables=block_tables,
            seq_lens=(positions[:, -1] + 1).to(torch.int32), start=min(starts), end=max(starts) + num_new,
        )
