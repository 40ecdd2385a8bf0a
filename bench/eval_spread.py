"""How much the evaluation's figures move with the CPU's arithmetic: float32 vs float64, 1 vs 2 threads.

The tests' quality bounds are set against this spread (tests/test_evaluate.py). Run on the CPU:
    .venv/bin/python -m bench.eval_spread [--text builtin-en] [--kv int8-dynamic] [--seqlen 256 --samples 4]
"""

from __future__ import annotations

import time

import torch

from bench.common import parser
from kvcache.measure.evaluate import evaluate, read_text, resolve_text
from kvcache.models.loader import load_model

FIELDS = ("delta_ppl_pct", "kl_vs_fp16", "top1_match_pct", "first_divergence")


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--text", default="builtin-en")
    p.add_argument("--kv", default="int8-dynamic")
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--samples", type=int, default=4)
    args = p.parse_args()
    text = read_text(resolve_text(args.text)[1])
    for dtype, threads in ((torch.float32, 2), (torch.float32, 1), (torch.float64, 2)):
        torch.set_num_threads(threads)
        loaded = load_model("default", device="cpu", dtype=dtype)
        t0 = time.perf_counter()
        report = evaluate(loaded, text, [args.kv], seqlen=args.seqlen, samples=args.samples,
                          greedy_prompts=2, greedy_tokens=8)
        row = report["results"][1]
        figures = ", ".join(f"{k} {row[k]:.4g}" if isinstance(row[k], float) else f"{k} {row[k]}" for k in FIELDS)
        print(f"{str(dtype).removeprefix('torch.')}, {threads} threads: {figures} ({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
