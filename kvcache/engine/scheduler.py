"""Continuous batching: several sequences decoded together over one shared, fixed-size :class:`BlockPool`.

Sequences join and leave between steps. A step runs ONE decode forward for every sequence whose prompt is
stored, then prefills: at most ``prefill_chunk`` prompt tokens per step in all (a long prompt takes several
steps, one chunk each, appended to its blocks as a chat turn appends to a conversation's), so the others
get a token every step however long a new prompt is; ``prefill_chunk=None`` prefills every prompt whole.
Every row keeps its own length: the step's :class:`~kvcache.storage.context.StepContext` gives each row's
new tokens its own slots and each row's attention its own length, so each sequence gets the tokens it
would get alone (greedy), chunked or not. The one :class:`~kvcache.hf.cache.PagedKVCache` of the
scheduler only carries that context into the model.

Admission reserves nothing ahead: a request starts when the pool can hold its next forward (its first
chunk) besides what the running sequences' next forwards take, and sequences take blocks as their tokens
come. When a fixed pool runs out, the most recently admitted sequence is preempted by recompute (vLLM's
policy): its blocks are freed and it goes back to the front of the queue with its tokens so far; resumed,
it prefills them again (prompt and generated tokens alike) and goes on where it stopped, with the tokens
it would have got unpreempted (greedy). Others may hold blocks of the pool (a chat session keeps its
conversation's blocks between turns and hands them in with its next request, so only the new tokens are
prefilled; preempted, that history is recomputed too). A request that cannot go on while none of the
scheduler's own others run (the rest is held by others) is refused with ``Sequence.error``, or, when it
has generated tokens already, ends there with ``Sequence.cut_short``.

Prefix caching (:mod:`~kvcache.storage.prefix_cache`): the full blocks of every prompt are registered as
they are stored, and a sequence admitted with nothing stored (a new conversation, or a preempted one)
takes those that store its first tokens (every chat's system prompt) and prefills only the rest.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from collections.abc import Iterable
from typing import Any

import torch

from ..config import MAX_NUM_SEQS, PREFILL_CHUNK
from ..errors import ConfigError, KVCacheFull
from ..hf.cache import PagedKVCache
from ..hf.compat import cache_kwargs
from ..storage.block_pool import BlockPool
from ..storage.context import StepContext
from .sampling import next_token
from .sequence import Sampler, Sequence, num_blocks


class BatchScheduler:
    """Greedy continuous batching of many requests over one pool: ``add()`` them, then ``step()``.

    ``prefill_chunk``: prompt tokens prefilled per step, all sequences together (None: every prompt whole).
    ``max_num_seqs``: sequences running at once (vLLM's ``max_num_seqs``); the others wait.
    """

    def __init__(self, model: Any, pool: BlockPool, *, eos_ids: Iterable[int] = (),
                 prefill_chunk: int | None = PREFILL_CHUNK, max_num_seqs: int = MAX_NUM_SEQS):
        if prefill_chunk is not None and prefill_chunk < 1:
            raise ConfigError(f"prefill_chunk must be at least 1 token (or None for whole prompts), "
                              f"got {prefill_chunk}")
        self.model, self.pool, self.prefill_chunk, self.max_num_seqs = model, pool, prefill_chunk, max_num_seqs
        self.eos_ids = frozenset(eos_ids)
        self.cache = PagedKVCache(pool)  # carries each step's context into the model; holds no blocks itself
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in the order they were admitted: the last one is preempted first
        self.sequences: dict[int, Sequence] = {}  # every sequence added, by id
        self.preemptions = 0
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
        """Decode every prefilled sequence in one forward, then prefill up to ``prefill_chunk`` prompt tokens:
        ``{seq id: new token}`` (a sequence whose prefill is not done yet gets none)."""
        self._admit()
        new: dict[int, int] = {}
        decoding = []
        for seq in [s for s in self.running if s.num_pending == 1]:  # oldest first: the newest give way
            if seq in self.running and self._make_room(seq, 1):
                decoding.append(seq)
        if decoding:
            t0 = time.perf_counter()
            tokens = self._forward(decoding, [[s.token_ids[-1]] for s in decoding])
            spent = time.perf_counter() - t0
            for s, t in zip(decoding, tokens):
                if s.generated_ids:
                    s.decode_s += spent
                else:  # its prompt's last token came alone (the chunks before it stored the rest)
                    s.prefill_s += spent
                new[s.id] = self._append(s, t)
        budget = self.prefill_chunk
        for seq in [s for s in self.running if s.num_pending > 1]:
            if budget is not None and budget < 1:
                break
            n = seq.num_pending if budget is None else min(seq.num_pending, budget)
            if seq not in self.running or not self._make_room(seq, n):  # preempted, or refused, meanwhile
                continue
            t0 = time.perf_counter()
            last = n == seq.num_pending  # the whole prompt stored: its logits give the next token
            tokens = self._forward([seq], [seq.token_ids[seq.num_cached:seq.num_cached + n]], pick=last)
            seq.prefill_s += time.perf_counter() - t0
            budget = None if budget is None else budget - n
            if last:
                new[seq.id] = self._append(seq, tokens[0])
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
    def _admit(self) -> None:
        """Start waiting requests, in order, while the pool can hold each one's next forward besides the others'."""
        while self.waiting and len(self.running) < self.max_num_seqs:
            self._share_prefix(self.waiting[0])
            if not self._fits(self.waiting[0]):
                break
            self.running.append(self.waiting.popleft())
        if self.waiting and not self.running:  # nothing of ours will free blocks: others hold them
            self._refuse(self.waiting[0])

    def _share_prefix(self, seq: Sequence) -> None:
        """A sequence with nothing stored takes the registered blocks of its first tokens (at least one token is
        left to feed: its logits give the next token)."""
        if seq.block_table or seq.num_cached:
            return
        bs = self.pool.block_size
        blocks = self.pool.share_prefix(seq.token_ids, (len(seq.token_ids) - 1) // bs)
        seq.block_table.extend(blocks)
        seq.num_registered = len(blocks)
        seq.num_cached = seq.num_shared = len(blocks) * bs

    def _next_tokens(self, seq: Sequence) -> int:
        """Tokens its next forward feeds: one to decode, or its next prefill chunk."""
        pending = seq.num_pending
        return pending if self.prefill_chunk is None or pending == 1 else min(pending, self.prefill_chunk)

    def _missing(self, seq: Sequence, num_new: int) -> int:
        """Blocks ``seq`` lacks to store ``num_new`` more tokens."""
        return max(0, num_blocks(seq.num_cached + num_new, self.pool.block_size) - len(seq.block_table))

    def _fits(self, seq: Sequence) -> bool:
        pool = self.pool
        if pool.growable:
            return True
        promised = sum(self._missing(s, self._next_tokens(s)) for s in self.running)
        new_sinks = sum(1 for s in (*self.running, seq) if not s.block_table)  # a new sequence takes a sink slot
        return (self._missing(seq, self._next_tokens(seq)) <= pool.num_free - promised
                and pool.sinks.can_take(new_sinks))

    def _has_room(self, seq: Sequence, missing: int) -> bool:
        pool = self.pool
        return (pool.growable or missing == 0
                or (missing <= pool.num_free and (bool(seq.block_table) or pool.sinks.can_take(1))))

    def _make_room(self, seq: Sequence, num_new: int) -> bool:
        """Give ``seq`` the blocks of its next ``num_new`` tokens, preempting the most recently admitted sequences
        while the pool lacks them; False when ``seq`` itself was preempted or, alone, refused."""
        missing = self._missing(seq, num_new)
        while not self._has_room(seq, missing):
            victim = self.running[-1]
            if victim is seq and len(self.running) == 1:
                self._refuse(seq)
                return False
            self._preempt(victim)
            if victim is seq:
                return False
        if missing:
            seq.block_table.extend(self.pool.allocate(missing, first=not seq.block_table))
        return True

    def _preempt(self, seq: Sequence) -> None:
        """Recompute preemption: free its blocks (in place: a chat session's list) and queue it first again."""
        self.running.remove(seq)
        self.pool.truncate(seq.block_table, 0)
        seq.num_cached = seq.num_registered = 0
        seq.preemptions += 1
        self.preemptions += 1
        self.waiting.appendleft(seq)

    def _refuse(self, seq: Sequence) -> None:
        """``seq`` cannot go on while the others that hold the pool do: refused, or cut short if it has tokens."""
        pool, bs = self.pool, self.pool.block_size
        if self._missing(seq, self._next_tokens(seq)) <= pool.num_free:  # blocks are free: the sink slots are not
            why = f"all {pool.sinks.num_slots} sink slots are in use (one per sequence), held by other conversations"
        else:
            others = (pool.num_used - len(seq.block_table)) * bs
            why = f"{pool.num_used * bs} tokens in use of {pool.num_blocks * bs}, {others} held by other conversations"
        if seq.generated_ids:
            seq.max_new_tokens = len(seq.generated_ids)
            seq.cut_short = f"KV cache full: {why}: the reply ends here; end a session or raise cache_max_entry_count"
        else:
            seq.error = f"KV cache full: {why}; this request needs {seq.max_tokens_cached} tokens to its end"
        self.finish(seq.id)

    @torch.inference_mode()
    def _forward(self, seqs: list[Sequence], ids: list[list[int]], pick: bool = True) -> list[int]:
        """Feed ``ids`` (the same count per row, their blocks allocated) at each row's own positions; the next token
        per row (none with ``pick`` False: a prompt's chunk before its last, whose sampler must not draw)."""
        pool, n = self.pool, len(ids[0])
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
            # the prompt's blocks this forward filled can serve later sequences
            s.num_registered = pool.register_prefix(s.block_table, s.token_ids, s.num_registered,
                                                    min(s.num_cached, s.num_prompt_tokens))
        if not pick:
            return []
        logits = out.logits[:, -1].float()
        greedy = next_token(logits).tolist()  # one device sync for the whole batch
        return [g if s.sampler is None else s.sampler(row) for s, g, row in zip(seqs, greedy, logits)]

    def _append(self, seq: Sequence, token: int) -> int:
        seq.token_ids.append(token)
        if token in seq.eos_ids or len(seq.generated_ids) >= seq.max_new_tokens:
            self.finish(seq.id)
        return token
