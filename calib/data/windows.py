"""Cutting a token stream into calibration windows, as LMDeploy samples them (seeded)."""

from __future__ import annotations

import logging
import random
import warnings
from typing import Any

import torch

from ..errors import CalibDataError

logger = logging.getLogger("calib.data")


def tokenize(tokenizer: Any, text: str) -> torch.Tensor:
    if tokenizer is None:
        raise CalibDataError("a tokenizer is needed to tokenize calibration text (or pass pre-tokenized windows)")
    ids = tokenizer(text, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def random_windows(ids: torch.Tensor, samples: int, seqlen: int, seed: int, what: str) -> torch.LongTensor:
    """LMDeploy's windows over one token stream: ``random.seed(seed)``, start = ``randint(0, n - seqlen)``."""
    n = check_enough(ids.numel(), seqlen, what)
    rng = random.Random(seed)
    starts = [rng.randint(0, n - seqlen) for _ in range(samples)]
    return torch.stack([ids[s : s + seqlen] for s in starts]).long()


def disjoint_windows(ids: torch.Tensor, samples: int, seqlen: int, seed: int, what: str) -> torch.LongTensor:
    """``samples`` non-overlapping windows in random (seeded) order; reuses windows, with a warning, when
    the stream holds fewer."""
    n = check_enough(ids.numel(), seqlen, what)
    count = n // seqlen
    rng = random.Random(seed)
    order = list(range(count))
    rng.shuffle(order)
    if samples > count:
        msg = (
            f"{what} has {n} tokens, enough for {count} windows of {seqlen} without overlap; "
            f"{samples} were asked for, so windows are reused ({samples - count} repeats)"
        )
        warnings.warn(msg, stacklevel=3)
        logger.warning(msg)
        order = [order[i % count] for i in range(samples)]
    return torch.stack([ids[i * seqlen : (i + 1) * seqlen] for i in order[:samples]]).long()


def check_enough(n: int, seqlen: int, what: str) -> int:
    """``n`` (the stream's tokens), refused when it holds no window of ``seqlen``."""
    if n == 0:
        raise CalibDataError(f"{what} holds no text")
    if n < seqlen:
        raise CalibDataError(
            f"{what} has only {n} tokens, one window needs {seqlen}: use --calib-seqlen {n} or less, or more data"
        )
    return n
