"""Data-free calibration: the model writes its own calibration text, through the engine's scheduler.

Every answer is one request of :class:`kvcache.engine.scheduler.BatchScheduler` over a fixed
:class:`kvcache.storage.block_pool.BlockPool` that holds :data:`SELF_BATCH` answers at their longest, so
the answers are decoded together (continuous batching) and memory is bounded whatever ``samples x seqlen``
asks for. Each answer samples with its own seeded generator (nucleus sampling, top-p 0.95), so the text
depends on the seed only.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Callable, Iterator
from typing import Any

import torch

from kvcache.codec import kv_float_dtype
from kvcache.config import BASELINE_MODE, BLOCK_SIZE
from kvcache.engine.sampling import eos_ids, next_token
from kvcache.engine.scheduler import BatchScheduler
from kvcache.engine.sequence import Sampler, num_blocks
from kvcache.hf.attention import register_attention
from kvcache.models.variants import context_limit
from kvcache.modes import get_mode
from kvcache.storage.block_pool import BlockPool
from kvcache.shape import KVShape

from ..errors import CalibCancelled, CalibDataError

# What the model is asked to write about (Chinese and English, as the models we calibrate chat in both).
SELF_PROMPTS = (
    "请写一篇关于中国古代科技发明的短文，介绍它们对世界的影响。",
    "Write a detailed essay about how the scientific method changed the modern world.",
    "用通俗的语言解释什么是市场经济，并举出日常生活中的例子。",
    "Explain, step by step, how a computer runs a program, for a curious high-school student.",
    "请讲一个关于一次穿越高山的旅行的故事，要有细节和对话。",
    "Tell a story about a small town library and the people who visit it every day.",
    "请比较中文和英文在语法上的主要区别，并给出例句。",
    "Summarize the main causes and consequences of the industrial revolution.",
)
SELF_BATCH = 16  # answers decoded at once
MAX_ANSWER_TOKENS = 1024
MIN_ANSWER_TOKENS = 8  # a shorter answer (the model stopped at once) adds only its prompt again: dropped
TOP_P = 0.95

Progress = Callable[[float, str], Any]


@torch.no_grad()
def self_written_windows(
    model: Any, tokenizer: Any, samples: int, seqlen: int, seed: int, progress: Progress | None = None
) -> torch.LongTensor:
    """The model writes text from :data:`SELF_PROMPTS` until there are ``samples * seqlen`` tokens; prompts
    and answers are concatenated and cut into consecutive windows. ``progress`` returning False cancels."""
    if tokenizer is None:
        raise CalibDataError("dataset 'self' needs the model's tokenizer")
    model = getattr(model, "model", model) if not hasattr(model, "generate") else model  # a LoadedModel's .model
    need = samples * seqlen
    prompts = [_prompt_ids(tokenizer, p) for p in SELF_PROMPTS]
    limit = context_limit(getattr(model, "config", None)) or 2048
    stops = eos_ids(tokenizer, model)
    sep = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    rng = random.Random(seed)  # one generator seed per answer
    report = _Reporter(progress, need)
    stream: list[int] = []
    turn = stalled = 0
    with _paged_attention(model):
        while len(stream) < need:
            if stalled >= 2:
                raise CalibDataError("dataset 'self': the model writes no text (it ends every answer at once)")
            before = len(stream)
            requests, turn = _plan(prompts, turn, need - len(stream), limit)
            for prompt, answer in _write(model, requests, stops, rng, lambda n, before=before: report(before + n)):
                answer = _until_stop(answer, stops)
                if len(answer) >= MIN_ANSWER_TOKENS:
                    stream.extend(prompt + answer + sep)
            report(len(stream))
            stalled = stalled + 1 if len(stream) == before else 0
    return torch.tensor(stream[:need], dtype=torch.long).view(samples, seqlen).clone()


def _plan(prompts: list[list[int]], turn: int, left: int, limit: int) -> tuple[list[tuple[list[int], int]], int]:
    """(prompt, max new tokens) requests, the prompts in turn, until they may write ``left`` tokens."""
    requests, planned = [], 0
    while planned < left:
        prompt = prompts[turn % len(prompts)]
        turn += 1
        max_new = max(16, min(MAX_ANSWER_TOKENS, limit - len(prompt), left - planned))
        requests.append((prompt, max_new))
        planned += len(prompt) + max_new
    return requests, turn


def _write(
    model: Any, requests: list[tuple[list[int], int]], stops: set[int], rng: random.Random,
    on_step: Callable[[int], None],
) -> list[tuple[list[int], list[int]]]:
    """Run every request through the scheduler; (prompt, generated tokens) of each, in request order."""
    longest = max(len(p) + n - 1 for p, n in requests)
    blocks = min(SELF_BATCH, len(requests)) * num_blocks(longest, BLOCK_SIZE)
    pool = BlockPool(get_mode(BASELINE_MODE), KVShape.from_config(model.config), block_size=BLOCK_SIZE,
                     num_blocks=blocks, growable=False, device=next(model.parameters()).device,
                     fp_dtype=kv_float_dtype(next(model.parameters()).dtype))
    scheduler = BatchScheduler(model, pool, eos_ids=stops)
    ids = [scheduler.add(p, n, sampler=_sampler(rng.getrandbits(63))) for p, n in requests]
    written = 0
    while scheduler.waiting or scheduler.running:
        written += len(scheduler.step())
        on_step(written)
    return [(p, scheduler.sequences[i].generated_ids) for (p, _), i in zip(requests, ids)]


def _sampler(seed: int) -> Sampler:
    gen = torch.Generator(device="cpu").manual_seed(seed)
    return lambda logits: int(next_token(logits[None].cpu(), 1.0, TOP_P, gen)[0])


def _until_stop(tokens: list[int], stops: set[int]) -> list[int]:
    return next((tokens[:i] for i, t in enumerate(tokens) if t in stops), tokens)


class _Reporter:
    """``progress(fraction, message)`` after each step, never going back; False from it cancels."""

    def __init__(self, progress: Progress | None, need: int):
        self.progress, self.need, self.shown = progress, need, 0

    def __call__(self, tokens: int) -> None:
        if self.progress is None:
            return
        self.shown = max(self.shown, min(tokens, self.need))
        if self.progress(self.shown / self.need, f"self: the model wrote {self.shown}/{self.need} tokens") is False:
            raise CalibCancelled("calibration cancelled while the model was writing its calibration text")


@contextlib.contextmanager
def _paged_attention(model: Any) -> Iterator[None]:
    """The scheduler's cache needs the ``kvq`` attention (the model loader selects it); another model gets it
    for the run and its own back afterwards."""
    kvq = register_attention()
    before = getattr(model.config, "_attn_implementation", None)
    if before == kvq:
        yield
        return
    model.set_attn_implementation(kvq)
    try:
        yield
    finally:
        if before is not None:
            model.set_attn_implementation(before)


def _prompt_ids(tokenizer: Any, prompt: str) -> list[int]:
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True
        )
        if hasattr(ids, "keys"):  # a BatchEncoding in newer transformers
            ids = ids["input_ids"]
        return list(ids)
    return list(tokenizer(prompt)["input_ids"])
