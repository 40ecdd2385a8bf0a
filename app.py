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
    p = argparse.ArgumentParser(prog="python app.py", description="KVQ Studio web app")
    p.add_argument("--model", default="default",
                   help="'default' (embedded SmolLM2-135M-Instruct), a local HF model dir, or a .gguf file")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=7860, help="port to serve on (default: 7860)")
    p.add_argument("--auth", default=None, metavar="USER:PASSWORD", help="require this login")
    p.add_argument("--max-upload-mb", type=float, default=20.0, help="largest file a user may upload (default: 20)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--qparams", default=None, help="kv_qparams.safetensors for the int8 mode at start")
    p.add_argument("--calib-data-dir", default=None, help="local folder with c4 / wikitext2 / ptb / pileval data")
    p.add_argument("--cache-max-entry-count", default=None, metavar="F|N",
                   help="preallocate the KV pools: a fraction (0, 1] of the memory free after the weights load, "
                        "split evenly between the fp16 and the quantized pool, or a whole number of blocks each "
                        "(default: every cache grows on demand)")
    return p


def parse_auth(value: str | None) -> tuple[str, str] | None:
    if value is None:
        return None
    user, sep, password = value.partition(":")
    if not sep or not user or not password:
        raise SystemExit("error: --auth takes USER:PASSWORD (both non-empty)")
    return user, password


def theme():
    import gradio as gr

    system_fonts = ["ui-sans-serif", "system-ui", "Segoe UI", "Helvetica", "Arial", "sans-serif"]  # no web fonts
    mono = ["ui-monospace", "SFMono-Regular", "Menlo", "Consolas", "monospace"]
    return gr.themes.Soft(primary_hue="indigo", secondary_hue="emerald", neutral_hue="slate", font=system_fonts, font_mono=mono)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    auth = parse_auth(args.auth)
    if args.max_upload_mb <= 0:
        raise SystemExit("error: --max-upload-mb must be positive")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    from kvcache.capacity import parse_cache_max_entry_count
    from kvcache.model_loader import ModelLoadError, load_model
    from kvcache.qparams import KVQParams, QParamsError
    from ui import AppState, build_demo

    try:
        pool = parse_cache_max_entry_count(args.cache_max_entry_count) if args.cache_max_entry_count else None
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from None
    app = AppState(device=args.device, calib_data_dir=args.calib_data_dir, model_path=args.model,
                   max_upload_bytes=int(args.max_upload_mb * 2**20))
    if args.qparams:
        try:
            app.default_qparams = KVQParams.load(args.qparams)
        except QParamsError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        app.default_qparams_label = Path(args.qparams).name
    print(f"loading {args.model} …", file=sys.stderr, flush=True)
    try:
        app.replace_model(load_model(args.model, device=args.device), pool)
    except ModelLoadError as exc:  # still serve: the page says why and offers the model box
        app.load_error = str(exc)
        print(f"warning: {exc}; serving without a model", file=sys.stderr)

    demo = build_demo(app)
    demo.queue(default_concurrency_limit=1)
    try:
        demo.launch(
            server_name=args.host, server_port=args.port, auth=auth, max_file_size=app.max_upload_bytes,
            show_error=True, theme=theme(), css=CSS_FILE.read_text(encoding="utf-8") if CSS_FILE.is_file() else None,
            footer_links=["api", "settings"],
        )
    finally:
        app.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
