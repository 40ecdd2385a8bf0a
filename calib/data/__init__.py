"""Calibration windows: ``[samples, seqlen]`` token ids from a named dataset, a local file, the
built-in corpus, or text the model writes itself. Offline only: nothing is downloaded.

* :mod:`.named`: c4, wikitext2, ptb, pileval, found in ``--calib-data-dir`` or the local HF cache and
  sampled as LMDeploy samples them.
* :mod:`.files`: the one rule for which data files are read, and how.
* :mod:`.self_written`: ``self``, text the model writes through the engine's scheduler.
* :mod:`.windows`: cutting a token stream into windows.

:func:`check_dataset` runs the checks that need no model, so a front end can refuse a bad name or a
missing file before it loads one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from kvcache.config import ASSETS
from kvcache.models.variants import check_window, context_limit

# CalibCancelled: raised by 'self' (in .self_written), importable from here as callers do.
from ..errors import CalibCancelled, CalibDataError
from .files import FILE_EXTENSIONS, check_file_type, describe_types, read_text_file
from .named import (
    NAMED_DATASETS,
    SOURCES,
    NamedSource,
    check_available,
    hub_cache_dir,
    named_windows,
)
from .self_written import SELF_PROMPTS, self_written_windows
from .windows import disjoint_windows, random_windows, tokenize

__all__ = [
    "BUILTIN_CORPUS",
    "FILE_EXTENSIONS",
    "NAMED_DATASETS",
    "SELF_PROMPTS",
    "SOURCES",
    "SPECIAL_DATASETS",
    "VALID_DATASETS",
    "CalibCancelled",
    "CalibDataError",
    "check_dataset",
    "check_seqlen",
    "disjoint_windows",
    "hub_cache_dir",
    "iter_sources",
    "load_calib_windows",
    "random_windows",
    "read_text_file",
]

BUILTIN_CORPUS = ASSETS / "calib" / "builtin_corpus.jsonl"
SPECIAL_DATASETS = ("builtin", "self")
VALID_DATASETS = NAMED_DATASETS + SPECIAL_DATASETS

Progress = Callable[[float, str], Any]


def load_calib_windows(
    dataset: str,
    tokenizer: Any,
    samples: int,
    seqlen: int,
    seed: int = 0,
    data_dir: str | Path | None = None,
    model: Any = None,
    progress: Progress | None = None,
) -> torch.LongTensor:
    """``[samples, seqlen]`` token ids for calibration.

    ``dataset``: ``c4``, ``wikitext2``, ``ptb``, ``pileval`` (local only: ``data_dir`` or the HF cache),
    ``builtin`` (the bundled Chinese+English corpus), ``self`` (the ``model`` writes its own text), or
    the path of a data file (see :data:`FILE_EXTENSIONS`; the ``text`` field or column).
    ``model``: needed for ``self``; when given, ``seqlen`` is checked against its max positions.
    ``progress(fraction, message)``: called while ``self`` generates; returning False cancels.
    """
    if samples < 1 or seqlen < 1:
        raise CalibDataError(f"samples and seqlen must be at least 1 (got samples={samples}, seqlen={seqlen})")
    if model is not None:
        check_seqlen(seqlen, model)
    kind, key = _resolve(dataset)
    if kind == "named":
        return named_windows(key, tokenizer, samples, seqlen, seed, data_dir)
    if kind == "builtin":
        return _builtin(tokenizer, samples, seqlen, seed)
    if kind == "self":
        if model is None:
            raise CalibDataError("dataset 'self' (data-free) needs the model to generate text: pass model=")
        return self_written_windows(model, tokenizer, samples, seqlen, seed, progress)
    path = Path(key)
    return random_windows(tokenize(tokenizer, read_text_file(path)), samples, seqlen, seed, str(path))


def check_dataset(dataset: str, data_dir: str | Path | None = None) -> None:
    """Refuse a dataset that cannot be read, without loading it: an unknown name, a missing or unsupported
    file, a named dataset not on this machine, a missing built-in corpus."""
    kind, key = _resolve(dataset)
    if kind == "named":
        check_available(key, data_dir)
    elif kind == "builtin":
        _check_builtin()
    elif kind == "file":
        check_file_type(Path(key))


def check_seqlen(seqlen: int, model: Any) -> None:
    """Raise when ``seqlen`` is beyond the model's max positions."""
    config = getattr(model, "config", None)
    check_window(config, seqlen, "--calib-seqlen")
    limit = context_limit(config)
    if isinstance(limit, int) and seqlen > limit:
        raise CalibDataError(
            f"seqlen {seqlen} is beyond the model's max positions ({limit}): use --calib-seqlen {limit} or less"
        )


def iter_sources() -> Iterable[tuple[str, NamedSource]]:
    """(name, source) of the named datasets, for UIs that list where each one is expected."""
    return SOURCES.items()


def _resolve(dataset: str) -> tuple[str, str]:
    """(kind, key): ``("named", "c4")``, ``("builtin", ...)``, ``("self", ...)`` or ``("file", path)``."""
    name = str(dataset).strip()
    key = name.lower()
    if key in SOURCES:
        return "named", key
    if key in SPECIAL_DATASETS:
        return key, key
    path = Path(name).expanduser()
    if path.is_file():
        return "file", str(path)
    if path.is_dir():
        raise CalibDataError(
            f"{path} is a folder: pass one data file ({describe_types()}), or a dataset name with "
            f"--calib-data-dir {path}"
        )
    if path.suffix or "/" in name or "\\" in name:
        raise CalibDataError(f"calibration file {path} not found")
    raise CalibDataError(
        f"unknown calibration dataset {name!r}: use one of {', '.join(VALID_DATASETS)}, "
        f"or the path of a {describe_types()} file"
    )


def _check_builtin() -> None:
    if not BUILTIN_CORPUS.is_file():
        raise CalibDataError(
            f"the built-in calibration corpus {BUILTIN_CORPUS} is missing: restore it from the repository"
        )


def _builtin(tokenizer: Any, samples: int, seqlen: int, seed: int) -> torch.LongTensor:
    _check_builtin()
    ids = tokenize(tokenizer, read_text_file(BUILTIN_CORPUS))
    return disjoint_windows(ids, samples, seqlen, seed, "the built-in corpus")
