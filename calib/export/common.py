"""What every export format shares: the error users see, writing the output, the scale floor and its
warning, templates."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from string import Template

import torch

from kvcache.quant import SCALE_EPS

from ..errors import ExportError

FORMAT_VERSION = 1
GRANULARITIES = ("tensor", "head", "channel")
TEMPLATES = Path(__file__).with_name("templates")


__all__ = ["FORMAT_VERSION", "GRANULARITIES", "ExportError", "floor_scale", "now", "render", "warn_floored", "writing"]


@contextlib.contextmanager
def writing(out_dir: str | Path) -> Iterator[None]:
    """A folder that cannot be written (permissions, a full disk, a file in the way) is an :class:`ExportError`."""
    try:
        yield
    except OSError as exc:
        raise ExportError(f"cannot write {out_dir} ({exc.strerror or exc}): check it is a folder you can write "
                          "with free space, or choose another OUT_DIR") from exc


def floor_scale(scale: torch.Tensor, floored: list[str], where: str) -> torch.Tensor:
    """A scalar scale, raised to ``SCALE_EPS`` (and ``where`` noted) when the range was zero."""
    if scale.item() < SCALE_EPS:
        floored.append(where)
        return torch.tensor(SCALE_EPS)
    return scale


def warn_floored(floored: list[str]) -> None:
    """One warning naming the floored layers: a constant K/V usually means too few calibration tokens."""
    if floored:
        shown = ", ".join(floored[:12]) + (f" and {len(floored) - 12} more" if len(floored) > 12 else "")
        warnings.warn(
            f"zero range (a constant K/V) in {shown}: scale floored at {SCALE_EPS:g}; "
            "check the calibration saw enough tokens",
            stacklevel=3,
        )


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def render(template: str, **values: object) -> str:
    """``templates/<template>`` with ``$name`` placeholders filled (markdown keeps its braces)."""
    return Template((TEMPLATES / template).read_text(encoding="utf-8")).substitute(values)
