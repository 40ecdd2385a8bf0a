"""A chat session: one conversation, one paged KV cache, streamed replies.

Between turns the cache keeps every token it already holds; a new turn only feeds the tokens
after the longest common prefix with what is cached (the chat template re-renders the history).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from .block_pool import KVCacheFull
from .cache import KVMemory, PagedKVCache
from .generation import forward_tokens, next_token
from .qparams import KVQParams


@dataclass
class TurnStats:
    """What one reply cost."""

    new_tokens: int = 0
    prompt_tokens: int = 0  # tokens fed this turn (not cached before)
    seconds: float = 0.0
    token_ids: list[int] = field(default_factory=list)
    kv: KVMemory | None = None
    stopped: bool = False
    cache_full: str | None = None  # why the reply ended early: the pool had no block left

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0


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
    ):
        self.loaded = loaded
        self.cache = cache or PagedKVCache.for_model(loaded.model, kv, qparams=qparams, block_size=block_size)
        self.system_prompt = system_prompt
        self.messages: list[dict[str, str]] = []
        self.cached_ids: list[int] = []  # tokens whose K/V are in the cache, in order
        self.last = TurnStats()

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

    @torch.inference_mode()
    def stream_reply(
        self, user_text: str, config: GenerationConfig | None = None, stop: threading.Event | None = None
    ) -> Iterator[str]:
        """Yield the reply's text as it grows (each item is the new piece); stats land in ``self.last``."""
        config = config or GenerationConfig()
        tok, model = self.loaded.tokenizer, self.loaded.model
        self.messages.append({"role": "user", "content": user_text})
        ids = self._prompt_ids()
        start = self._reuse_prefix(ids)
        stats = TurnStats(prompt_tokens=len(ids) - start)
        self.last = stats
        gen = torch.Generator(device="cpu").manual_seed(config.seed)
        t0 = time.perf_counter()
        feed = torch.tensor([ids[start:]], device=model.device)
        try:
            logits = forward_tokens(model, self.cache, feed)[:, -1]
        except KVCacheFull as exc:
            # Nothing of this turn was stored (blocks are taken before any write): undo the turn, keep the rest.
            self.cache.truncate(start)
            self.messages.pop()
            stats.cache_full = str(exc)
            raise
        self.cached_ids.extend(ids[start:])
        text = ""
        eos = _eos_ids(tok, model)
        for _ in range(config.max_new_tokens):
            if stop is not None and stop.is_set():
                stats.stopped = True
                break
            t = int(next_token(logits.cpu(), config.temperature, config.top_p, gen)[0])
            if t in eos:
                break
            stats.token_ids.append(t)
            stats.new_tokens += 1
            new_text = tok.decode(stats.token_ids, skip_special_tokens=True)
            if len(new_text) > len(text) and not new_text.endswith("\ufffd"):
                yield new_text[len(text):]
                text = new_text
            try:
                logits = forward_tokens(model, self.cache, torch.tensor([[t]], device=model.device))[:, -1]
            except KVCacheFull as exc:  # the reply ends here; what is stored stays consistent
                stats.cache_full = str(exc)
                break
            self.cached_ids.append(t)
        stats.seconds = time.perf_counter() - t0
        stats.kv = self.cache.memory()
        final = tok.decode(stats.token_ids, skip_special_tokens=True)
        if len(final) > len(text):
            yield final[len(text):]
        self.messages.append({"role": "assistant", "content": final})

    def reply(self, user_text: str, config: GenerationConfig | None = None) -> str:
        return "".join(self.stream_reply(user_text, config))


def _eos_ids(tokenizer: Any, model: Any) -> set[int]:
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
