"""Prefix caching: sequences that start with the same tokens share the full blocks that store them.

As in vLLM and nano-vllm, a FULL block of a prompt is registered under its tokens and its parent's (the
block before it in the sequence), so a key names every token up to the block's end; a new sequence that
starts with those tokens takes the same block ids (the pool counts references) and prefills only what
follows. nano-vllm keys a block by a hash chained from its parent's hash and checks the tokens on a hit;
here the key is ``(parent block id, the block's tokens)``, which a dict compares exactly: no collision can
hand out another prefix's K/V. A parent id stays unique while it is registered, because a registered
block is forgotten the moment its last reference goes (a sequence holding a child holds its parent).

Why that is safe: a stored token's K/V depend only on the tokens up to it and on the pool (one mode, one
set of parameters, its own blocks), and a full block is never written again: new tokens go to new blocks,
and a truncation that would cut into a shared block gives the block back instead (:meth:`BlockPool.truncate`).
The first block's sink slot (its first tokens in fp16) belongs to the block, so it is shared with it.
Modes that rewrite old tokens (transformers' residual window re-quantizes them in place) opt out through
``KVMode.shares_prefix``.

Eviction is the simplest correct one: a block whose last reference goes is unregistered and freed, so a
prefix stays cached while any sequence (an open chat session) holds it, not after.
"""

from __future__ import annotations

from collections.abc import Sequence

ROOT = -1  # the parent of a sequence's first block


class PrefixCache:
    """Which live full block stores which prefix, for one pool."""

    def __init__(self, block_size: int):
        self.block_size = block_size
        self._block_of: dict[tuple[int, tuple[int, ...]], int] = {}
        self._key_of: dict[int, tuple[int, tuple[int, ...]]] = {}

    def __len__(self) -> int:
        return len(self._block_of)

    def _tokens(self, token_ids: Sequence[int], i: int) -> tuple[int, ...]:
        return tuple(token_ids[i * self.block_size:(i + 1) * self.block_size])

    def match(self, token_ids: Sequence[int], max_blocks: int) -> list[int]:
        """The registered blocks that store the longest prefix of ``token_ids``, at most ``max_blocks``."""
        blocks: list[int] = []
        parent = ROOT
        for i in range(min(max_blocks, len(token_ids) // self.block_size)):
            block = self._block_of.get((parent, self._tokens(token_ids, i)))
            if block is None:
                break
            blocks.append(block)
            parent = block
        return blocks

    def register(self, table: list[int], token_ids: Sequence[int], start: int, num_tokens: int) -> int:
        """Register the full blocks of ``table`` from block ``start`` that the first ``num_tokens`` of ``token_ids``
        fill; the blocks checked so far (pass it as ``start`` next time). A chain stops at a block whose tokens
        another block already stores: its followers could never be matched."""
        end = min(num_tokens // self.block_size, len(table))
        for i in range(start, end):
            key = (table[i - 1] if i else ROOT, self._tokens(token_ids, i))
            held = self._block_of.setdefault(key, table[i])
            if held != table[i]:
                return end
            self._key_of[table[i]] = key
        return max(start, end)

    def forget(self, block: int) -> None:
        """``block`` is freed or about to be rewritten: it stores no prefix any more."""
        key = self._key_of.pop(block, None)
        if key is not None:
            del self._block_of[key]
