"""A chat session: one conversation, its blocks in the engine's shared pool, streamed replies.

Every turn goes through the engine's scheduler (alone, it is a batch of one). Between turns the
session keeps the blocks of every token already stored; a new turn only feeds the tokens after the
longest common prefix with what is stored (the chat template re-renders the history).
"""

from __future__ import annotations

import threading
import time
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from ..errors import ContextTooLong, KVCacheFull, WorkerClosed
from ..models.variants import context_limit, window_note
from ..storage.block_pool import BlockPool, KVMemory
from .sampling import next_token
from .sequence import Sampler

if TYPE_CHECKING:
    from .engine import Engine


@dataclass
class TurnStats:
    """What one reply cost."""

    new_tokens: int = 0
    prompt_tokens: int = 0  # tokens fed this turn (not cached before)
    seconds: float = 0.0  # wall time of the whole reply
    prefill_s: float = 0.0  # compute time of the prefill (and first token)
    decode_s: float = 0.0  # compute time of the later tokens (a batched step counts fully for each row)
    token_ids: list[int] = field(default_factory=list)
    kv: KVMemory | None = None
    stopped: bool = False
    cache_full: str | None = None  # why the reply ended early: the pool had no block left

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens after the first per second of decode compute: what the KV mode changes."""
        return (self.new_tokens - 1) / self.decode_s if self.new_tokens > 1 and self.decode_s > 0 else 0.0


@dataclass
class GenerationConfig:
    max_new_tokens: int = 256
    temperature: float = 0.0  # greedy by default so two KV modes give comparable answers
    top_p: float = 1.0
    seed: int = 0


class ChatSession:
    """Made by :meth:`Engine.chat`; ``pool`` is the engine's shared pool of its KV mode (and parameters)."""

    def __init__(self, engine: "Engine", pool: BlockPool, *, system_prompt: str | None = None):
        self.engine, self.pool = engine, pool
        self.loaded = engine.loaded
        self.version = engine.version  # the model it was made for; a replaced model closes it
        self.system_prompt = system_prompt
        self.messages: list[dict[str, str]] = []
        self.cached_ids: list[int] = []  # tokens whose K/V are stored, in order
        self.blocks: list[int] = []  # their blocks in the pool; changed in place only (the finalizer holds it)
        self.last = TurnStats()
        self._request: Any = None  # the reply being generated, read live by memory() and ``last``
        self._context = context_limit(self.loaded.model.config)  # capped at a sliding window (models/variants.py)
        weakref.finalize(self, pool.free, self.blocks)  # a dropped session gives its blocks back

    @property
    def kv(self) -> str:
        return self.pool.mode.name

    @property
    def closed(self) -> bool:
        return self.version != self.engine.version

    def memory(self) -> KVMemory:
        """The blocks this conversation holds, live while a reply is generated."""
        request = self._request
        tokens = request.seq.num_cached if request is not None else len(self.cached_ids)
        return self.pool.memory(self.blocks, tokens)

    def reset(self) -> None:
        """Forget the conversation and give its blocks back."""
        self.messages, self.cached_ids = [], []
        self.pool.truncate(self.blocks, 0)

    def _prompt_ids(self) -> list[int]:
        msgs = ([{"role": "system", "content": self.system_prompt}] if self.system_prompt else []) + self.messages
        ids = self.loaded.tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
        if hasattr(ids, "keys"):  # newer tokenizers return a BatchEncoding
            ids = ids["input_ids"]
        return list(ids)

    def _reuse_prefix(self, ids: list[int]) -> int:
        """Keep the stored prefix ``ids`` shares (at least one token must be fed to get logits)."""
        common = 0
        for a, b in zip(self.cached_ids, ids[:-1]):
            if a != b:
                break
            common += 1
        return self._keep(common)

    def _keep(self, num_tokens: int) -> int:
        """Keep the first ``num_tokens`` stored (fewer when they end inside a block other sessions share); how many."""
        kept = self.pool.truncate(self.blocks, num_tokens)
        del self.cached_ids[kept:]
        return kept

    def _sampler(self, config: GenerationConfig) -> Sampler | None:
        """None for greedy (the scheduler picks every greedy row with one argmax), else seeded nucleus sampling."""
        if config.temperature <= 0:
            return None
        gen = torch.Generator(device="cpu").manual_seed(config.seed)
        return lambda logits: int(next_token(logits[None].cpu(), config.temperature, config.top_p, gen)[0])

    def stream_reply(
        self, user_text: str, config: GenerationConfig | None = None, stop: threading.Event | None = None
    ) -> Iterator[str]:
        """Yield the reply's text as it grows (each item is the new piece); stats land in ``self.last``."""
        if self.closed:
            raise WorkerClosed("the model was replaced since this conversation started: start a new one")
        config = config or GenerationConfig()
        self.messages.append({"role": "user", "content": user_text})
        ids = self._prompt_ids()
        max_new = config.max_new_tokens
        if self._context:
            if len(ids) >= self._context:
                self.messages.pop()  # nothing was stored: the conversation stays as it was
                why = window_note(self.loaded.model.config, self.loaded.name)
                raise ContextTooLong(f"the conversation is {len(ids)} tokens and {self.loaded.name} reads at most "
                                     f"{self._context}{f' ({why})' if why else ''}: clear the chat to start over")
            max_new = min(max_new, self._context - len(ids))  # the reply ends at the model's context window
        start = self._reuse_prefix(ids)
        stats = self.last = TurnStats(prompt_tokens=len(ids) - start)
        t0 = time.perf_counter()
        try:
            request = self.engine.submit(self.pool, ids, max_new, block_table=self.blocks, num_cached=start,
                                         sampler=self._sampler(config), stop=stop, cut_to_pool=True)
        except KVCacheFull as exc:  # refused before anything of this turn was stored: the conversation stays
            self.messages.pop()
            stats.cache_full = str(exc)
            raise
        self._request = request
        yield from self._stream(request, ids, max_new, stop, stats, t0)

    def _stream(self, request: Any, ids: list[int], max_new: int, stop: threading.Event | None, stats: TurnStats,
                t0: float) -> Iterator[str]:
        tok, eos, text = self.loaded.tokenizer, self.engine.eos_ids, ""
        fed = stats.prompt_tokens  # less the first tokens found stored by other sessions (a shared system prompt)
        refused = False
        try:
            for t in request:
                if stop is not None and stop.is_set():
                    stats.stopped = True
                    break
                if t in eos:
                    break
                stats.token_ids.append(t)
                stats.new_tokens += 1
                stats.prefill_s, stats.decode_s = request.seq.prefill_s, request.seq.decode_s  # live for the page
                stats.prompt_tokens = fed - request.seq.num_shared
                new_text = tok.decode(stats.token_ids, skip_special_tokens=True)
                if len(new_text) > len(text) and not new_text.endswith("\ufffd"):
                    yield new_text[len(text):]
                    text = new_text
            else:  # the tokens ran out: the length limit (the pool's, maybe), or the worker saw the Stop first
                stats.stopped = stats.new_tokens < request.seq.max_new_tokens and stop is not None and stop.is_set()
                if request.seq.cut_short and stats.new_tokens >= request.seq.max_new_tokens:
                    stats.cache_full = request.seq.cut_short
            final = tok.decode(stats.token_ids, skip_special_tokens=True)
            if len(final) > len(text):
                yield final[len(text):]
        except KVCacheFull as exc:  # refused, others hold the pool: the turn is undone (what it stored stays cached)
            refused = True
            stats.cache_full = str(exc)
            self.messages.pop()
            raise
        finally:  # also when the caller stops reading midway (Ctrl-C, a closed page): the turn stands as far as it got
            request.cancel()  # a no-op when it ended by itself
            self._request = None
            stats.prefill_s, stats.decode_s = request.seq.prefill_s, request.seq.decode_s
            stats.prompt_tokens = fed - request.seq.num_shared
            stored = ids + stats.token_ids
            self.cached_ids = stored[: request.seq.num_cached]
            self._keep(min(request.seq.num_cached, len(stored)))  # the worker may have run ahead of a Stop
            stats.seconds = time.perf_counter() - t0
            stats.kv = self.memory()
            if not refused:
                self.messages.append({"role": "assistant", "content": tok.decode(stats.token_ids, skip_special_tokens=True)})

    def reply(self, user_text: str, config: GenerationConfig | None = None) -> str:
        return "".join(self.stream_reply(user_text, config))
