"""KVQ Studio in the browser: ``python app.py`` serves http://127.0.0.1:7860 with the embedded model loaded.

Chat with an fp16 and a quantized KV cache side by side, watch memory live, calibrate, evaluate.
Chat turns of every session go to one batch worker that decodes the requests sharing a KV pool
together (continuous batching); loading, calibration and evaluation share one queue
(``concurrency_id="gpu"``) and take the device from the worker between its steps, so memory is not
oversubscribed. Named API endpoints (``load_model``, ``chat``, ``calibrate``, ``evaluate``,
``memory``, ``capacity``, ...) let ``gradio_client`` drive the app.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # the app never phones home

CSS_FILE = Path(__file__).resolve().parent / "assets" / "app.css"


def build_parser() -> argparse.ArgumentParser:
    from kvcache.config import DTYPE_HELP, DTYPES

    p = argparse.ArgumentParser(prog="python app.py", description="KVQ Studio web app")
    p.add_argument("--model", default="default",
                   help="'default' (embedded SmolLM2-135M-Instruct), a local HF model dir, a .gguf file, or a Hub id "
                        "(ORG/NAME: from the Hugging Face cache, downloaded when missing unless HF_HUB_OFFLINE is set)")
    p.add_argument("--revision", default=None, metavar="REV", help="--model's branch, tag or commit when it is a Hub id")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=7860, help="port to serve on (default: 7860)")
    p.add_argument("--auth-file", default=None, metavar="FILE", help="require the login USER:PASSWORD on FILE's first line "
                   "(or set $KVQ_AUTH=USER:PASSWORD)")
    p.add_argument("--auth", default=None, metavar="USER:PASSWORD",
                   help="require this login (visible to other users in `ps`: prefer --auth-file or $KVQ_AUTH)")
    p.add_argument("--allow-no-auth", action="store_true",
                   help="serve a non-loopback --host without a login (everyone on the network can use the app)")
    p.add_argument("--model-root", action="append", default=None, metavar="DIR",
                   help="a folder the Model box may open models from (repeatable); beyond localhost only these and 'default'")
    p.add_argument("--allow-hub", action="store_true",
                   help="beyond localhost, let the Model box take Hub ids too (from the server's Hugging Face cache, "
                        "downloaded when missing unless HF_HUB_OFFLINE is set); on localhost it always does")
    p.add_argument("--max-upload-mb", type=float, default=20.0, help="largest file a user may upload (default: 20)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--dtype", choices=DTYPES, default=None, help=DTYPE_HELP + "; the Model box loads in it too")
    p.add_argument("--qparams", default=None,
                   help="kv_qparams.safetensors (or the folder `python -m calib kv_qparams --format kvq` wrote) for int8")
    p.add_argument("--calib-data-dir", default=None, help="local folder with c4 / wikitext2 / ptb / pileval data")
    pool = p.add_mutually_exclusive_group()
    pool.add_argument("--cache-max-entry-count", default=None, metavar="F",
                      help="preallocate the KV pools: a fraction (0, 1] of the memory free after the weights load, "
                           "split evenly between the fp16 and the quantized pool (default: every cache grows on demand)")
    pool.add_argument("--cache-blocks", default=None, metavar="N", help="preallocate N fp16 blocks' memory per pool")
    return p


def theme():
    import gradio as gr

    system_fonts = ["ui-sans-serif", "system-ui", "Segoe UI", "Helvetica", "Arial", "sans-serif"]  # no web fonts
    mono = ["ui-monospace", "SFMono-Regular", "Menlo", "Consolas", "monospace"]
    return gr.themes.Soft(primary_hue="indigo", secondary_hue="emerald", neutral_hue="slate", font=system_fonts, font_mono=mono)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.max_upload_mb <= 0:
        raise SystemExit("error: --max-upload-mb must be positive")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    from kvcache.config import parse_pool_size
    from kvcache.errors import KVQError, one_line
    from kvcache.models.loader import load_model
    from kvcache.qparams import KVQParams
    from ui import AppState, build_demo
    from ui.page import queue_quietly
    from ui.access import check_exposure, hub_ids_allowed, model_roots, read_auth

    try:
        login = read_auth(args.auth, args.auth_file)
        check_exposure(args.host, login, args.allow_no_auth)
        roots = model_roots(args.host, args.model_root)
        pool = parse_pool_size(args.cache_max_entry_count, args.cache_blocks)
        qparams = KVQParams.load(args.qparams) if args.qparams else None
    except KVQError as exc:
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return 2
    app = AppState(device=args.device, dtype=args.dtype, calib_data_dir=args.calib_data_dir, model_path=args.model,
                   max_upload_bytes=int(args.max_upload_mb * 2**20), model_roots=roots,
                   allow_hub=hub_ids_allowed(args.host, args.allow_hub),
                   default_qparams=qparams, default_qparams_label=Path(args.qparams).name if args.qparams else None)
    print(f"loading {args.model} …", file=sys.stderr, flush=True)
    try:
        app.replace_model(load_model(args.model, device=args.device, dtype=args.dtype, revision=args.revision,
                                     allow_download=True), pool)
    except KVQError as exc:  # still serve: the page says why and offers the model box
        app.load_error = one_line(exc)
        print(f"warning: {app.load_error}; serving without a model", file=sys.stderr)

    demo = queue_quietly(build_demo(app), default_concurrency_limit=1)
    try:
        demo.launch(
            server_name=args.host, server_port=args.port, auth=login, max_file_size=app.max_upload_bytes,
            show_error=True, theme=theme(), css=CSS_FILE.read_text(encoding="utf-8") if CSS_FILE.is_file() else None,
            footer_links=["api", "settings"],
        )
    finally:
        app.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
