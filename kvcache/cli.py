"""``python -m kvcache``: evaluate KV modes, chat in a terminal. A thin layer over the library."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ASSETS = Path(__file__).resolve().parent.parent / "assets"
DEFAULT_SYSTEM_PROMPT_FILE = ASSETS / "prompts" / "politics_tutor_zh.txt"
QPARAMS_HELP = "kv_qparams.safetensors for the int8 mode, or the folder `python -m calib kv_qparams --format kvq` wrote"


class CLIError(Exception):
    """Shown to the user as one line, exit code 2."""


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="default", help="'default' (embedded SmolLM2-135M-Instruct), a local HF model dir, or a .gguf file")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow the model's own Python code to run")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m kvcache", description="KVQ Studio: quantized KV cache tools")
    sub = parser.add_subparsers(dest="command", required=True)

    ev = sub.add_parser("evaluate", help="perplexity, KL and top-1 agreement of KV modes vs fp16, teacher-forced")
    _add_model_args(ev)
    ev.add_argument("--text", "--text-file", dest="text", default="builtin-en",
                    help="builtin-en (English technical prose), builtin-zh (Chinese politics-exam prose) or a UTF-8 file")
    ev.add_argument("--kv", default="fp16,int8-dynamic", help="comma-separated KV modes (fp16, int8, int8-dynamic)")
    ev.add_argument("--qparams", default=None, help=QPARAMS_HELP)
    ev.add_argument("--seqlen", type=int, default=512)
    ev.add_argument("--samples", type=int, default=16)
    ev.add_argument("--batch-size", type=int, default=2)
    ev.add_argument("--greedy-prompts", type=int, default=4, help="prompts generated freely for the first divergence")
    ev.add_argument("--greedy-tokens", type=int, default=32, help="tokens generated per prompt")
    ev.add_argument("--json", default=None, help="write the report here")

    ch = sub.add_parser("chat", help="chat in the terminal with a quantized KV cache")
    _add_model_args(ch)
    ch.add_argument("--kv", default="int8-dynamic", help="KV mode (fp16, int8, int8-dynamic)")
    ch.add_argument("--qparams", default=None, help=QPARAMS_HELP)
    ch.add_argument("--meta-instruction", default=None, help="system prompt (default: the politics-exam tutor in assets/prompts)")
    ch.add_argument("--max-new-tokens", type=int, default=512)
    ch.add_argument("--temperature", type=float, default=0.0)
    ch.add_argument("--top-p", type=float, default=1.0)
    ch.add_argument("--cache-max-entry-count", default=None,
                    help="fix the KV pool: a fraction in (0,1] of the memory free after the weights load, or a number of blocks")
    cap = sub.add_parser("capacity", help="blocks, tokens and sessions that fit per KV mode in one memory budget")
    _add_model_args(cap)
    cap.add_argument("--kv", default="fp16,int8,int8-dynamic", help="comma-separated KV modes")
    budget = cap.add_mutually_exclusive_group(required=True)
    budget.add_argument("--cache-max-entry-count", default=None,
                        help="fraction in (0,1] of the memory free after the weights load, or a whole number of blocks")
    budget.add_argument("--budget-mib", type=float, default=None, help="a fixed KV budget in MiB")
    cap.add_argument("--block-size", type=int, default=64)
    cap.add_argument("--session-tokens", type=int, default=2048, help="length of one conversation for the sessions column")
    cap.add_argument("--json", default=None, help="write the report here")
    return parser


def _write_json(path: str | None, report: dict) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {path}")


def _load(args: argparse.Namespace):
    from .model_loader import load_model

    return load_model(args.model, device=args.device, trust_remote_code=args.trust_remote_code)


def _qparams(args: argparse.Namespace):
    from .qparams import KVQParams

    return KVQParams.load(args.qparams) if args.qparams else None


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .evaluate import evaluate, format_table, read_text, resolve_text
    from .modes import parse_modes

    modes = [m.name for m in parse_modes(args.kv)]
    if "int8" in modes and not args.qparams:
        raise CLIError("KV mode int8 needs --qparams FILE (made by `python -m calib kv_qparams WORK_DIR OUT_DIR --format kvq`)")
    text_name, text_path = resolve_text(args.text)
    text = read_text(text_path)
    qparams = _qparams(args)
    loaded = _load(args)
    report = evaluate(
        loaded, text, modes, qparams=qparams, seqlen=args.seqlen, samples=args.samples, batch_size=args.batch_size,
        greedy_prompts=args.greedy_prompts, greedy_tokens=args.greedy_tokens,
        progress=lambda f, msg: print(f"\r[{f:5.1%}] {msg}", end="", file=sys.stderr, flush=True),
    )
    print(file=sys.stderr)
    report.update(text=text_name, text_file=str(text_path))
    print(format_table(report))
    for warning in report["warnings"]:
        print(f"warning: {warning}", file=sys.stderr)
    _write_json(args.json, report)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from .block_pool import KVCacheFull
    from .engine import ChatSession, ContextTooLong, GenerationConfig
    from .modes import get_mode

    mode = get_mode(args.kv)
    if mode.needs_qparams and not args.qparams:
        raise CLIError("KV mode int8 needs --qparams FILE (made by `python -m calib kv_qparams WORK_DIR OUT_DIR --format kvq`)")
    system = args.meta_instruction if args.meta_instruction is not None else DEFAULT_SYSTEM_PROMPT_FILE.read_text(encoding="utf-8").strip()
    loaded = _load(args)
    cache = None
    if args.cache_max_entry_count:
        from .cache import PagedKVCache
        from .capacity import parse_cache_max_entry_count, pool_blocks
        from .kv_shape import KVShape

        count = parse_cache_max_entry_count(args.cache_max_entry_count)
        blocks = pool_blocks(mode, KVShape.from_config(loaded.model.config), count, loaded.device)
        if blocks < 1:
            raise CLIError(f"--cache-max-entry-count {args.cache_max_entry_count} holds no block of 64 {mode.name} "
                           "tokens: raise it (a fraction of free memory, or a number of blocks)")
        cache = PagedKVCache.for_model(loaded.model, mode.name, qparams=_qparams(args), num_blocks=blocks, growable=False)
        print(f"KV pool: {blocks} blocks of 64 tokens ({blocks * 64} tokens)")
    session = ChatSession(loaded, mode.name, qparams=_qparams(args), system_prompt=system or None, cache=cache)
    config = GenerationConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p)
    print(f"{loaded.name} on {loaded.device}, KV cache: {mode.name}. Empty line or Ctrl-D quits, /reset clears the chat.")
    while True:
        try:
            user = input("\nyou> ").strip()
        except EOFError:
            break
        if not user:
            break
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
        s = session.last
        kv = s.kv
        held = f"{kv.bytes_used / 1024:.1f} KiB for {kv.tokens_stored} tokens" if kv else "?"
        print(f"\n[{s.new_tokens} tokens, {s.decode_tokens_per_s:.1f} tokens/s decoding, prefill {s.prompt_tokens} "
              f"tokens in {s.prefill_s:.2f} s, KV {mode.name}: {held}]")
        if s.cache_full:
            print(f"[reply cut short: {s.cache_full}]")
    return 0


def cmd_capacity(args: argparse.Namespace) -> int:
    from .capacity import format_plan, free_memory_bytes, parse_cache_max_entry_count, plan
    from .kv_shape import KVShape
    from .modes import parse_modes

    modes = parse_modes(args.kv)
    count = parse_cache_max_entry_count(args.cache_max_entry_count) if args.cache_max_entry_count else None
    if args.budget_mib is not None and args.budget_mib <= 0:
        raise CLIError(f"--budget-mib must be positive, got {args.budget_mib}")
    if args.block_size < 1 or args.session_tokens < 1:
        raise CLIError("--block-size and --session-tokens must be at least 1")
    loaded = _load(args)
    report = plan(
        modes, KVShape.from_config(loaded.model.config), cache_max_entry_count=count,
        budget_bytes=int(args.budget_mib * 1024 * 1024) if args.budget_mib is not None else None,
        free_bytes=free_memory_bytes(loaded.device) if isinstance(count, float) else None,
        block_size=args.block_size, session_tokens=args.session_tokens,
    )
    report.update(model=loaded.name, device=str(loaded.device))
    print(f"{loaded.name} on {loaded.device}")
    print(format_plan(report))
    _write_json(args.json, report)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .evaluate import EvalError
    from .qparams import QParamsError

    from .block_pool import KVCacheFull

    known: tuple[type[BaseException], ...] = (CLIError, EvalError, QParamsError, ValueError, FileNotFoundError, KVCacheFull)
    try:
        from .model_loader import ModelLoadError

        known += (ModelLoadError,)
        return {"evaluate": cmd_evaluate, "chat": cmd_chat, "capacity": cmd_capacity}[args.command](args)
    except known as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
