"""Continuous batching: several sequences decoded together over one shared, fixed-size :class:`BlockPool`.

Sequences join and leave between steps. A step prefills each newly admitted sequence on its own,
then runs ONE decode forward for all the others. Every row keeps its own length: the step's
:class:`~kvcache.storage.context.StepContext` gives each row's new tokens its own slots and each row's
attention its own length, so each sequence gets the tokens it would get alone (greedy). The one
:class:`~kvcache.hf.cache.PagedKVCache` of the scheduler only carries that context into the model.

Admission: a request starts only when the pool can hold it to its end (prompt + max_new_tokens),
counting what the running sequences may still need. So a running sequence never runs out of
blocks and nobody is preempted; blocks are still allocated as tokens arrive, so
``pool.num_used`` is what is really stored. Others may hold blocks of the pool (a chat session
keeps its conversation's blocks between turns and hands them in with its next request, so only
the new tokens are prefilled); a request that cannot fit while none of the scheduler's own runs
is refused with ``Sequence.error`` rather than left waiting forever.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from collections.abc import Iterable
from typing import Any

import torch

from ..errors import KVCacheFull
from ..hf.cache import PagedKVCache
from ..hf.compat import cache_kwargs
from ..storage.block_pool import BlockPool
from ..storage.context import StepContext
from .sampling import next_token
from .sequence import Sampler, Sequence, num_blocks


class BatchScheduler:
    """Greedy continuous batching of many requests over one pool: ``add()`` them, then ``step()``."""

    def __init__(self, model: Any, pool: BlockPool, *, eos_ids: Iterable[int] = ()):
        self.model, self.pool = model, pool
        self.eos_ids = frozenset(eos_ids)
        self.cache = PagedKVCache(pool)  # carries each step's context into the model; holds no blocks itself
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.sequences: dict[int, Sequence] = {}  # every sequence added, by id
        self._ids = itertools.count()

    def add(
        self,
        prompt_ids: list[int],
        max_new_tokens: int,
        *,
        block_table: list[int] | None = None,
        num_cached: int = 0,
        sampler: Sampler | None = None,
        cut_to_pool: bool = False,
    ) -> int:
        """Queue a request; it starts at the next ``step()`` the pool can hold it. Returns its id.

        ``block_table`` / ``num_cached``: the first ``num_cached`` prompt tokens are already stored in
        these blocks (the caller's list, extended in place and left to the caller at the end).
        A request a fixed pool can never hold to its end raises :class:`KVCacheFull`; with ``cut_to_pool``
        (a chat reply) one whose prompt fits generates as far as the whole pool holds instead, and
        ``Sequence.cut_short`` says so.
        """
        if len(prompt_ids) == 0 or max_new_tokens < 1:
            raise ValueError(f"need a non-empty prompt and max_new_tokens >= 1, got {len(prompt_ids)} tokens and {max_new_tokens}")
        pool, bs = self.pool, self.pool.block_size
        if not 0 <= num_cached < len(prompt_ids) or len(block_table or []) < num_blocks(num_cached, bs):
            raise ValueError(f"{num_cached} cached tokens need {num_blocks(num_cached, bs)} blocks and at least one "
                             f"new token of the {len(prompt_ids)}-token prompt")
        seq = Sequence(next(self._ids), list(prompt_ids), max_new_tokens, self.eos_ids, num_cached=num_cached,
                       sampler=sampler, keep_blocks=block_table is not None)
        if block_table is not None:
            seq.block_table = block_table
        capacity = pool.num_blocks * bs
        if not pool.growable and seq.max_tokens_cached > capacity:
            if not cut_to_pool or seq.num_prompt_tokens > capacity:
                raise KVCacheFull(
                    f"KV cache full: this request needs {seq.max_tokens_cached} tokens ({seq.num_prompt_tokens} prompt + "
                    f"{max_new_tokens - 1} generated) of {capacity} ({pool.num_blocks} blocks of {bs}); "
                    "shorten the prompt, lower max_new_tokens or raise cache_max_entry_count"
                )
            seq.max_new_tokens = capacity - seq.num_prompt_tokens + 1
            seq.cut_short = (f"KV cache full: {capacity} tokens in use of {capacity} ({pool.num_blocks} blocks of {bs}): "
                             "the reply ends where the pool does; end a session or raise cache_max_entry_count")
        self.sequences[seq.id] = seq
        self.waiting.append(seq)
        return seq.id

    def step(self) -> dict[int, int]:
        """Prefill the newly admitted sequences, then decode all the others in one forward: ``{seq id: new token}``."""
        decoding = list(self.running)
        new = {}
        t0 = time.perf_counter()
        for seq in self._admit():
            new[seq.id] = self._append(seq, self._forward([seq], [seq.token_ids[seq.num_cached:]])[0])
            seq.prefill_s, t0 = time.perf_counter() - t0, time.perf_counter()
        if decoding:
            tokens = self._forward(decoding, [[s.token_ids[-1]] for s in decoding])
            spent = time.perf_counter() - t0
            for s, t in zip(decoding, tokens):
                s.decode_s += spent
                new[s.id] = self._append(s, t)
        return new

    def run_until_done(self) -> dict[int, list[int]]:
        """Step until every request has finished; the generated tokens of every sequence, by id."""
        while self.waiting or self.running:
            self.step()
        return {i: s.generated_ids for i, s in self.sequences.items()}

    def finish(self, seq_id: int) -> Sequence:
        """End a sequence (done, or stopped by the caller) and give its blocks back to the pool."""
        seq = self.sequences[seq_id]
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        if not seq.keep_blocks:
            self.pool.free(seq.block_table)
            seq.block_table = []
        seq.finished = True
        return seq

    # --- internals -------------------------------------------------------------------------
    def _admit(self) -> list[Sequence]:
        """Start waiting requests, in order, while the pool can hold each to its end."""
        admitted = []
        while self.waiting and self._fits(self.waiting[0]):
            admitted.append(self.waiting.popleft())
            self.running.append(admitted[-1])
        if self.waiting and not self.running:  # nothing of ours will free blocks: others hold them
            pool, seq = self.pool, self.waiting[0]
            seq.error = (
                f"KV cache full: {pool.num_used * pool.block_size} tokens in use of {pool.num_blocks * pool.block_size}, "
                f"held by other conversations; this request needs {seq.max_tokens_cached}"
            )
            self.finish(seq.id)
        return admitted

    def _fits(self, seq: Sequence) -> bool:
        if self.pool.growable:
            return True
        promised = sum(self._blocks_to_come(s) for s in self.running)
        new_sinks = sum(1 for s in (*self.running, seq) if not s.block_table)  # a new sequence takes a sink slot
        return self._blocks_to_come(seq) <= self.pool.num_free - promised and self.pool.sinks.can_take(new_sinks)

    def _blocks_to_come(self, seq: Sequence) -> int:
        return num_blocks(seq.max_tokens_cached, self.pool.block_size) - len(seq.block_table)

    @torch.inference_mode()
    def _forward(self, seqs: list[Sequence], ids: list[list[int]]) -> list[int]:
        """Feed ``ids`` (the same count per row) at each row's own positions; the next token per row."""
        pool, n = self.pool, len(ids[0])
        for s in seqs:
            missing = num_blocks(s.num_cached + n, pool.block_size) - len(s.block_table)
            if missing > 0:
                s.block_table.extend(pool.allocate(missing, first=not s.block_table))
        ctx = StepContext.build([s.block_table for s in seqs], [s.num_cached for s in seqs], n, pool.block_size,
                                pool.device)
        self.cache.begin_step(ctx)
        try:
            out = self.model(input_ids=torch.tensor(ids, device=pool.device), position_ids=ctx.positions,
                             use_cache=True, logits_to_keep=1, **cache_kwargs(self.cache))
        finally:
            self.cache.end_step()
        for s in seqs:
            s.num_cached += n
        logits = out.logits[:, -1].float()
        greedy = next_token(logits).tolist()  # one device sync for the whole batch
        return [g if s.sampler is None else s.sampler(row) for s, g, row in zip(seqs, greedy, logits)]

    def _append(self, seq: Sequence, token: int) -> int:
        seq.token_ids.append(token)
        if token in seq.eos_ids or len(seq.generated_ids) >= seq.max_new_tokens:
            self.finish(seq.id)
        return token
