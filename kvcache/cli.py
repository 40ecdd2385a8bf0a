"""``python -m kvcache``: list KV modes, evaluate them (long windows, retrieval), recommend one, chat, plan capacity.

A thin layer over the library.

Every error a user can fix is one ``error: ...`` line (exit 2); a bug is one ``internal error: ...`` line
naming the log file that holds its traceback (exit 1).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .config import CHUNK_TOKENS, DTYPE_HELP, DTYPES, SYSTEM_PROMPT_FILE
from .errors import KVQError, one_line
from .modes import KV_MODES, KVQ_MODES

QPARAMS_HELP = ("kv_qparams.safetensors for the calibrated modes, or the folder "
                "`python -m calib kv_qparams WORK_DIR OUT --format kvq` wrote")
TEXT_HELP = ("builtin-en (English technical prose), builtin-zh (Chinese politics-exam prose), builtin-en-long "
             "(one English narrative, 2 windows of 8K tokens) or a UTF-8 file")
MODES_HELP = (", ".join(KVQ_MODES) + "; an engine's scheme as ENGINE:FLAG (vllm:fp8, llamacpp:q4_0, lmdeploy:4, hf:quanto-int4, "
              "...); or a plan .json from `python -m calib plan`; any of them +recentN keeps the newest N tokens in "
              "16 bits (int2-klt+recent128, counted in its bytes); `python -m kvcache modes` lists them all")

MODEL_HELP = ("'default' (embedded SmolLM2-135M-Instruct), a local HF model dir, a .gguf file, or a Hub id (ORG/NAME: "
              "from the Hugging Face cache, downloaded when missing unless HF_HUB_OFFLINE is set)")
REVISION_HELP = "the Hub id's branch, tag or commit (default: main)"


class CLIError(KVQError):
    """A flag combination the command cannot run with."""


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="default", help=MODEL_HELP)
    p.add_argument("--revision", default=None, metavar="REV", help=REVISION_HELP)
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--dtype", choices=DTYPES, default=None, help=DTYPE_HELP)
    p.add_argument("--trust-remote-code", action="store_true", help="allow the model's own tokenizer code to run")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m kvcache", description="KVQ Studio: quantized KV cache tools")
    sub = parser.add_subparsers(dest="command", required=True)

    md = sub.add_parser("modes", help="the KV modes: bits of K and V, calibration, bytes per token for a model")
    _add_model_args(md)
    md.add_argument("--kv", default=",".join(KV_MODES), help=f"comma-separated KV modes ({MODES_HELP})")
    md.add_argument("--json", action="store_true", help="print a JSON list (one object per mode) instead of a table")

    ev = sub.add_parser("evaluate", help="perplexity, KL and top-1 agreement of KV modes vs fp16, teacher-forced")
    _add_model_args(ev)
    ev.add_argument("--text", "--text-file", dest="text", default="builtin-en", help=TEXT_HELP)
    ev.add_argument("--kv", default="fp16,int8-dynamic", help=f"comma-separated KV modes ({MODES_HELP})")
    ev.add_argument("--qparams", default=None, help=QPARAMS_HELP)
    ev.add_argument("--seqlen", type=int, default=512, help="tokens per window, up to the model's context (8192 for the embedded model)")
    ev.add_argument("--samples", type=int, default=16)
    ev.add_argument("--batch-size", type=int, default=2, help="windows scored together (at most --chunk-tokens tokens per forward)")
    ev.add_argument("--chunk-tokens", type=int, default=CHUNK_TOKENS,
                    help="tokens per prefill forward: long windows are scored chunk by chunk through the cache")
    ev.add_argument("--greedy-prompts", type=int, default=4, help="prompts generated freely for the first divergence")
    ev.add_argument("--greedy-tokens", type=int, default=32, help="tokens generated per prompt")
    ev.add_argument("--json", default=None, help="write the report here")

    ch = sub.add_parser("chat", help="chat in the terminal with a quantized KV cache")
    _add_model_args(ch)
    ch.add_argument("--kv", default="int8-dynamic", help=f"KV mode ({MODES_HELP})")
    ch.add_argument("--qparams", default=None, help=QPARAMS_HELP)
    ch.add_argument("--meta-instruction", default=None, help="system prompt (default: the politics-exam tutor in assets/prompts)")
    ch.add_argument("--max-new-tokens", type=int, default=512)
    ch.add_argument("--temperature", type=float, default=0.0)
    ch.add_argument("--top-p", type=float, default=1.0)
    ch_pool = ch.add_mutually_exclusive_group()
    ch_pool.add_argument("--cache-max-entry-count", default=None,
                         help="fix the KV pool: a fraction in (0,1] of the memory free after the weights load (LMDeploy's)")
    ch_pool.add_argument("--cache-blocks", default=None, metavar="N", help="fix the KV pool at N fp16 blocks' memory")

    nd = sub.add_parser("needle", help="pass-key retrieval at depths of long contexts, answered greedily through the cache")
    _add_model_args(nd)
    nd.add_argument("--kv", default="fp16,int8-dynamic", help=f"comma-separated KV modes; fp16 always runs ({MODES_HELP})")
    nd.add_argument("--qparams", default=None, help=QPARAMS_HELP)
    nd.add_argument("--lengths", default="1024,2048,4096,8192", help="context lengths in tokens (prompt and answer)")
    nd.add_argument("--depths", default="0,0.25,0.5,0.75,1", help="needle depths in [0, 1]: 0 first, 1 right before the question")
    nd.add_argument("--trials", type=int, default=3, help="pass keys per cell")
    nd.add_argument("--chunk-tokens", type=int, default=CHUNK_TOKENS, help="tokens per prefill forward")
    nd.add_argument("--json", default=None, help="write the report (its `cells`) here")

    rc = sub.add_parser("recommend", help="rank one engine's KV cache options, ours beside them, by measured quality at a context")
    _add_model_args(rc)
    rc.add_argument("--engine", required=True, help="vllm, sglang, lmdeploy, llamacpp, hf or kvq (ours)")
    rc.add_argument("--context", type=int, required=True, help="tokens per sequence: KL is measured on windows this long")
    rc.add_argument("--budget-mib", type=float, default=None, help="a KV budget in MiB: how many tokens and sessions fit")
    rc.add_argument("--text", default="builtin-en-long", help=TEXT_HELP)
    rc.add_argument("--qparams", default=None, help=QPARAMS_HELP + " (without it, calibrated modes are skipped)")
    rc.add_argument("--windows", type=int, default=1, help="windows of --context tokens measured per option")
    rc.add_argument("--needle-trials", type=int, default=0,
                    help="also measure retrieval at --context (depths 0, 0.5, 1) with this many trials per depth")
    rc.add_argument("--max-kl", type=float, default=1e-3, help="the pick: the fewest bytes with KL at most this")
    rc.add_argument("--all", action="store_true", help="measure every mode of ours, not only the best per byte class")
    rc.add_argument("--json", default=None, help="write the report (its `options`) here")

    cap = sub.add_parser("capacity", help="blocks, tokens and sessions that fit per KV mode in one memory budget")
    _add_model_args(cap)
    cap.add_argument("--kv", default=",".join(KV_MODES), help=f"comma-separated KV modes ({MODES_HELP})")
    budget = cap.add_mutually_exclusive_group(required=True)
    budget.add_argument("--cache-max-entry-count", default=None,
                        help="fraction in (0,1] of the memory free after the weights load (LMDeploy's)")
    budget.add_argument("--cache-blocks", default=None, metavar="N", help="N fp16 blocks' memory")
    budget.add_argument("--budget-mib", type=float, default=None, help="a fixed KV budget in MiB")
    cap.add_argument("--block-size", type=int, default=None, help="tokens per block (default: 64)")
    cap.add_argument("--session-tokens", type=int, default=2048, help="length of one conversation for the sessions column")
    cap.add_argument("--json", default=None, help="write the report here")
    return parser


def _write_json(path: str | None, report: dict) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {path}")


def _load(args: argparse.Namespace):
    from .models.loader import load_model

    loaded = load_model(args.model, device=args.device, dtype=args.dtype, trust_remote_code=args.trust_remote_code,
                        revision=args.revision, allow_download=True)
    for note in loaded.notes:  # a sliding window that caps the context
        print(f"note: {note}", file=sys.stderr)
    return loaded


def _qparams(args: argparse.Namespace):
    from .qparams import KVQParams

    return KVQParams.load(args.qparams) if args.qparams else None


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .measure.evaluate import evaluate, format_table, read_text, resolve_text
    from .modes import parse_modes, require_qparams

    modes = parse_modes(args.kv)
    qparams = _qparams(args)
    for mode in modes:
        require_qparams(mode, qparams)
    text_name, text_path = resolve_text(args.text)
    text = read_text(text_path)
    loaded = _load(args)
    report = evaluate(
        loaded, text, [m.name for m in modes], qparams=qparams, seqlen=args.seqlen, samples=args.samples,
        batch_size=args.batch_size, greedy_prompts=args.greedy_prompts, greedy_tokens=args.greedy_tokens,
        chunk_tokens=args.chunk_tokens, progress=_progress,
    )
    print(file=sys.stderr)
    report.update(text=text_name, text_file=str(text_path))
    print(format_table(report))
    for warning in report["warnings"]:
        print(f"warning: {warning}", file=sys.stderr)
    _write_json(args.json, report)
    return 0


def _progress(fraction: float, message: str) -> None:
    print(f"\r\033[K[{fraction:5.1%}] {message}", end="", file=sys.stderr, flush=True)


def _numbers(text: str, kind: type, flag: str) -> list:
    try:
        return [kind(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise CLIError(f"{flag} takes comma-separated numbers, got {text!r}") from None


def cmd_needle(args: argparse.Namespace) -> int:
    from .measure.needle import format_grid, needle
    from .measure.recommend import remember_needle
    from .modes import parse_modes, require_qparams

    modes = parse_modes(args.kv)
    qparams = _qparams(args)
    for mode in modes:
        require_qparams(mode, qparams)
    lengths, depths = _numbers(args.lengths, int, "--lengths"), _numbers(args.depths, float, "--depths")
    loaded = _load(args)
    report = needle(loaded, [m.name for m in modes], qparams=qparams, lengths=lengths, depths=depths,
                    trials=args.trials, chunk_tokens=args.chunk_tokens, progress=_progress)
    print(file=sys.stderr)
    remember_needle(report, loaded.model, qparams)  # `recommend` at these contexts shows it
    print(format_grid(report))
    for warning in report["warnings"]:
        print(f"warning: {warning}", file=sys.stderr)
    _write_json(args.json, report)
    return 0


def cmd_recommend(args: argparse.Namespace) -> int:
    from .measure.evaluate import read_text, resolve_text
    from .measure.recommend import check_engine, format_recommendation, recommend

    check_engine(args.engine)
    if args.budget_mib is not None and args.budget_mib <= 0:
        raise CLIError(f"--budget-mib must be positive, got {args.budget_mib}")
    qparams = _qparams(args)
    text_name, text_path = resolve_text(args.text)
    text = read_text(text_path)
    loaded = _load(args)
    report = recommend(loaded, args.engine, args.context, text=text, text_name=text_name, qparams=qparams,
                       qparams_path=args.qparams, budget_mib=args.budget_mib, windows=args.windows,
                       needle_trials=args.needle_trials, max_kl=args.max_kl, every_mode=args.all, progress=_progress)
    print(file=sys.stderr)
    print(format_recommendation(report))
    _write_json(args.json, report)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from .config import EngineConfig, PoolSize, parse_pool_size
    from .engine.chat import GenerationConfig
    from .engine.engine import Engine
    from .errors import ContextTooLong, KVCacheFull
    from .modes import get_mode, require_qparams

    mode = get_mode(args.kv)
    qparams = _qparams(args)
    require_qparams(mode, qparams)
    size = parse_pool_size(args.cache_max_entry_count, args.cache_blocks)
    system = args.meta_instruction if args.meta_instruction is not None else SYSTEM_PROMPT_FILE.read_text(encoding="utf-8").strip()
    engine = Engine(_load(args), EngineConfig(**size._asdict()))
    try:
        session = engine.chat(mode, qparams=qparams, system_prompt=system or None)
        if size != PoolSize():
            pool = session.pool
            print(f"KV pool: {pool.num_blocks} blocks of {pool.block_size} tokens ({pool.num_blocks * pool.block_size} tokens)")
        config = GenerationConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p)
        loaded = engine.loaded
        print(f"{loaded.name} on {loaded.device}, KV cache: {mode.name}. Empty line or Ctrl-D quits, /reset clears the chat.")
        while (user := _ask()) is not None:
            if user == "/reset":
                session.reset()
                continue
            print("assistant> ", end="", flush=True)
            stream = session.stream_reply(user, config)
            try:
                for piece in stream:
                    print(piece, end="", flush=True)
            except KeyboardInterrupt:
                stream.close()  # the reply so far stays in the conversation
                print(" [stopped]")
            except (KVCacheFull, ContextTooLong) as exc:
                print(f"[not answered: {exc}; /reset starts over]")
                continue
            print(f"\n{_turn_line(session, mode.name)}")
    finally:
        engine.close()
    return 0


def _ask() -> str | None:
    """The next line typed, or None when the user is done (an empty line or Ctrl-D)."""
    try:
        user = input("\nyou> ").strip()
    except EOFError:
        return None
    return user or None


def _turn_line(session, mode: str) -> str:
    s, kv = session.last, session.last.kv
    held = f"{kv.bytes_used / 1024:.1f} KiB for {kv.tokens_stored} tokens" if kv else "?"
    return (f"[{s.new_tokens} tokens, {s.decode_tokens_per_s:.1f} tokens/s decoding, prefill {s.prompt_tokens} "
            f"tokens in {s.prefill_s:.2f} s, KV {mode}: {held}]")


def cmd_modes(args: argparse.Namespace) -> int:
    from .measure.modes_listing import format_modes_by_engine, mode_facts
    from .modes import parse_modes
    from .shape import KVShape

    modes = parse_modes(args.kv)
    loaded = _load(args)
    for mode in modes:
        mode.check_model(loaded.model.config)
    if args.json:
        print(json.dumps(mode_facts(modes, loaded.model.config), indent=1))
    else:
        shape = KVShape.from_config(loaded.model.config)
        print(f"{loaded.name} ({shape}): bytes per token of all layers and KV heads; + per sequence: what each "
              "sequence holds once (fp16 sink tokens, a 16-bit residual window); + per pool: once per pool (static "
              "parameters, transforms, codebooks); B/token at 2,048 and x fp16: a 2,048-token sequence with its own costs")
        print(format_modes_by_engine(modes, shape))
    return 0


def cmd_capacity(args: argparse.Namespace) -> int:
    from .config import BLOCK_SIZE, PoolSize, parse_pool_size
    from .measure.capacity import format_capacity
    from .modes import kv_float_dtype, parse_modes
    from .shape import KVShape
    from .storage.sizing import budget_bytes, capacity_report, free_memory_bytes

    modes = parse_modes(args.kv)
    size = parse_pool_size(args.cache_max_entry_count, args.cache_blocks)
    if args.budget_mib is not None and args.budget_mib <= 0:
        raise CLIError(f"--budget-mib must be positive, got {args.budget_mib}")
    if args.cache_max_entry_count is not None and size == PoolSize():
        raise CLIError("--cache-max-entry-count 0 means no fixed pool; give a fraction in (0, 1], or --cache-blocks N")
    if args.session_tokens < 1:
        raise CLIError("--session-tokens must be at least 1")
    block_size = args.block_size or BLOCK_SIZE
    loaded = _load(args)
    shape, fp_dtype = KVShape.from_config(loaded.model.config), kv_float_dtype(loaded.dtype)
    free = free_memory_bytes(loaded.device) if size.cache_max_entry_count is not None else None
    budget = (int(args.budget_mib * 1024 * 1024) if args.budget_mib is not None else
              budget_bytes(shape, **size._asdict(), free_bytes=free, block_size=block_size, fp_dtype=fp_dtype))
    report = capacity_report(modes, shape, budget, block_size=block_size, session_tokens=args.session_tokens,
                             fp_dtype=fp_dtype, **size._asdict(), free_bytes=free)
    report.update(model=loaded.name, device=str(loaded.device))
    print(f"{loaded.name} on {loaded.device}")
    print(format_capacity(report))
    _write_json(args.json, report)
    return 0


COMMANDS = {"modes": cmd_modes, "evaluate": cmd_evaluate, "chat": cmd_chat, "capacity": cmd_capacity,
            "needle": cmd_needle, "recommend": cmd_recommend}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except KVQError as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except Exception as e:  # a bug: its traceback goes to the log, one line to the terminal
        from .logs import internal_error

        print(internal_error(e, f"python -m kvcache {args.command}"), file=sys.stderr)
        return 1
