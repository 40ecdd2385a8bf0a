"""A chat session: one conversation, one paged KV cache, streamed replies.

Between turns the cache keeps every token it already holds; a new turn only feeds the tokens
after the longest common prefix with what is cached (the chat template re-renders the history).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from .block_pool import KVCacheFull
from .cache import KVMemory, PagedKVCache
from .generation import forward_tokens, next_token
from .qparams import KVQParams
from .serving import BatchWorker

Sampler = Callable[[torch.Tensor], int]  # next token from one row of fp32 logits


class ContextTooLong(ValueError):
    """A conversation longer than the model's context window: nothing of the turn was stored."""


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
    def __init__(
        self,
        loaded: Any,
        kv: str = "fp16",
        *,
        qparams: KVQParams | str | None = None,
        system_prompt: str | None = None,
        block_size: int = 64,
        cache: PagedKVCache | None = None,
        worker: BatchWorker | None = None,
    ):
        """``worker``: decode through a shared :class:`~kvcache.serving.BatchWorker` (``cache`` must be over
        a pool it serves) instead of in the caller's thread."""
        self.loaded = loaded
        self.worker = worker
        self.cache = cache or PagedKVCache.for_model(loaded.model, kv, qparams=qparams, block_size=block_size)
        self.system_prompt = system_prompt
        self.messages: list[dict[str, str]] = []
        self.cached_ids: list[int] = []  # tokens whose K/V are in the cache, in order
        self.last = TurnStats()
        self._eos = eos_ids(loaded.tokenizer, loaded.model)
        self._context = getattr(loaded.model.config, "max_position_embeddings", None)  # positions the model was trained for

    @property
    def kv(self) -> str:
        return self.cache.kv

    def reset(self) -> None:
        """Forget the conversation and free its blocks."""
        self.messages, self.cached_ids = [], []
        self.cache.reset()

    def _prompt_ids(self) -> list[int]:
        msgs = ([{"role": "system", "content": self.system_prompt}] if self.system_prompt else []) + self.messages
        ids = self.loaded.tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
        if hasattr(ids, "keys"):  # newer tokenizers return a BatchEncoding
            ids = ids["input_ids"]
        return list(ids)

    def _reuse_prefix(self, ids: list[int]) -> int:
        """Keep the cached prefix ``ids`` shares (at least one token must be fed to get logits)."""
        common = 0
        for a, b in zip(self.cached_ids, ids[:-1]):
            if a != b:
                break
            common += 1
        self.cache.truncate(common)
        del self.cached_ids[common:]
        return common

    def stream_reply(
        self, user_text: str, config: GenerationConfig | None = None, stop: threading.Event | None = None
    ) -> Iterator[str]:
        """Yield the reply's text as it grows (each item is the new piece); stats land in ``self.last``."""
        config = config or GenerationConfig()
        tok = self.loaded.tokenizer
        self.messages.append({"role": "user", "content": user_text})
        ids = self._prompt_ids()
        max_new = config.max_new_tokens
        if self._context:
            if len(ids) >= self._context:
                self.messages.pop()  # nothing was stored: the conversation stays as it was
                raise ContextTooLong(f"the conversation is {len(ids)} tokens and {self.loaded.name} reads at most "
                                     f"{self._context}: clear the chat to start over")
            max_new = min(max_new, self._context - len(ids))  # the reply ends at the model's context window
        start = self._reuse_prefix(ids)
        stats = TurnStats(prompt_tokens=len(ids) - start)
        self.last = stats
        gen = torch.Generator(device="cpu").manual_seed(config.seed)
        sample = None  # greedy: the batch worker picks every greedy row with one argmax
        if config.temperature > 0:
            sample = lambda logits: int(next_token(logits[None].cpu(), config.temperature, config.top_p, gen)[0])  # noqa: E731
        t0 = time.perf_counter()
        produce = self._tokens_local if self.worker is None else self._tokens_batched
        tokens = produce(ids, start, max_new, sample, stop, stats)
        text = ""
        eos = self._eos
        refused = False
        try:
            for t in tokens:
                if stop is not None and stop.is_set():
                    stats.stopped = True
                    break
                if t in eos:
                    break
                stats.token_ids.append(t)
                stats.new_tokens += 1
                new_text = tok.decode(stats.token_ids, skip_special_tokens=True)
                if len(new_text) > len(text) and not new_text.endswith("\ufffd"):
                    yield new_text[len(text):]
                    text = new_text
            else:  # the tokens ran out: the length limit, a full pool, or the worker saw the Stop first
                stopped_early = stats.new_tokens < max_new and not stats.cache_full
                stats.stopped = stopped_early and stop is not None and stop.is_set()
            tokens.close()  # a batched request ends now, not when the caller has read the rest
            final = tok.decode(stats.token_ids, skip_special_tokens=True)
            if len(final) > len(text):
                yield final[len(text):]
        except KVCacheFull as exc:
            # Refused before anything of this turn was stored: undo the turn, keep the conversation.
            refused = True
            self.cache.truncate(start)
            self.messages.pop()
            stats.cache_full = str(exc)
            raise
        finally:  # also when the caller stops reading midway (Ctrl-C, a closed page): the turn stands as far as it got
            tokens.close()
            taken = ids + stats.token_ids
            if self.cache.num_tokens > len(taken):  # the worker ran ahead of what the reply took (a Stop)
                self.cache.truncate(len(taken))
            self.cached_ids = taken[: self.cache.num_tokens]
            stats.seconds = time.perf_counter() - t0
            stats.kv = self.cache.memory()
            if not refused:
                self.messages.append({"role": "assistant", "content": tok.decode(stats.token_ids, skip_special_tokens=True)})

    @torch.inference_mode()
    def _tokens_local(
        self, ids: list[int], start: int, max_new: int, sample: Sampler | None, stop: threading.Event | None, stats: TurnStats
    ) -> Iterator[int]:
        """This session alone: prefill the new tokens, then one forward per token, in the caller's thread."""
        model, device = self.loaded.model, self.loaded.model.device
        t0 = time.perf_counter()
        logits = forward_tokens(model, self.cache, torch.tensor([ids[start:]], device=device))[0, -1]
        stats.prefill_s = time.perf_counter() - t0
        for i in range(max_new):
            t = int(logits.argmax()) if sample is None else sample(logits)
            yield t
            if i == max_new - 1:
                return
            t0 = time.perf_counter()
            try:
                logits = forward_tokens(model, self.cache, torch.tensor([[t]], device=device))[0, -1]
            except KVCacheFull as exc:  # the reply ends here; what is stored stays consistent
                stats.cache_full = str(exc)
                return
            stats.decode_s += time.perf_counter() - t0

    def _tokens_batched(
        self, ids: list[int], start: int, max_new: int, sample: Sampler | None, stop: threading.Event | None, stats: TurnStats
    ) -> Iterator[int]:
        """Through the shared worker: this session's request joins the others of its pool in each step."""
        request = self.worker.submit(
            self.cache.pool, ids, max_new, block_table=self.cache.row_table(), num_cached=start,
            sampler=sample, stop=stop,
        )
        try:
            yield from request
        finally:
            request.cancel()  # a no-op when it ended by itself
            self.cache.set_num_tokens(request.seq.num_cached)
            stats.prefill_s, stats.decode_s = request.seq.prefill_s, request.seq.decode_s

    def reply(self, user_text: str, config: GenerationConfig | None = None) -> str:
        return "".join(self.stream_reply(user_text, config))


def eos_ids(tokenizer: Any, model: Any) -> set[int]:
    """Every token that ends a reply: the model's and tokenizer's EOS, and ChatML's ``<|im_end|>``."""
    ids = set()
    for v in (getattr(model.generation_config, "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(v, int):
            ids.add(v)
        elif v:
            ids.update(v)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>") if "<|im_end|>" in tokenizer.get_vocab() else None
    if im_end is not None:
        ids.add(im_end)
    return ids
