"""Reading calibration data files, with one rule for which file types are accepted.

A user's own file (``--calib-dataset PATH``) and a named dataset's file (in ``--calib-data-dir`` or the
HF hub cache) are read the same way: plain text, JSON lines / JSON (optionally ``.gz`` or ``.zst``
compressed, through ``datasets``' json builder), or parquet; the text is in one field or column.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import CalibDataError

# Accepted name endings, and how each is read. Compressed JSON is read by datasets (``.zst``: zstandard).
FILE_TYPES = {
    ".txt": "text", ".raw": "text",
    ".jsonl": "json", ".json": "json", ".jsonl.gz": "json", ".json.gz": "json", ".jsonl.zst": "json",
    ".json.zst": "json",
    ".parquet": "parquet",
}
FILE_EXTENSIONS = tuple(FILE_TYPES)


def file_kind(path: str | Path) -> str | None:
    """``"text"``, ``"json"`` or ``"parquet"`` by the name's ending (longest first), None when not accepted."""
    name = Path(path).name.lower()
    for ending in sorted(FILE_TYPES, key=len, reverse=True):
        if name.endswith(ending) and len(name) > len(ending):
            return FILE_TYPES[ending]
    return None


def describe_types() -> str:
    return ", ".join(FILE_EXTENSIONS)


def check_file_type(path: Path) -> str:
    """The file's kind; refused (one line) when its type is not accepted."""
    kind = file_kind(path)
    if kind is None:
        ext = path.suffix or "(none)"
        raise CalibDataError(f"unsupported calibration file type {ext} for {path}: use {describe_types()}")
    return kind


def read_rows(path: Path, field: str, *, lines: bool = False) -> Any:
    """Rows of one data file: a ``datasets.Dataset`` (JSON, parquet) or a list of strings (plain text: the
    whole text, or its non-empty lines with ``lines``)."""
    kind = check_file_type(path)
    if path.stat().st_size == 0:
        raise CalibDataError(f"calibration file {path} is empty")
    if kind == "text":
        text = path.read_text(encoding="utf-8", errors="replace")
        return [line.strip() for line in text.splitlines() if line.strip()] if lines else [text]
    return load_rows(kind, path, field)


def read_text_file(path: str | Path, field: str = "text") -> str:
    """The text of one data file: a text file as it is, else the ``field`` of its rows joined by blank lines."""
    path = Path(path)
    rows = read_rows(path, field)
    text = rows[0] if isinstance(rows, list) else "\n\n".join(t for t in rows[field] if t)
    if not text.strip():
        raise CalibDataError(f"calibration file {path} is empty (no text)")
    return text


def load_rows(builder: str, path: Path, field: str) -> Any:
    """``datasets.load_dataset(builder)`` on one file, refused unless ``field`` holds text."""
    import datasets

    try:
        rows = datasets.load_dataset(builder, data_files=str(path), split="train")
    except ImportError as exc:  # e.g. .zst without the zstandard package
        raise CalibDataError(f"cannot read {path}: {exc} (or decompress it first)") from None
    except Exception as exc:  # datasets raises many types for a file it cannot parse; all mean the same here
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
