"""Each serving engine's scheme against our best mode that stores no more bytes: the pairs the README reports.

From one evaluation's results (the same windows for every mode), per engine scheme: our mode (``engine ==
"kvq"``, the fp16 baseline excluded, plans and other named modes of ours included) with the lowest KL among
those whose bytes per token of a ``tokens``-long sequence (sinks, residual windows, everything per sequence
counted: :meth:`KVMode.bytes_per_token_at`) are at most the scheme's. A scheme no mode of ours fits under has no
pair, and counts as a place where the engine wins.
"""

from __future__ import annotations

from typing import Any

from ..codec import OUR_ENGINE, SEQUENCE_TOKENS, KVMode
from ..config import BASELINE_MODE
from ..shape import KVShape


def engine_pairs(results: list[dict[str, Any]], modes: dict[str, KVMode], shape: KVShape,
                 tokens: int = SEQUENCE_TOKENS) -> list[dict[str, Any]]:
    """One row per measured engine scheme: its KL and bytes, our best mode at no more bytes, who wins and by how much.

    ``results`` are evaluation rows (``kv``, ``kl_vs_fp16``, ``top1_match_pct``, ``delta_ppl_pct``); ``modes``
    maps each row's ``kv`` to its mode."""
    rows = [dict(r, bytes=modes[r["kv"]].bytes_per_token_at(shape, tokens)) for r in results if r["kv"] in modes]
    ours = [r for r in rows if modes[r["kv"]].engine == OUR_ENGINE and r["kv"] != BASELINE_MODE]
    fp16 = modes[BASELINE_MODE].bytes_per_token_at(shape, tokens) if BASELINE_MODE in modes else None
    pairs = []
    for r in rows:
        if modes[r["kv"]].engine == OUR_ENGINE:
            continue
        fits = [o for o in ours if o["bytes"] <= r["bytes"]]
        best = min(fits, key=lambda o: o["kl_vs_fp16"]) if fits else None
        pair = dict(engine=modes[r["kv"]].engine, scheme=r["kv"], bytes_per_token=r["bytes"], kl=r["kl_vs_fp16"],
                    top1_match_pct=r["top1_match_pct"], delta_ppl_pct=r["delta_ppl_pct"],
                    x_fp16=r["bytes"] / fp16 if fp16 else None, ours=None, ours_bytes_per_token=None, ours_kl=None,
                    ours_top1_match_pct=None, ours_delta_ppl_pct=None, kl_ratio=None, winner=modes[r["kv"]].engine)
        if best is not None:
            pair.update(ours=best["kv"], ours_bytes_per_token=best["bytes"], ours_kl=best["kl_vs_fp16"],
                        ours_top1_match_pct=best["top1_match_pct"], ours_delta_ppl_pct=best["delta_ppl_pct"],
                        kl_ratio=r["kl_vs_fp16"] / best["kl_vs_fp16"] if best["kl_vs_fp16"] > 0 else float("inf"),
                        winner=OUR_ENGINE if best["kl_vs_fp16"] < r["kl_vs_fp16"] else modes[r["kv"]].engine)
        pairs.append(pair)
    return pairs


def pairs_markdown(pairs: list[dict[str, Any]]) -> str:
    """The pairs as a README table: scheme, its bytes and KL, our mode at no more bytes, its KL, the ratio."""
    lines = ["| engine scheme | x fp16 | KL | top-1 % | our best at ≤ its bytes | x fp16 | KL | top-1 % | KL ratio | lower KL |",
             "|---|--:|--:|--:|---|--:|--:|--:|--:|---|"]
    for p in pairs:
        head = f"| {p['scheme']} | {p['x_fp16']:.3f} | {p['kl']:.1e} | {p['top1_match_pct']:.2f} |"
        if p["ours"] is None:
            lines.append(head + " (none of ours fits) | | | | | " + p["winner"] + " |")
            continue
        ours_x = p["ours_bytes_per_token"] / p["bytes_per_token"] * p["x_fp16"]
        lines.append(head + f" {p['ours']} | {ours_x:.3f} | {p['ours_kl']:.1e} | {p['ours_top1_match_pct']:.2f} | "
                     f"{p['kl_ratio']:.1f}x | {'ours' if p['winner'] == OUR_ENGINE else p['winner']} |")
    return "\n".join(lines)
