"""What ``python -m kvcache modes`` prints: each mode's bits and bytes for one model, as a table or as JSON.

Both views take their figures from the same mode methods (bits over the model's own layers, boundary layers left
in 16 bits counted), so the table and ``--json`` never disagree.
"""

from __future__ import annotations

from typing import Any

from ..codec import OUR_ENGINE, SEQUENCE_TOKENS, KVMode
from ..engines import engine_order
from ..errors import ModeError, one_line
from ..shape import KVShape
from .text_table import text_table

MODES_COLUMNS = ("mode", "K bits", "V bits", "calibration", "bytes/token", "+ per sequence", "+ per pool",
                 "B/token at 2,048", "x fp16", "codecs", "turn it on")


def mode_row(mode: KVMode, shape: KVShape) -> tuple[str, ...]:
    """One mode of the listing: mean bits over the model's layers (16-bit boundary layers counted), the marginal
    bytes, what a sequence costs once (fp16 sinks, a 16-bit residual window) and a pool once (static parameters,
    maps, codebooks), and a 2,048-token sequence's bytes per token (its own costs spread over it) and ratio to fp16."""
    try:
        mode.check_shape(shape)
    except ModeError as exc:
        return (mode.name, *["-"] * 8, one_line(exc), mode.serve)
    k, v = mode.bits_for(shape.num_layers)
    once, pool = mode.sink_bytes(shape) + mode.residual_bytes(shape), mode.static_param_bytes(shape)
    why = ", ".join(w for w in (f"{mode.sink_tokens} sinks" if mode.sink_tokens else "",
                                f"{mode.residual}-token window" if mode.residual else "") if w)
    return (mode.name, f"{k:.3g}", f"{v:.3g}", "--qparams" if mode.needs_qparams else "-",
            f"{mode.bytes_per_token(shape):,}", f"{once:,} ({why})" if once else "-",
            f"{pool:,}" if pool else "-",
            f"{mode.bytes_per_token_at(shape, SEQUENCE_TOKENS):,.0f}",
            f"{mode.ratio_to_fp16(shape, SEQUENCE_TOKENS):.3f}",
            mode.describe_codecs(), mode.serve)


def format_modes_by_engine(modes: list[KVMode], shape: KVShape) -> str:
    """The modes as one table, grouped by engine: ours first, then the serving engines in their package's order."""
    groups = engine_order(m.engine for m in modes)
    ordered = [m for engine in groups for m in modes if m.engine == engine]
    lines = text_table([MODES_COLUMNS, *(mode_row(m, shape) for m in ordered)]).splitlines()
    out, previous = lines[:1], None
    for mode, line in zip(ordered, lines[1:]):
        if mode.engine != previous:
            count = sum(m.engine == mode.engine for m in ordered)
            out += ["", f"{mode.engine + ' (ours)' if mode.engine == OUR_ENGINE else mode.engine}: {count} mode{'s' * (count > 1)}"]
            previous = mode.engine
        out.append(line)
    return "\n".join(out)


def _bits(x: float) -> int | float:
    return int(x) if x == int(x) else round(x, 3)


def mode_facts(modes: list[KVMode], config: Any, tokens: int = SEQUENCE_TOKENS) -> list[dict[str, Any]]:
    """What ``python -m kvcache modes --json`` prints, one object per mode, for the model of ``config``.

    ``k_bits`` / ``v_bits``: mean bits over the model's layers, as in the text listing (layers a mode leaves in
    16 bits counted);
    ``bytes_per_token``: codes and per-token parameters of one token, all layers and KV heads;
    ``window_bytes_per_sequence``: a full 16-bit window of ``window_tokens`` beyond its codes;
    ``ratio_to_fp16``: a ``tokens``-long sequence's bytes (its fp16 sink tokens and full window included) over fp16's.
    """
    shape = KVShape.from_config(config)
    return [dict(name=m.name, **dict(zip(("k_bits", "v_bits"), map(_bits, m.bits_for(shape.num_layers)))),
                 needs_calibration=m.needs_qparams,
                 bytes_per_token=m.bytes_per_token(shape), sink_tokens=m.sink_tokens,
                 sink_bytes_per_sequence=m.sink_bytes(shape), window_tokens=m.residual,
                 window_bytes_per_sequence=m.residual_bytes(shape), pool_bytes=m.static_param_bytes(shape),
                 ratio_to_fp16=m.ratio_to_fp16(shape, tokens), codecs=m.describe_codecs(),
                 engine=m.engine, serve=m.serve, description=m.description)
            for m in modes]
