"""Calibration windows: ``[samples, seqlen]`` token ids from a named dataset, a local file, the
built-in corpus, or text the model writes itself. Offline only: nothing is downloaded.

Named datasets are sampled as LMDeploy's ``lite/utils/calib_dataloader.py`` samples them (same
``random.seed(seed)`` / ``randint`` sequence, so the same files and tokenizer give the same windows):

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

import logging
import random
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

ASSETS_DIR = Path(__file__).resolve().parent.parent / "assets"
BUILTIN_CORPUS = ASSETS_DIR / "calib" / "builtin_corpus.jsonl"

NAMED_DATASETS = ("c4", "wikitext2", "ptb", "pileval")
SPECIAL_DATASETS = ("builtin", "self")
VALID_DATASETS = NAMED_DATASETS + SPECIAL_DATASETS
FILE_EXTENSIONS = (".txt", ".jsonl", ".json", ".parquet")
PILEVAL_MAX_DOC_TOKENS = 512  # LMDeploy/AWQ skip longer pile documents


class CalibDataError(ValueError):
    """Calibration data that is missing, empty or too short; the message is one line saying what to do."""


class CalibCancelled(Exception):
    """The run was cancelled (a progress callback returned False); nothing was written."""


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

# Data-free calibration: the model writes its own text from these (seeded sampling).
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
    the path of a ``.txt`` / ``.jsonl`` / ``.json`` / ``.parquet`` file (``text`` field or column).
    ``model``: needed for ``self``; when given, ``seqlen`` is checked against its max positions.
    ``progress(fraction, message)``: called while ``self`` generates; returning False cancels.
    """
    if samples < 1 or seqlen < 1:
        raise CalibDataError(f"samples and seqlen must be at least 1 (got samples={samples}, seqlen={seqlen})")
    if model is not None:
        check_seqlen(seqlen, model)
    name = str(dataset).strip()
    key = name.lower()
    if key in SOURCES:
        return _named(key, tokenizer, samples, seqlen, seed, data_dir)
    if key == "builtin":
        return _builtin(tokenizer, samples, seqlen, seed)
    if key == "self":
        if model is None:
            raise CalibDataError("dataset 'self' (data-free) needs the model to generate text: pass model=")
        return _self_generated(model, tokenizer, samples, seqlen, seed, progress)
    path = Path(name).expanduser()
    if path.is_file():
        return _local_file(path, tokenizer, samples, seqlen, seed)
    if path.is_dir():
        raise CalibDataError(
            f"{path} is a folder: pass one data file ({', '.join(FILE_EXTENSIONS)}), or a dataset name with "
            f"--calib-data-dir {path}"
        )
    if path.suffix.lower() in FILE_EXTENSIONS or "/" in name or "\\" in name:
        raise CalibDataError(f"calibration file {path} not found")
    raise CalibDataError(
        f"unknown calibration dataset {name!r}: use one of {', '.join(VALID_DATASETS)}, "
        f"or the path of a {', '.join(FILE_EXTENSIONS)} file"
    )


def check_seqlen(seqlen: int, model: Any) -> None:
    """Raise when ``seqlen`` is beyond the model's max positions."""
    config = getattr(model, "config", None)
    config = getattr(config, "text_config", None) or config
    limit = getattr(config, "max_position_embeddings", None)
    if isinstance(limit, int) and seqlen > limit:
        raise CalibDataError(
            f"seqlen {seqlen} is beyond the model's max positions ({limit}): use --calib-seqlen {limit} or less"
        )


# --- sampling ----------------------------------------------------------------------------------------


def random_windows(ids: torch.Tensor, samples: int, seqlen: int, seed: int, what: str) -> torch.LongTensor:
    """LMDeploy's windows over one token stream: ``random.seed(seed)``, start = ``randint(0, n - seqlen)``."""
    n = _check_enough(ids.numel(), seqlen, what)
    rng = random.Random(seed)
    starts = [rng.randint(0, n - seqlen) for _ in range(samples)]
    return torch.stack([ids[s : s + seqlen] for s in starts]).long()


def disjoint_windows(ids: torch.Tensor, samples: int, seqlen: int, seed: int, what: str) -> torch.LongTensor:
    """``samples`` non-overlapping windows in random (seeded) order; reuses windows, with a warning, when
    the stream holds fewer."""
    n = _check_enough(ids.numel(), seqlen, what)
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


def _check_enough(n: int, seqlen: int, what: str) -> int:
    if n == 0:
        raise CalibDataError(f"{what} holds no text")
    if n < seqlen:
        raise CalibDataError(
            f"{what} has only {n} tokens, one window needs {seqlen}: use --calib-seqlen {n} or less, or more data"
        )
    return n


def _tokenize(tokenizer: Any, text: str) -> torch.Tensor:
    if tokenizer is None:
        raise CalibDataError("a tokenizer is needed to tokenize calibration text (or pass pre-tokenized windows)")
    ids = tokenizer(text, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


# --- named datasets (c4, wikitext2, ptb, pileval) ----------------------------------------------------


def _named(name: str, tokenizer: Any, samples: int, seqlen: int, seed: int, data_dir: str | Path | None):
    if tokenizer is None:
        raise CalibDataError(f"a tokenizer is needed to tokenize {name} (or pass pre-tokenized windows)")
    rows = _load_named(name, data_dir)
    field = SOURCES[name].field
    if name == "c4":
        return _c4_windows(rows, field, tokenizer, samples, seqlen, seed)
    if name == "pileval":
        return _pileval_windows(rows, field, tokenizer, samples, seqlen, seed)
    texts = rows[field] if not isinstance(rows, list) else rows
    ids = _tokenize(tokenizer, "\n\n".join(texts))
    return random_windows(ids, samples, seqlen, seed, f"{name} (train)")


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
            ids = _tokenize(tokenizer, rows[i][field])
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


def _load_named(name: str, data_dir: str | Path | None):
    """The train rows of a named dataset, from data_dir or the local HF cache; never the network."""
    src = SOURCES[name]
    if data_dir is not None:
        d = Path(data_dir).expanduser()
        if not d.is_dir():
            raise CalibDataError(f"--calib-data-dir {d} is not a folder: {_where_hint(name, d)}")
        for rel in src.local_names:
            if (d / rel).is_file():
                return _read_data_file(d / rel, name, src.field)
    cached = _hub_cached(src.hub)
    if cached is not None:
        return _read_data_file(cached, name, src.field)
    rows = _datasets_offline_cache(src)
    if rows is not None:
        return rows
    where = _where_hint(name, None if data_dir is None else Path(data_dir))
    raise CalibDataError(f"{name} is not available offline: {where}")


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
        f"while online (file {src.hub.path} of dataset {src.hub.repo_ids[0]})"
    )


def hub_cache_dir() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


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


def _datasets_offline_cache(src: NamedSource):
    """``datasets``' processed cache, only when the user runs with ``HF_DATASETS_OFFLINE=1`` (no network then),
    asked for as LMDeploy asks for it."""
    try:
        import datasets

        if not datasets.config.HF_HUB_OFFLINE:
            return None
    except ImportError:
        return None
    for repo_id in src.hub.repo_ids:
        kwargs = {}
        if src.hub.path.endswith(".json.gz"):  # c4: one shard, as LMDeploy loads it
            kwargs["data_files"] = {src.hub_split: src.hub.path}
        try:
            return datasets.load_dataset(repo_id, src.hub_config, split=src.hub_split, **kwargs)
        except Exception:  # not cached under this name: try the next, then the "where to put it" error
            continue
    return None


def _read_data_file(path: Path, name: str, field: str):
    """Rows (a ``datasets.Dataset``, or a list of strings for plain text) of one data file."""
    suffixes = "".join(path.suffixes[-2:]).lower()
    if path.stat().st_size == 0:
        raise CalibDataError(f"{path} is empty")
    if path.suffix.lower() in (".txt", ".raw"):
        text = path.read_text(encoding="utf-8", errors="replace")
        if name == "ptb":  # LMDeploy joins the ptb sentences with "\n\n"
            return [line.strip() for line in text.splitlines() if line.strip()]
        return [text]
    if suffixes.endswith((".json.gz", ".jsonl.gz", ".json", ".jsonl", ".jsonl.zst", ".json.zst")):
        return _load_rows("json", path, field)
    if path.suffix.lower() == ".parquet":
        return _load_rows("parquet", path, field)
    raise CalibDataError(f"{path}: unsupported file type for {name}")


def _load_rows(builder: str, path: Path, field: str):
    import datasets

    try:
        rows = datasets.load_dataset(builder, data_files=str(path), split="train")
    except ImportError as exc:  # e.g. .zst without the zstandard package
        raise CalibDataError(f"cannot read {path}: {exc} (or decompress it first)") from None
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise CalibDataError(f"cannot read {path} as {builder} ({first})") from None
    if field not in rows.column_names:
        raise CalibDataError(f"{path} has no {field!r} field (it has: {', '.join(rows.column_names) or 'none'})")
    kind = getattr(rows.features[field], "dtype", type(rows.features[field]).__name__)
    if kind not in ("string", "large_string"):
        raise CalibDataError(f"{path}: the {field!r} field holds {kind}, not text")
    if len(rows) == 0:
        raise CalibDataError(f"{path} is empty")
    return rows


# --- a local file --------------------------------------------------------------------------------------


def _local_file(path: Path, tokenizer: Any, samples: int, seqlen: int, seed: int) -> torch.LongTensor:
    text = read_text_file(path)
    ids = _tokenize(tokenizer, text)
    return random_windows(ids, samples, seqlen, seed, str(path))


def read_text_file(path: str | Path, field: str = "text") -> str:
    """The text of a ``.txt``, ``.jsonl``/``.json`` (``text`` field) or ``.parquet`` (``text`` column) file."""
    path = Path(path)
    ext = path.suffix.lower()
    if ext not in FILE_EXTENSIONS:
        raise CalibDataError(
            f"unsupported calibration file type {ext or '(none)'} for {path}: use {', '.join(FILE_EXTENSIONS)}"
        )
    if path.stat().st_size == 0:
        raise CalibDataError(f"calibration file {path} is empty")
    if ext == ".txt":
        text = path.read_text(encoding="utf-8", errors="replace")
    else:
        rows = _load_rows("json" if ext in (".jsonl", ".json") else "parquet", path, field)
        text = "\n\n".join(t for t in rows[field] if t)
    if not text.strip():
        raise CalibDataError(f"calibration file {path} is empty (no text)")
    return text


# --- builtin ------------------------------------------------------------------------------------------


def _builtin(tokenizer: Any, samples: int, seqlen: int, seed: int) -> torch.LongTensor:
    if not BUILTIN_CORPUS.is_file():
        raise CalibDataError(
            f"the built-in calibration corpus {BUILTIN_CORPUS} is missing: restore it from the repository"
        )
    text = read_text_file(BUILTIN_CORPUS)
    ids = _tokenize(tokenizer, text)
    return disjoint_windows(ids, samples, seqlen, seed, "the built-in corpus")


# --- self: data-free -----------------------------------------------------------------------------------


@torch.no_grad()
def _self_generated(
    model: Any, tokenizer: Any, samples: int, seqlen: int, seed: int, progress: Progress | None
) -> torch.LongTensor:
    """The model writes text (top-p sampling, seeded) from :data:`SELF_PROMPTS` until there are
    ``samples * seqlen`` tokens; prompts and answers are concatenated and cut into consecutive windows."""
    if tokenizer is None:
        raise CalibDataError("dataset 'self' needs the model's tokenizer")
    need = samples * seqlen
    if not hasattr(model, "generate"):  # a LoadedModel: the transformers model is .model
        model = model.model
    device = next(model.parameters()).device
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None) or 2048
    stream: list[int] = []
    prompts = [_prompt_ids(tokenizer, p) for p in SELF_PROMPTS]
    fork_devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=fork_devices):
        torch.manual_seed(seed)
        turn = stalled = 0
        while len(stream) < need:
            if stalled > 2 * len(prompts):
                raise CalibDataError("dataset 'self': the model writes no text (it ends every answer at once)")
            before = len(stream)
            prompt = prompts[turn % len(prompts)]
            turn += 1
            left = need - len(stream)
            max_new = max(16, min(1024, limit - len(prompt), left))
            k = max(1, min(16, -(-left // max_new)))
            inp = torch.tensor([prompt], dtype=torch.long, device=device)
            out = model.generate(
                input_ids=inp, attention_mask=torch.ones_like(inp), do_sample=True, top_p=0.95, top_k=0,
                temperature=1.0, max_new_tokens=max_new, num_return_sequences=k, pad_token_id=pad,
            )
            for row in out[:, inp.shape[1] :].tolist():
                if eos is not None and eos in row:
                    row = row[: row.index(eos)]
                if len(row) < 8:  # an empty answer adds only the prompt again
                    continue
                stream.extend(prompt + row + ([eos] if eos is not None else []))
            if progress is not None:
                done = min(len(stream), need) / need
                if progress(done, f"self: the model wrote {min(len(stream), need)}/{need} tokens") is False:
                    raise CalibCancelled("calibration cancelled while the model was writing its calibration text")
            stalled = stalled + 1 if len(stream) == before else 0
    ids = torch.tensor(stream[:need], dtype=torch.long)
    return ids.view(samples, seqlen).clone()


def _prompt_ids(tokenizer: Any, prompt: str) -> list[int]:
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True
        )
        if hasattr(ids, "keys"):  # a BatchEncoding in newer transformers
            ids = ids["input_ids"]
        return list(ids)
    return list(tokenizer(prompt)["input_ids"])


def iter_sources() -> Iterable[tuple[str, NamedSource]]:
    """(name, source) of the named datasets, for UIs that list where each one is expected."""
    return SOURCES.items()
