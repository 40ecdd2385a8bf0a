"""What every benchmark writes beside its table: one JSON file of run metadata and result rows."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any


def write_json(path: Path, meta: dict[str, Any], rows: list[dict[str, Any]], started: float) -> None:
    """Write ``{"meta": ..., "results": rows}`` to ``path``, stamping the run's duration and date."""
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {**meta, "seconds": round(time.time() - started, 1), "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    path.write_text(json.dumps(dict(meta=meta, results=rows), indent=1))
    print(f"wrote {path}")
