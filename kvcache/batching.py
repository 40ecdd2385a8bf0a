"""Continuous batching: several sequences decoded together over one shared, fixed-size :class:`BlockPool`.

Sequences join and leave between steps. A step prefills each newly admitted sequence on its own,
then runs ONE decode forward for all the others. Every row keeps its own length: its K/V go to its
own blocks (:class:`BatchCache`) and attention reads its history up to its own length
(:meth:`BatchView.seq_lens`), so each sequence gets the tokens it would get alone (greedy).

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
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers.cache_utils import Cache

from .block_pool import BlockPool, KVCacheFull
from .cache import PagedLayer, PagedView
from .compat import cache_kwargs
from .generation import next_token
from .kernels import store_kv
from .layout import slot_mapping


def _num_blocks(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


@dataclass(eq=False)
class Sequence:
    """One request: its tokens, where its K/V live in the shared pool, and when it stops."""

    id: int
    token_ids: list[int]  # prompt, then the generated tokens
    max_new_tokens: int
    eos_ids: frozenset[int] = frozenset()
    block_table: list[int] = field(default_factory=list)  # block ids in the shared pool, in order
    num_cached: int = 0  # tokens whose K/V are stored
    finished: bool = False
    sampler: Callable[[torch.Tensor], int] | None = None  # next token from ``[vocab]`` fp32 logits; None: greedy
    keep_blocks: bool = False  # at the end its blocks stay with their owner (a chat session's next turn)
    error: str | None = None  # why it was refused (the pool cannot hold it)
    prefill_s: float = 0.0  # compute seconds of its prefill
    decode_s: float = 0.0  # compute seconds of the decode steps it was in (a batched step counts fully)
    num_prompt_tokens: int = field(init=False)

    def __post_init__(self) -> None:
        self.num_prompt_tokens = len(self.token_ids)

    @property
    def generated_ids(self) -> list[int]:
        """Tokens generated so far (an EOS that ended the sequence included)."""
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def max_tokens_cached(self) -> int:
        """Tokens it may store: the prompt and every generated token but the last (never fed back)."""
        return self.num_prompt_tokens + self.max_new_tokens - 1


@dataclass
class StepContext:
    """Where one forward's tokens go; built once per step, read by every layer."""

    seqs: list[Sequence]  # the rows of this forward
    num_new: int  # tokens fed per row
    slots: torch.Tensor  # [batch * num_new] flat slots, row by row
    block_tables: torch.Tensor  # [batch, max_blocks] int32, rows padded with 0
    seq_lens: torch.Tensor  # [batch] int32: tokens each row holds after this step
    start: int  # smallest first new position
    end: int  # largest length after this step


@dataclass
class BatchView(PagedView):
    """A :class:`PagedView` whose rows have their own lengths (``start``/``end`` are the extremes)."""

    row_lens: torch.Tensor  # [batch] int32

    def seq_lens(self, batch: int, device: torch.device | str) -> torch.Tensor:
        return self.row_lens.to(device)


class BatchLayer(PagedLayer):
    """One layer of a :class:`BatchCache`: each row's new tokens go to that row's own slots."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs) -> tuple[BatchView, BatchView]:
        ctx = self.cache.context
        b, kvh, q, d = key_states.shape
        if ctx is None or (b, q) != (len(ctx.seqs), ctx.num_new):
            raise ValueError(f"BatchCache: call begin_step() for this forward's {b} rows of {q} tokens first")
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        flat = lambda x: x.transpose(1, 2).reshape(b * q, kvh, d)  # noqa: E731
        store_kv(self.cache.pool.layers[self.layer_idx], flat(key_states), flat(value_states), ctx.slots)
        view = BatchView(self.cache, self.layer_idx, ctx.start, ctx.end, ctx.seq_lens)
        return view, view

    def get_mask_sizes(self, *args) -> tuple[int, int]:
        # Only the largest length matters: a single-row prefill (kv == q) or a decode (q == 1) needs no mask.
        ctx = self.cache.context
        return (ctx.end if ctx else 0), 0

    def get_seq_length(self) -> int:
        ctx = self.cache.context
        return ctx.end - ctx.num_new if ctx else 0


class BatchCache(Cache):
    """A transformers ``Cache`` over the rows of one forward, each at its own length, in a shared pool.

    The sequences own their block tables; the scheduler calls ``begin_step(seqs, n)`` before each
    forward and ``end_step()`` after it.
    """

    def __init__(self, pool: BlockPool):
        self.pool = pool
        self.context: StepContext | None = None
        super().__init__(layers=[BatchLayer(self, i) for i in range(pool.shape.num_layers)])

    @property
    def kv(self) -> str:
        return self.pool.mode.name

    def begin_step(self, seqs: list[Sequence], num_new: int) -> torch.Tensor:
        """Allocate blocks for ``num_new`` more tokens per row; return their positions ``[batch, num_new]``."""
        bs, device = self.pool.block_size, self.pool.device
        for s in seqs:
            missing = _num_blocks(s.num_cached + num_new, bs) - len(s.block_table)
            if missing > 0:
                s.block_table.extend(self.pool.allocate(missing))
        width = max(len(s.block_table) for s in seqs)
        tables = torch.tensor([s.block_table + [0] * (width - len(s.block_table)) for s in seqs], dtype=torch.int32, device=device)
        starts = [s.num_cached for s in seqs]
        positions = torch.tensor(starts, device=device)[:, None] + torch.arange(num_new, device=device)
        self.context = StepContext(
            seqs, num_new, slot_mapping(tables, positions, bs).reshape(-1), tables,
            seq_lens=(positions[:, -1] + 1).to(torch.int32), start=min(starts), end=max(starts) + num_new,
        )
        return positions

    def end_step(self) -> None:
        for s in self.context.seqs:
            s.num_cached += self.context.num_new
        self.context = None

    def block_table_tensor(self) -> torch.Tensor:
        """``[batch, max_blocks]`` int32 block tables of this forward's rows (what attention reads)."""
        return self.context.block_tables


class BatchScheduler:
    """Greedy continuous batching of many requests over one pool: ``add()`` them, then ``step()``."""

    def __init__(self, model: Any, pool: BlockPool, *, eos_ids: Iterable[int] = ()):
        self.model, self.pool = model, pool
        self.eos_ids = frozenset(eos_ids)
        self.cache = BatchCache(pool)
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
        sampler: Callable[[torch.Tensor], int] | None = None,
    ) -> int:
        """Queue a request; it starts at the next ``step()`` the pool can hold it. Returns its id.

        ``block_table`` / ``num_cached``: the first ``num_cached`` prompt tokens are already stored in
        these blocks (the caller's list, extended in place and left to the caller at the end).
        """
        if len(prompt_ids) == 0 or max_new_tokens < 1:
            raise ValueError(f"need a non-empty prompt and max_new_tokens >= 1, got {len(prompt_ids)} tokens and {max_new_tokens}")
        pool, bs = self.pool, self.pool.block_size
        if not 0 <= num_cached < len(prompt_ids) or len(block_table or []) < _num_blocks(num_cached, bs):
            raise ValueError(f"{num_cached} cached tokens need {_num_blocks(num_cached, bs)} blocks and at least one "
                             f"new token of the {len(prompt_ids)}-token prompt")
        seq = Sequence(next(self._ids), list(prompt_ids), max_new_tokens, self.eos_ids, num_cached=num_cached,
                       sampler=sampler, keep_blocks=block_table is not None)
        if block_table is not None:
            seq.block_table = block_table
        if not pool.growable and _num_blocks(seq.max_tokens_cached, bs) > pool.num_blocks:
            raise KVCacheFull(
                f"KV cache full: this request needs {seq.max_tokens_cached} tokens ({seq.num_prompt_tokens} prompt + "
                f"{max_new_tokens - 1} generated) of {pool.num_blocks * bs} ({pool.num_blocks} blocks of {bs}); "
                "shorten the prompt, lower max_new_tokens or raise cache_max_entry_count"
            )
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
        promised = sum(self._blocks_to_come(s) for s in self.running)
        return self.pool.growable or self._blocks_to_come(seq) <= self.pool.num_free - promised

    def _blocks_to_come(self, seq: Sequence) -> int:
        return _num_blocks(seq.max_tokens_cached, self.pool.block_size) - len(seq.block_table)

    @torch.inference_mode()
    def _forward(self, seqs: list[Sequence], ids: list[list[int]]) -> list[int]:
        """Feed ``ids`` (the same count per row) at each row's own positions; the greedy next token per row."""
        device = self.model.device
        positions = self.cache.begin_step(seqs, len(ids[0]))
        out = self.model(
            input_ids=torch.tensor(ids, device=device), position_ids=positions.to(device),
            use_cache=True, logits_to_keep=1, **cache_kwargs(self.cache),
        )
        self.cache.end_step()
        logits = out.logits[:, -1].float()
        greedy = next_token(logits).tolist()  # one device sync for the whole batch
        return [g if s.sampler is None else s.sampler(row) for s, g, row in zip(seqs, greedy, logits)]

    def _append(self, seq: Sequence, token: int) -> int:
        seq.token_ids.append(token)
        if token in seq.eos_ids or len(seq.generated_ids) >= seq.max_new_tokens:
            self.finish(seq.id)
        return token
