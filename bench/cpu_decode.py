"""CPU decode throughput of the embedded model: transformers' DynamicCache against our paged caches.

The CPU path is what every new user runs. For each context length, every contender prefills the same
random prompt once (not timed), then decodes greedily one token per forward, the same loop for all:
``model(input_ids=tok, <cache>=..., use_cache=True, logits_to_keep=1)``.

- ``dynamic``: transformers' ``DynamicCache`` (fp32 K/V, SDPA): the baseline;
- ``fp16``: ``PagedKVCache.for_model(model, "fp16")``;
- ``int8-dynamic``: per-token parameters computed at write time;
- ``int8``: static per-channel parameters, a calibration-free stand-in from the K/V min/max of a
  short random prompt (``bench.common.stand_in_qparams``; the timing does not depend on them).

The contenders are timed interleaved in one process (the order rotates each round; every round
truncates the caches back to the prompt, so all rounds time the same positions). A contender's
figure is its best round; ``median step`` (the median of all its steps' times) is printed beside it,
as on a shared machine a round can be stalled by other processes. Ratios are to ``dynamic`` in the
same run: compare ratios, not tokens/s, across runs.

    python -m bench.cpu_decode --json out/cpu_decode.json     # 1K and 4K, 48 steps, best of 5
    python -m bench.cpu_decode --contexts 1024 --steps 16 --rounds 2   # quick
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from bench.common import (
    add_json_flag,
    int_list,
    parser,
    require_positive,
    stand_in_qparams,
    versions,
    write_json,
)

BASELINE = "dynamic"
CONTENDERS = (BASELINE, "fp16", "int8-dynamic", "int8")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = parser(__doc__)
    p.add_argument("--model", default="default", help="what kvcache.models.loader.load_model takes")
    p.add_argument("--contexts", type=int_list, default=[1024, 4096], help="comma list of prompt lengths")
    p.add_argument("--steps", type=int, default=48, help="timed decode steps per round")
    p.add_argument("--rounds", type=int, default=5, help="timed rounds per contender (its best counts)")
    p.add_argument("--warmup", type=int, default=2, help="untimed decode steps after the prefill")
    p.add_argument("--calib-tokens", type=int, default=256, help="tokens of the DynamicCache prefill for int8 qparams")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    p.add_argument("--seed", type=int, default=0)
    add_json_flag(p)
    args = p.parse_args(argv)
    if not args.contexts or min(args.contexts) < 1:
        p.error("--contexts takes lengths >= 1, e.g. 1024,4096")
    require_positive(p, args, "steps", "rounds", "calib_tokens")
    return args


def forward(model, cache, ids: torch.Tensor) -> torch.Tensor:
    """One forward through ``cache``; the greedy next token, ``[batch, 1]``."""
    from kvcache.hf.compat import cache_kwargs

    out = model(input_ids=ids, use_cache=True, logits_to_keep=1, **cache_kwargs(cache))
    return out.logits[:, -1].argmax(dim=-1, keepdim=True)


def truncate(cache, num_tokens: int) -> None:
    """Back to the prompt, so that every round decodes the same positions."""
    if hasattr(cache, "truncate"):
        cache.truncate(num_tokens)
    elif cache.get_seq_length() > num_tokens:  # a negative count removes that many tokens, in every transformers we run
        cache.crop(num_tokens - cache.get_seq_length())


@torch.inference_mode()
def run_context(model, context: int, qparams, args) -> list[dict]:
    from transformers import DynamicCache

    from kvcache.hf.cache import PagedKVCache

    g = torch.Generator().manual_seed(args.seed + context)
    prompt = torch.randint(0, model.config.vocab_size, (1, context), generator=g)
    caches, first = {}, {}
    for name in CONTENDERS:  # prefill once each, not timed
        if name == BASELINE:
            cache = DynamicCache(config=model.config)
        else:
            cache = PagedKVCache.for_model(model, name, qparams=qparams if name == "int8" else None)
        tok = forward(model, cache, prompt)
        for _ in range(args.warmup):
            tok = forward(model, cache, tok)
        caches[name], first[name] = cache, tok
    steps: dict[str, list[list[float]]] = {name: [] for name in CONTENDERS}  # seconds of each step, by round
    for r in range(args.rounds):
        order = CONTENDERS[r % len(CONTENDERS):] + CONTENDERS[: r % len(CONTENDERS)]
        for name in order:
            cache, tok = caches[name], first[name]
            truncate(cache, context + args.warmup)
            times = []
            for _ in range(args.steps):
                t0 = time.perf_counter()
                tok = forward(model, cache, tok)
                times.append(time.perf_counter() - t0)
            steps[name].append(times)
    best = {name: min(sum(t) for t in rounds) for name, rounds in steps.items()}
    median = {name: statistics.median(x for t in rounds for x in t) for name, rounds in steps.items()}
    return [
        {"cache": name, "context": context, "steps": args.steps, "rounds": args.rounds,
         "tokens_per_s": args.steps / best[name], "ms_per_step": 1e3 * best[name] / args.steps,
         "ratio": best[BASELINE] / best[name], "median_step_ms": 1e3 * median[name],
         "median_step_ratio": median[BASELINE] / median[name],
         "round_seconds": [round(sum(t), 4) for t in steps[name]]}
        for name in CONTENDERS
    ]


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    started = time.time()
    if args.threads:
        torch.set_num_threads(args.threads)
    from kvcache.models.loader import load_model

    loaded = load_model(args.model, device="cpu")
    model = loaded.model
    print(f"{loaded.name} {loaded.dtype} on CPU, {torch.get_num_threads()} threads; "
          f"{args.steps} decode steps, best of {args.rounds} interleaved rounds")
    qparams = stand_in_qparams(model, args.calib_tokens, args.seed)
    rows: list[dict] = []
    print(f"{'context':>8} {'cache':>13} {'tokens/s':>9} {'ms/step':>8} {'x dynamic':>9} {'median step ms':>15} {'x dynamic':>9}")
    for context in args.contexts:
        for row in run_context(model, context, qparams, args):
            rows.append(row)
            print(f"{context:>8} {row['cache']:>13} {row['tokens_per_s']:>9.2f} {row['ms_per_step']:>8.1f} {row['ratio']:>9.2f} "
                  f"{row['median_step_ms']:>15.1f} {row['median_step_ratio']:>9.2f}")
    meta = dict(benchmark="cpu_decode", model=loaded.name, dtype=str(loaded.dtype), threads=torch.get_num_threads(),
                **versions("torch", "transformers"), contexts=args.contexts, steps=args.steps, rounds=args.rounds,
                warmup=args.warmup, baseline=BASELINE)
    if args.json is not None:
        write_json(args.json, meta, rows, started)


if __name__ == "__main__":
    main()
