"""Every serving engine's KV scheme beside our best mode at no more bytes, on the same windows: the README's pairs.

    .venv/bin/python -m bench.engine_pairs --qparams out/kvq --update-readme          # builtin-en, 4 x 512 tokens
    .venv/bin/python -m bench.engine_pairs --qparams out/kvq --text builtin-zh --json out/pairs_zh.json

Evaluates fp16 and every named mode (``kvcache.modes.KV_MODES``: ours and the engines') teacher-forced through
the cache on ``--samples`` windows of ``--seqlen`` tokens of a built-in evaluation text (never the calibration
corpus), every position scored against the stored copy; then pairs each engine scheme with our mode of lowest
KL among those whose bytes per token of a 2,048-token sequence (everything per sequence counted) are at most
the scheme's (:func:`kvcache.measure.pairs.engine_pairs`). ``--update-readme`` writes the table between the
README's ``engine-pairs`` markers. The calibrated modes take ``--qparams`` (the default kvq export of
``calib calibrate default --calib-dataset builtin --calib-samples 64 --calib-seqlen 512``).
"""

from __future__ import annotations

import json
import time

from bench.common import add_json_flag, parser, write_json
from bench.quality_table import README, replace_between
from kvcache.codec import OUR_ENGINE
from kvcache.measure.evaluate import BUILTIN_TEXTS, evaluate, read_text
from kvcache.measure.pairs import engine_pairs, pairs_markdown
from kvcache.models.loader import load_model
from kvcache.modes import KV_MODES
from kvcache.qparams import KVQParams
from kvcache.shape import KVShape

MARKERS = ("<!-- engine-pairs:start -->", "<!-- engine-pairs:end -->")


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__)
    p.add_argument("--qparams", required=True, help="the kvq parameters file or folder (calibrated modes)")
    p.add_argument("--text", default="builtin-en", choices=[t for t in BUILTIN_TEXTS if t != "builtin-en-long"])
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--samples", type=int, default=4)
    p.add_argument("--modes", default="", help="comma list of modes (default: every named mode)")
    p.add_argument("--update-readme", action="store_true")
    add_json_flag(p, "the evaluation and the pairs")
    args = p.parse_args(argv)
    loaded = load_model("default", device="cpu")
    qparams = KVQParams.load(args.qparams)
    modes = [m for m in (args.modes.split(",") if args.modes else KV_MODES) if m]
    started = time.time()
    report = evaluate(loaded, read_text(BUILTIN_TEXTS[args.text]), modes, qparams=qparams, seqlen=args.seqlen,
                      samples=args.samples, batch_size=2, greedy_prompts=0)
    shape = KVShape.from_config(loaded.model.config)
    pairs = engine_pairs(report["results"], KV_MODES, shape)
    table = pairs_markdown(pairs)
    wins = sum(p["winner"] == OUR_ENGINE for p in pairs)
    note = (f"{args.text}, {args.samples} x {args.seqlen} tokens ({report['tokens_scored']:,} positions), "
            f"{time.time() - started:.0f} s: ours has the lower KL in {wins} of {len(pairs)} pairs")
    print(table + "\n\n" + note)
    if args.json:
        write_json(args.json, dict(text=args.text, seqlen=args.seqlen, samples=args.samples, pairs=pairs),
                   report["results"], started)
    if args.update_readme:
        README.write_text(replace_between(README.read_text(encoding="utf-8"), MARKERS, f"{table}\n\n{note}"),
                          encoding="utf-8")
        print(f"updated {README}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
