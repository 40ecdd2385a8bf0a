"""Below 4 bits, piece by piece: which choice of width, group and key transform pays, against the engines' schemes.

    .venv/bin/python -m bench.lowbit_ablation --qparams out/kvq                      # builtin-en, 4 x 256 tokens
    .venv/bin/python -m bench.lowbit_ablation --qparams out/kvq --text builtin-zh --seqlen 512
    .venv/bin/python -m bench.lowbit_ablation --qparams out/kvq --only fp16 --engines int3-lm,int3-klt   # keys alone

Every candidate is symmetric codes after the Hadamard rotation (our 4-bit recipe), keys through the calibrated
query-aware transform unless the name says ``noqk``, 4 fp16 sink tokens unless it says ``nosink``; the named
modes ``int4-compact``, ``int3`` and ``int3-compact`` are the ones kept; ``kklt`` keys are allocated per channel in
the calibrated eigenbasis (``int3-klt``, ``int2-klt``). Scored teacher-forced through the cache
beside the engines' low-bit schemes on the same windows (``--engines``), every position against the stored copy.
"""

from __future__ import annotations

import time

from bench.common import add_json_flag, parser, write_json
from kvcache.codec import FP16, KVMode
from kvcache.measure.evaluate import BUILTIN_TEXTS, evaluate, format_table, read_text
from kvcache.models.loader import load_model
from kvcache.modes import KV_MODES, allocated_keys as _alloc, peak_lloyd_max as _lm, sym_rotated as _sym
from kvcache.qparams import KVQParams

ENGINES = ("lmdeploy:4,lmdeploy:42,llamacpp:q4_1,llamacpp:q4_0,vllm:turboquant_3bit_nc,vllm:turboquant_k3v4_nc,"
           "hf:quanto-int2,int4,k8v4,int3-lm,int3-klt,int2-klt")


CANDIDATES = {  # name: (K codec, V codec, sink tokens)
    "k4g32-v4g32-nosink": (_sym(4, 32, True), _sym(4, 32), 0),
    "k4head-v4g32 (int4-compact)": (_sym(4, 0, True), _sym(4, 32), 4),
    "k3g16-v3g16": (_sym(3, 16, True), _sym(3, 16), 4),
    "k3g32-v3g32 (int3)": (_sym(3, 32, True), _sym(3, 32), 4),
    "k3g32-v3g32-noqk": (_sym(3, 32), _sym(3, 32), 4),
    "k3head-v3head (int3-compact)": (_sym(3, 0, True), _sym(3, 0), 4),
    "k4head-v2head": (_sym(4, 0, True), _sym(2, 0), 4),
    "k3g32-v2g32": (_sym(3, 32, True), _sym(2, 32), 4),
    "k3head-v2head": (_sym(3, 0, True), _sym(2, 0), 4),
    # keys alone (V in fp16): allocated per channel in the eigenbasis against groups on peak levels, at equal bytes
    "kklt4.75-vfp16": (_alloc(4.75), FP16, 4),
    "k4g16lm-vfp16": (_lm(4, 16, True), FP16, 4),
    "kklt3.25-vfp16": (_alloc(3.25), FP16, 4),
    "k3g32lm-vfp16": (_lm(3, 32, True), FP16, 4),
    "kklt2.25-vfp16": (_alloc(2.25), FP16, 4),
    "k2g32lm-vfp16": (_lm(2, 32, True), FP16, 4),
    "kfp16-v3g32lm": (FP16, _lm(3, 32), 4),
    # allocated keys against Hadamard-rotated ones at the same key bytes (26; V int3-lm's); int3-klt: 28, as int3-lm
    "k3head-v3g32lm": (_sym(3, 0, True), _lm(3, 32), 4),
    "kklt3.0-v3g32lm": (_alloc(3.0), _lm(3, 32), 4),
    # the 2-bit class: 2-bit keys and values on peak levels (0.158 of fp16), beside int2-klt (0.166)
    "k2g32lm-v2g32lm": (_lm(2, 32, True), _lm(2, 32), 4),
}


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__)
    p.add_argument("--qparams", required=True, help="the kvq parameters file or folder (key transforms)")
    p.add_argument("--text", default="builtin-en", choices=[t for t in BUILTIN_TEXTS if t != "builtin-en-long"])
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--samples", type=int, default=4)
    p.add_argument("--engines", default=ENGINES, help="comma list of named modes scored beside the candidates")
    p.add_argument("--only", default="", help="score only the candidates whose name contains this (and the --engines)")
    add_json_flag(p, "the report")
    args = p.parse_args(argv)
    picked = [name for name in CANDIDATES if args.only in name]
    for name in picked:  # evaluate resolves modes by name
        k, v, sinks = CANDIDATES[name]
        KV_MODES.setdefault(name, KVMode(name, "a below-4-bit candidate (bench.lowbit_ablation)", k, v, sinks))
    started = time.time()
    loaded = load_model("default", device="cpu")
    report = evaluate(loaded, read_text(BUILTIN_TEXTS[args.text]), [*picked, *args.engines.split(",")],
                      qparams=KVQParams.load(args.qparams), seqlen=args.seqlen, samples=args.samples, greedy_prompts=0)
    report["text"] = args.text
    print(format_table(report))
    if args.json:
        write_json(args.json, dict(text=args.text, seqlen=args.seqlen, samples=args.samples), report["results"], started)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
