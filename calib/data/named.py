"""The named datasets (c4, wikitext2, ptb, pileval), offline only, sampled as LMDeploy samples them.

LMDeploy's ``lite/utils/calib_dataloader.py`` (same ``random.seed(seed)`` / ``randint`` sequence, so the
same files and tokenizer give the same windows):

* ``c4``: a random document with at least ``seqlen`` tokens, then a random window of it, per sample.
* ``wikitext2`` / ``ptb``: the train split joined with ``"\\n\\n"``, tokenized once, random windows.
* ``pileval``: shuffled documents of at most 512 tokens, concatenated and cut into consecutive windows
  (LMDeploy stops after ``samples`` documents and may return fewer windows; we read on until there
  are ``samples`` windows).

The data is looked for in ``data_dir`` (``--calib-data-dir``) first, then in the local Hugging Face hub
cache (where ``hf download`` and ``datasets.load_dataset`` put it); with ``HF_DATASETS_OFFLINE=1`` set,
``datasets``' own processed cache is tried too. When it is not there, :class:`CalibDataError` says which
file to put where.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import CalibDataError
from .files import read_rows
from .windows import random_windows, tokenize

PILEVAL_MAX_DOC_TOKENS = 512  # LMDeploy/AWQ skip longer pile documents


@dataclass(frozen=True)
class HubFile:
    """One file of a Hugging Face dataset repo, as ``hf download`` would cache it."""

    repo_ids: tuple[str, ...]  # the canonical id first, then older aliases the hub cache may use
    path: str
    revision: str = "main"

    @property
    def download_cmd(self) -> str:
        rev = f" --revision {self.revision}" if self.revision != "main" else ""
        return f"`hf download {self.repo_ids[0]} {self.path} --repo-type dataset{rev}`"


@dataclass(frozen=True)
class NamedSource:
    """Where a named dataset's train split lives and which file names we accept in ``data_dir``."""

    hub: HubFile
    local_names: tuple[str, ...]  # relative to data_dir, preferred first
    field: str  # the text column
    hub_config: str | None = None  # for datasets' own cache (HF_DATASETS_OFFLINE=1)
    hub_split: str = "train"


SOURCES: dict[str, NamedSource] = {
    "c4": NamedSource(
        HubFile(("allenai/c4",), "en/c4-train.00000-of-01024.json.gz"),
        ("c4-train.00000-of-01024.json.gz", "en/c4-train.00000-of-01024.json.gz", "c4-train.00000-of-01024.json"),
        "text",
    ),
    "wikitext2": NamedSource(
        HubFile(("Salesforce/wikitext", "wikitext"), "wikitext-2-raw-v1/train-00000-of-00001.parquet"),
        ("wikitext-2-raw-v1/train-00000-of-00001.parquet", "train-00000-of-00001.parquet", "wiki.train.raw",
         "wiki.train.txt"),
        "text",
        hub_config="wikitext-2-raw-v1",
    ),
    "ptb": NamedSource(
        HubFile(("ptb-text-only/ptb_text_only", "ptb_text_only"), "penn_treebank/train/0000.parquet",
                revision="refs/convert/parquet"),
        ("ptb.train.txt", "penn_treebank/train/0000.parquet"),
        "sentence",
        hub_config="penn_treebank",
    ),
    "pileval": NamedSource(
        HubFile(("mit-han-lab/pile-val-backup",), "val.jsonl.zst"),
        ("val.jsonl.zst", "val.jsonl"),
        "text",
        hub_split="validation",
    ),
}
NAMED_DATASETS = tuple(SOURCES)


def named_windows(
    name: str, tokenizer: Any, samples: int, seqlen: int, seed: int, data_dir: str | Path | None
) -> torch.LongTensor:
    """``[samples, seqlen]`` windows of the named dataset ``name``, sampled as LMDeploy samples it."""
    if tokenizer is None:
        raise CalibDataError(f"a tokenizer is needed to tokenize {name} (or pass pre-tokenized windows)")
    rows = _load_named(name, data_dir)
    field = SOURCES[name].field
    if name == "c4":
        return _c4_windows(rows, field, tokenizer, samples, seqlen, seed)
    if name == "pileval":
        return _pileval_windows(rows, field, tokenizer, samples, seqlen, seed)
    texts = rows[field] if not isinstance(rows, list) else rows
    ids = tokenize(tokenizer, "\n\n".join(texts))
    return random_windows(ids, samples, seqlen, seed, f"{name} (train)")


def check_available(name: str, data_dir: str | Path | None) -> None:
    """Refuse, before anything heavy runs, a named dataset that is not on this machine (a file lookup only)."""
    if _locate(SOURCES[name], name, data_dir) is None and not _datasets_offline():
        raise CalibDataError(f"{name} is not available offline: {_where_hint(name, _as_dir(data_dir))}")


def hub_cache_dir() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


# --- sampling ---------------------------------------------------------------------------------------


def _c4_windows(rows, field: str, tokenizer: Any, samples: int, seqlen: int, seed: int) -> torch.LongTensor:
    """LMDeploy's get_c4: a random document with >= seqlen tokens, a random window in it, per sample."""
    rng = random.Random(seed)
    n_docs = len(rows)
    too_short: set[int] = set()
    out = []
    for _ in range(samples):
        while True:
            if len(too_short) >= n_docs:
                raise CalibDataError(
                    f"no c4 document has {seqlen} tokens or more (all {n_docs} checked): use a shorter --calib-seqlen"
                )
            i = rng.randint(0, n_docs - 1)
            if i in too_short:
                continue
            ids = tokenize(tokenizer, rows[i][field])
            if ids.numel() >= seqlen:
                break
            too_short.add(i)
        start = rng.randint(0, ids.numel() - seqlen)
        out.append(ids[start : start + seqlen])
    return torch.stack(out).long()


def _pileval_windows(rows, field: str, tokenizer: Any, samples: int, seqlen: int, seed: int) -> torch.LongTensor:
    """Shuffled documents of <= 512 tokens, concatenated, cut into consecutive windows."""
    need = samples * seqlen
    pieces, have = [], 0
    for row in rows.shuffle(seed=seed) if hasattr(rows, "shuffle") else rows:
        line = (row[field] or "").strip()
        if not line:
            continue
        ids = tokenizer.encode(line)
        if len(ids) > PILEVAL_MAX_DOC_TOKENS or not ids:
            continue
        pieces.append(torch.tensor(ids, dtype=torch.long))
        have += len(ids)
        if have >= need:
            break
    if have < need:
        raise CalibDataError(
            f"pileval has only {have} tokens in documents of <= {PILEVAL_MAX_DOC_TOKENS} tokens, "
            f"{samples} x {seqlen} = {need} are needed: use fewer --calib-samples or a shorter --calib-seqlen"
        )
    ids = torch.cat(pieces)
    return ids[:need].view(samples, seqlen).clone()


# --- finding the data, offline ------------------------------------------------------------------------


def _as_dir(data_dir: str | Path | None) -> Path | None:
    return None if data_dir is None else Path(data_dir).expanduser()


def _locate(src: NamedSource, name: str, data_dir: str | Path | None) -> Path | None:
    """The dataset's file in ``data_dir`` (a folder, else refused) or in the local hub cache; None if neither."""
    d = _as_dir(data_dir)
    if d is not None:
        if not d.is_dir():
            raise CalibDataError(f"--calib-data-dir {d} is not a folder: {_where_hint(name, d)}")
        for rel in src.local_names:
            if (d / rel).is_file():
                return d / rel
    return _hub_cached(src.hub)


def _load_named(name: str, data_dir: str | Path | None):
    """The train rows of a named dataset, from data_dir or the local HF cache; never the network."""
    src = SOURCES[name]
    path = _locate(src, name, data_dir)
    if path is not None:
        return read_rows(path, src.field, lines=name == "ptb")  # LMDeploy joins the ptb sentences with "\n\n"
    rows = _datasets_offline_cache(src)
    if rows is not None:
        return rows
    raise CalibDataError(f"{name} is not available offline: {_where_hint(name, _as_dir(data_dir))}")


def _where_hint(name: str, data_dir: Path | None) -> str:
    """Both ways to make ``name`` available: a file in --calib-data-dir, or the local HF hub cache."""
    src = SOURCES[name]
    first = src.local_names[0]
    others = ", ".join(src.local_names[1:])
    also = f"; also accepted: {others}" if others else ""
    if data_dir is None:
        local = f"put {first} into a folder and pass --calib-data-dir DIR (DIR/{first}{also})"
    else:
        local = f"put {first} into --calib-data-dir {data_dir} ({data_dir / first}{also})"
    return (
        f"{local}, or put it into the local Hugging Face cache ({hub_cache_dir()}) with {src.hub.download_cmd} "
        f"while online (file {src.hub.path} of dataset {src.hub.repo_ids[0]}); or calibrate offline now on the "
        "built-in corpus: --calib-dataset builtin"
    )


def _hub_cached(hub: HubFile) -> Path | None:
    """The file's path in the local hub cache, if ``hf download`` / ``datasets`` put it there (no network)."""
    from huggingface_hub import try_to_load_from_cache

    for repo_id in hub.repo_ids:
        try:
            found = try_to_load_from_cache(repo_id, hub.path, revision=hub.revision, repo_type="dataset")
        except Exception:  # a damaged cache is the same as no cache here
            continue
        if isinstance(found, str) and Path(found).is_file():
            return Path(found)
    return None


def _datasets_offline() -> bool:
    """Whether the user runs with ``HF_DATASETS_OFFLINE=1``: only then is ``datasets``' own cache asked."""
    try:
        import datasets
    except ImportError:
        return False
    return bool(datasets.config.HF_HUB_OFFLINE)


def _datasets_offline_cache(src: NamedSource):
    """``datasets``' processed cache (no network then), asked for as LMDeploy asks for it."""
    if not _datasets_offline():
        return None
    import datasets

    for repo_id in src.hub.repo_ids:
        kwargs = {}
        if src.hub.path.endswith(".json.gz"):  # c4: one shard, as LMDeploy loads it
            kwargs["data_files"] = {src.hub_split: src.hub.path}
        try:
            return datasets.load_dataset(repo_id, src.hub_config, split=src.hub_split, **kwargs)
        except Exception:  # not cached under this name: try the next, then the "where to put it" error
            continue
    return None
