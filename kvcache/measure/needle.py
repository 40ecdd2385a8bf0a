"""Retrieval through the cache: a pass key hidden at a depth of a long context, asked for at the end.

Each cell of the grid is a context length (the whole prompt, question included, plus the answer's tokens,
at most the model's context) and a depth (0: the needle comes first, 1: right before the question). A
trial hides a random 5-digit pass key in a haystack of filler sentences, asks for it, and answers
greedily through the mode's cache (prefill in chunks, then decode steps): correct when the first number
of the answer is the key. The keys are the same for every mode, so cells compare pairwise with fp16.

The haystack is one token stream for every cell, so cells share it: per mode the stream is prefilled once,
in order of the needles' positions, and each trial prefills only its own suffix (needle, the rest of its
haystack, the question) over the stored prefix, then the cache is truncated back to the prefix. The whole
grid costs one haystack prefill per mode plus the suffixes (``prefill_tokens`` in the report, beside
``prompt_tokens``, what prefilling every trial from scratch would cost).

The design (the classic pass-key filler, phrasing, the chat template) was chosen by measuring the embedded
135M model with an fp16 cache until it retrieves at every length up to its 8K context (README, Retrieval).
"""

from __future__ import annotations

import random
import re
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch

from ..config import BASELINE_MODE, BLOCK_SIZE, CHUNK_TOKENS
from ..errors import EvalError
from ..hf.cache import PagedKVCache
from ..hf.forward import forward_tokens, last_logits, prefill_chunks
from ..models.variants import check_window, context_limit
from ..modes import get_mode, require_qparams
from ..qparams import KVQParams
from ..shape import KVShape
from .evaluate import ProgressFn, context_notes, report_progress

DEFAULT_LENGTHS = (1024, 2048, 4096, 8192)
DEFAULT_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
DEFAULT_TRIALS = 3
ANSWER_TOKENS = 8  # greedy tokens of the answer, at most (a 5-digit key and what follows it)


@dataclass(frozen=True)
class NeedleDesign:
    """The words of the test; the prompt is ``intro haystack... needle haystack... question``."""

    intro: str = ("There is an important piece of information hidden inside a lot of irrelevant text. "
                  "Find it and memorize it. I will quiz you about the important information there.")
    filler: str = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
    needle: str = " The pass key is {key}. Remember it. The pass key is {key}."
    question: str = " What is the pass key? The pass key is"
    chat_template: bool = False  # wrap intro..question in the model's chat template as one user turn


@dataclass
class NeedleCell:
    kv: str
    context: int  # tokens of the prompt plus the answer's, at most
    depth: float
    correct: int
    trials: int
    needle_at: int  # the needle's first token position
    answers: list[str]


class _Prompts:
    """Token ids of the shared stream and of each trial's suffix, for one tokenizer and design."""

    def __init__(self, tokenizer: Any, design: NeedleDesign):
        enc = lambda s: tokenizer(s, add_special_tokens=False).input_ids  # noqa: E731
        head, tail = "", ""
        if design.chat_template and getattr(tokenizer, "chat_template", None):
            marker = "\x00NEEDLE\x00"
            text = tokenizer.apply_chat_template([{"role": "user", "content": marker}], tokenize=False,
                                                 add_generation_prompt=True)
            head, tail = text.split(marker)
            tail += design.question.strip()  # the assistant's turn starts the answer
            question = ""
        else:
            question = design.question
        self.design, self.enc = design, enc
        self.head = enc(head + design.intro)
        self.unit = enc(design.filler)
        self.question = enc(question + tail) if tail else enc(question)
        self.bos = [tokenizer.bos_token_id] if getattr(tokenizer, "bos_token_id", None) is not None and \
            getattr(tokenizer, "add_bos_token", False) else []

    def needle(self, key: int) -> list[int]:
        return self.enc(self.design.needle.format(key=key))

    def units(self, context: int) -> int:
        """Filler sentences a ``context``-token cell holds beside everything else."""
        fixed = len(self.bos) + len(self.head) + len(self.needle(99999)) + len(self.question) + ANSWER_TOKENS
        return (context - fixed) // len(self.unit)

    def needle_at(self, context: int, depth: float) -> int:
        return len(self.bos) + len(self.head) + round(depth * self.units(context)) * len(self.unit)

    def stream(self, units: int) -> list[int]:
        return self.bos + self.head + self.unit * units

    def suffix(self, context: int, depth: float, key: int) -> list[int]:
        after = self.units(context) - round(depth * self.units(context))
        return self.needle(key) + self.unit * after + self.question


def pass_key(context: int, depth: float, trial: int, seed: int = 0) -> int:
    """The 5-digit key of one trial: the same for every mode, different per cell and trial."""
    return random.Random(f"{seed}/{context}/{depth}/{trial}").randint(10000, 99999)


def first_number(text: str) -> str | None:
    match = re.search(r"\d+", text)
    return match.group() if match else None


def check_grid(lengths: list[int], depths: list[float], trials: int, max_positions: int | None,
               min_context: int) -> None:
    """The grid's bad input, one line each."""
    for d in depths:
        if not 0.0 <= d <= 1.0:
            raise EvalError(f"needle depth {d:g} is outside [0, 1]: 0 puts the needle first, 1 right before the question")
    for n in lengths:
        if max_positions and n > max_positions:
            raise EvalError(f"context {n} is beyond the model's {max_positions}-token context; use --lengths up to {max_positions}")
        if n < min_context:
            raise EvalError(f"context {n} cannot hold the needle, the question and the answer: give --lengths of at least {min_context}")
    if trials < 1:
        raise EvalError(f"--trials must be at least 1, got {trials}")
    if not lengths or not depths:
        raise EvalError("give at least one --lengths and one --depths value")


def _answer(model: Any, cache: PagedKVCache, suffix: list[int], chunk_tokens: int, tokenizer: Any) -> str:
    """Prefill ``suffix`` over what the cache holds, then decode greedily until the answer's number has ended."""
    device = model.device
    logits = last_logits(model, cache, torch.tensor([suffix], device=device), chunk_tokens)
    out: list[int] = []
    for _ in range(ANSWER_TOKENS):
        out.append(int(logits[0].argmax()))
        text = tokenizer.decode(out, skip_special_tokens=True)
        if re.search(r"\d+\D", text) or out[-1] == tokenizer.eos_token_id:
            break
        logits = forward_tokens(model, cache, torch.tensor([[out[-1]]], device=device))[:, -1]
    return tokenizer.decode(out, skip_special_tokens=True)


@torch.inference_mode()
def needle(
    loaded: Any,
    modes: list[str],
    *,
    qparams: KVQParams | None = None,
    lengths: list[int] | tuple[int, ...] = DEFAULT_LENGTHS,
    depths: list[float] | tuple[float, ...] = DEFAULT_DEPTHS,
    trials: int = DEFAULT_TRIALS,
    design: NeedleDesign | None = None,
    seed: int = 0,
    chunk_tokens: int = CHUNK_TOKENS,
    progress: ProgressFn | None = None,
) -> dict[str, Any]:
    """The retrieval grid of ``modes`` (fp16 first, always); returns the JSON-ready report with ``cells``."""
    model, tok = loaded.model, loaded.tokenizer
    design = design or NeedleDesign()
    names = list(dict.fromkeys([BASELINE_MODE, *(get_mode(m).name for m in modes)]))
    for m in names:
        require_qparams(m, qparams)
        get_mode(m).check_model(model.config)
    if qparams is not None:
        qparams.check_matches(KVShape.from_config(model.config))
    prompts = _Prompts(tok, design)
    lengths, depths = sorted(set(int(n) for n in lengths)), sorted(set(float(d) for d in depths))
    min_context = prompts.needle_at(0, 0) + len(prompts.suffix(0, 0, 99999)) + ANSWER_TOKENS + len(prompts.unit)
    check_window(model.config, max(lengths, default=0), "--lengths", loaded.name)
    check_grid(lengths, depths, trials, context_limit(model.config), min_context)
    grid = sorted(((prompts.needle_at(n, d), n, d) for n in lengths for d in depths))
    stream = prompts.stream(max(prompts.units(n) for n in lengths))
    prompt_tokens = sum(at + len(prompts.suffix(n, d, pass_key(n, d, t, seed))) for at, n, d in grid for t in range(trials))
    units, done = len(names) * len(grid) * trials, 0
    cells, prefilled, seconds = [], {}, {}
    for m in names:
        t0 = time.perf_counter()
        cache = PagedKVCache.for_model(model, m, qparams=qparams if get_mode(m).reads_qparams else None,
                                       num_blocks=-(-max(lengths) // BLOCK_SIZE) + 1)
        stored = prefilled[m] = 0
        for at, n, d in grid:
            if at > stored:  # extend the shared prefix up to this needle
                for _ in prefill_chunks(model, cache, torch.tensor([stream[stored:at]], device=model.device), chunk_tokens):
                    pass
                prefilled[m] += at - stored
                stored = at
            answers = []
            for t in range(trials):
                suffix = prompts.suffix(n, d, pass_key(n, d, t, seed))
                answers.append(_answer(model, cache, suffix, chunk_tokens, tok))
                prefilled[m] += len(suffix)
                cache.truncate(stored)
                done += 1
                report_progress(progress, done / units, f"{m}: context {n}, depth {d:g}, trial {t + 1} of {trials}")
            correct = sum(first_number(a) == str(pass_key(n, d, t, seed)) for t, a in enumerate(answers))
            cells.append(NeedleCell(m, n, d, correct, trials, at, answers))
        cache.reset()
        seconds[m] = round(time.perf_counter() - t0, 1)
    return {
        "model": getattr(loaded, "name", "?"),
        "lengths": lengths, "depths": depths, "trials": trials, "seed": seed,
        "design": asdict(design),
        "cells": [asdict(c) for c in sorted(cells, key=lambda c: (names.index(c.kv), c.context, c.depth))],
        "prefill_tokens": prefilled,  # per mode: what was really prefilled (shared prefix once, then suffixes)
        "prompt_tokens": prompt_tokens,  # per mode, had every trial been prefilled from scratch
        "seconds": seconds,
        "warnings": context_notes(qparams, names, max(lengths)),
    }


def format_grid(report: dict[str, Any]) -> str:
    """One block per mode: contexts down, depths across, ``correct/trials`` in each cell."""
    depths = report["depths"]
    out = [f"{report['model']}: pass key retrieval through the cache, {report['trials']} trials per cell "
           f"(context = prompt + answer tokens; depth 0 = first, 1 = right before the question)"]
    by_mode: dict[str, dict[tuple[int, float], dict]] = {}
    for c in report["cells"]:
        by_mode.setdefault(c["kv"], {})[(c["context"], c["depth"])] = c
    for kv, cells in by_mode.items():
        total = sum(c["correct"] for c in cells.values())
        trials = sum(c["trials"] for c in cells.values())
        shared = f", prefilled {report['prefill_tokens'][kv]:,} of {report['prompt_tokens']:,} prompt tokens"
        out.append(f"\n{kv}: {total}/{trials} correct{shared}, {report['seconds'][kv]:.0f} s")
        out.append("context  " + "  ".join(f"d={d:<5g}" for d in depths))
        for n in report["lengths"]:
            out.append(f"{n:<7}  " + "  ".join(f"{cells[(n, d)]['correct']}/{cells[(n, d)]['trials']:<5}" for d in depths))
    return "\n".join(out)
