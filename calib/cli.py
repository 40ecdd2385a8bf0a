"""``python -m calib``: calibrate K/V statistics, export KV quantization parameters, name LMDeploy's settings.
A thin layer over :func:`calib.calibrate.calibrate`, :func:`calib.workdir.load_work_dir`,
:func:`calib.export.export` and :func:`calib.lmdeploy.lmdeploy_equivalent`.

Spellings follow LMDeploy's ``lite calibrate`` / ``lite kv_qparams`` (``--calib-dataset`` and the older
``--calib_dataset`` both work). An error the user can fix (:class:`kvcache.errors.KVQError`) is one line
``error: ...`` on stderr, exit code 2; anything else is a bug: one line ``internal error: ... (details in
LOG)``, exit code 1, with the traceback in the log file (:func:`kvcache.logs.internal_error`).
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path
from typing import NoReturn

from kvcache.cli import MODEL_HELP, REVISION_HELP
from kvcache.config import DTYPE_HELP, DTYPES
from kvcache.errors import KVQError, one_line
from kvcache.logs import internal_error

from .errors import UsageError

TURBOMIND_VERSIONS = """\
turbomind layouts (raw float32 little-endian, one file per layer and TP shard,
layers.{i}.past_kv_scale.{tp}.weight, put into the TurboMind weights dir,
e.g. workspace/triton_models/weights/, and set quant_policy = 4 in its config.ini):
  asymmetric (default)  [k_scale, k_zp, v_scale, v_zp]; read by TurboMind's int8 KV cache
                        (quant_policy=4) from LMDeploy PR #218 (Aug 2023, zp = (min+max)/2)
                        through LMDeploy 0.3.x.
  symmetric (--kv-sym)  [k_scale, v_scale]; what LMDeploy's kv_qparams --kv-sym writes, but only
                        TurboMind from before PR #218 (LMDeploy 0.0.x, mid 2023) reads 2 values;
                        later TurboMind reads 4 and fails on it (LMDeploy issue #1201).
  From LMDeploy 0.4 (PR #1377) TurboMind quantizes the KV cache online (quant_policy 8 = int8,
  4 = int4) and reads no files; the offline path was removed in PR #2097 (July 2024).
  For LMDeploy >= 0.4's online settings see `python -m calib lmdeploy --help`.
kvq:  kv_qparams.safetensors for `python -m kvcache chat --kv int8-qk --qparams FILE` (every calibrated mode).
vllm: with --model MODEL_DIR (a Hugging Face safetensors folder): OUT_DIR becomes a copy of it
      (hard links) with kv_cache_scales.safetensors (FP8 e4m3 k_scale/v_scale) listed in
      model.safetensors.index.json and a compressed-tensors quantization_config in config.json:
      `vllm serve OUT_DIR --kv-cache-dtype fp8`. Without --model: the scales file + README_vllm.md."""

LMDEPLOY_HELP = """\
LMDeploy >= 0.4 (PR #1377) quantizes the KV cache online, per token and per KV head, asymmetric,
and reads no parameter files: --quant-policy 8 = int8, 4 = int4 (0 = fp16/bf16, the default).
The meaning of quant_policy=4 changed in 0.4: up to LMDeploy 0.3.x it was TurboMind's int8 KV
cache with offline past_kv_scale files, which `python -m calib kv_qparams --format turbomind`
writes (see `python -m calib kv_qparams --help`)."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad flag is one ``error: ...`` line (exit 2) like every other error."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message} (see `{self.prog} --help`)\n")


def _flag(value: str) -> bool:
    """``--kv-sym`` alone, or LMDeploy's ``--kv_sym True/False``."""
    v = value.strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


def _positive(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {value!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {n}")
    return n


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m calib", description="KVQ Studio: KV-cache calibration and parameter export")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{calibrate,kv_qparams,lmdeploy,plan}")

    ca = sub.add_parser(
        "calibrate", help="run the model on calibration text and record K/V min/max/absmax per layer",
        description="Record per-layer K/V statistics (min, max, absmax per KV head and channel) into WORK_DIR.",
    )
    ca.add_argument("model", nargs="?", metavar="MODEL", help=MODEL_HELP)
    ca.add_argument("--model", dest="model_opt", default=None, metavar="MODEL",
                    help="the same as the positional MODEL (every kvcache command takes --model)")
    ca.add_argument("--revision", default=None, metavar="REV", help=REVISION_HELP)
    ca.add_argument("--calib-dataset", "--calib_dataset", dest="calib_dataset", default="c4",
                    help="calibration dataset (default: c4)")
    ca.add_argument("--calib-samples", "--calib_samples", dest="calib_samples", type=_positive, default=128,
                    help="number of samples (default: 128)")
    ca.add_argument("--calib-seqlen", "--calib_seqlen", dest="calib_seqlen", type=_positive, default=2048,
                    help="tokens per sample (default: 2048)")
    ca.add_argument("--work-dir", "--work_dir", dest="work_dir", default="./quant_output",
                    help="where the stats go (default: ./quant_output)")
    ca.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    ca.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    ca.add_argument("--dtype", choices=DTYPES, default=None, help=DTYPE_HELP)
    ca.add_argument("--calib-data-dir", "--calib_data_dir", dest="calib_data_dir", default=None,
                    help="local folder with the calibration data (nothing is downloaded without it)")
    ca.add_argument("--batch-size", "--batch_size", dest="batch_size", type=_positive, default=1,
                    help="samples per forward pass (default: 1)")
    ca.add_argument("--trust-remote-code", "--trust_remote_code", dest="trust_remote_code", action="store_true",
                    help="allow the model's own Python code to run (tokenizer only)")

    kq = sub.add_parser(
        "kv_qparams", help="export KV quantization parameters from a work dir (turbomind, kvq or vllm)",
        description="Turn the stats in WORK_DIR (ours, or LMDeploy's `lite calibrate` output) into "
                    "KV quantization parameters in OUT_DIR.",
        epilog=TURBOMIND_VERSIONS, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    kq.add_argument("work_dir", metavar="WORK_DIR", help="the calibrate work dir (key_stats.pth, value_stats.pth)")
    kq.add_argument("out_dir", metavar="OUT_DIR", help="where the parameter files go (created if missing)")
    kq.add_argument("--format", required=True, choices=("turbomind", "kvq", "vllm"),
                    help="turbomind: LMDeploy TurboMind past_kv_scale files; kvq: kv_qparams.safetensors; "
                         "vllm: FP8 k_scale/v_scale safetensors")
    kq.add_argument("--kv-sym", "--kv_sym", dest="kv_sym", nargs="?", const=True, default=False, type=_flag, metavar="BOOL",
                    help="symmetric (absmax) parameters instead of asymmetric (min/max); vllm is always symmetric")
    kq.add_argument("--num-tp", "--num_tp", dest="num_tp", type=_positive, default=1,
                    help="turbomind: tensor-parallel shards; must divide the KV heads (default: 1)")
    kq.add_argument("--kv-bits", "--kv_bits", dest="kv_bits", type=int, default=8,
                    help="turbomind and vllm: 8; kvq: 4 or 8 (default: 8)")
    kq.add_argument("--granularity", choices=("tensor", "head", "channel"), default=None,
                    help="one parameter per layer (tensor), per KV head (head) or per channel (channel); "
                         "default: channel for kvq, tensor for turbomind (its only one) and vllm (tensor or head)")
    kq.add_argument("--model", default=None,
                    help="check the stats were calibrated on this model ('default', HF dir, .gguf or Hub id) first; "
                         "vllm: the HF model folder (or Hub id) to copy into OUT_DIR with the scales merged, "
                         "ready to serve")
    kq.add_argument("--revision", default=None, metavar="REV", help=REVISION_HELP)
    kq.add_argument("--qk-context", dest="qk_context", type=_positive, default=None, metavar="N",
                    help="kvq: fit the query-aware key transform to every position of an N-token context (the "
                         "context you serve), not only the calibration windows' positions; past about 4x the "
                         "calibration length its keys lose far less late in the context (default: the "
                         "calibration length)")

    lm = sub.add_parser(
        "lmdeploy", help="the LMDeploy >= 0.4 command for a KV mode (or why there is none)",
        description="Print the LMDeploy >= 0.4 setting (--quant-policy) equivalent to a KV mode of ours, or "
                    "why there is none and the closest one.",
        epilog=LMDEPLOY_HELP, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    lm.add_argument("--kv", required=True, metavar="MODE",
                    help="one of our KV modes, e.g. int8-dynamic (an unknown name lists them)")
    lm.add_argument("--model", default="MODEL", help="the model path or id to put in the commands (default: MODEL)")

    pl = sub.add_parser(
        "plan", help="choose bits per layer for K and V that meet a Δppl budget at the fewest bytes",
        description="Measure each layer's K and V sensitivity on half the windows of a calibration text, choose "
                    "16, 8, 4, 3 or 2 bits per layer and side for a Δppl budget, verify the plan on the other half "
                    "(the upper end of its Δppl's 95% interval within the budget), and write it as a spec file "
                    "--kv accepts.",
    )
    pl.add_argument("model", nargs="?", metavar="MODEL", help=MODEL_HELP)
    pl.add_argument("--model", dest="model_opt", default=None, metavar="MODEL", help="the same as the positional MODEL")
    pl.add_argument("--revision", default=None, metavar="REV", help=REVISION_HELP)
    pl.add_argument("--budget-dppl", type=float, default=0.5, help="the Δppl budget in percent (default: 0.5)")
    pl.add_argument("--qparams", default=None,
                    help="kv_qparams.safetensors (or its folder): keys then use the calibrated query-aware transform")
    pl.add_argument("--out", default="plan.json", help="the plan's spec file (default: plan.json)")
    pl.add_argument("--calib-dataset", dest="calib_dataset", default="builtin", help="planning text (default: builtin)")
    pl.add_argument("--calib-samples", dest="calib_samples", type=_positive, default=8,
                    help="windows, half to choose on and half held out (default: 8; at least 4)")
    pl.add_argument("--calib-seqlen", dest="calib_seqlen", type=_positive, default=256, help="tokens each (default: 256)")
    pl.add_argument("--calib-data-dir", dest="calib_data_dir", default=None, help="local folder with c4 & co.")
    pl.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    pl.add_argument("--dtype", choices=DTYPES, default=None, help=DTYPE_HELP)
    return parser


def _model_arg(args: argparse.Namespace, what: str) -> str:
    """The model, given positionally (as LMDeploy users type it) or as ``--model`` (as every kvcache command takes it)."""
    if args.model and args.model_opt and args.model != args.model_opt:
        raise UsageError(f"two models given ({args.model} and --model {args.model_opt}): give one")
    model = args.model or args.model_opt
    if not model:
        raise UsageError(f"give the MODEL to {what}: 'default', a local HF model dir, a .gguf file or a Hub id")
    return model


def cmd_calibrate(args: argparse.Namespace) -> int:
    from kvcache.models.loader import load_model

    from .calibrate import calibrate, check_inputs

    model = _model_arg(args, "calibrate")
    # What needs no model is refused before one loads (that can take minutes).
    check_inputs(dataset=args.calib_dataset, samples=args.calib_samples, seqlen=args.calib_seqlen,
                 work_dir=args.work_dir, data_dir=args.calib_data_dir, device=args.device, batch_size=args.batch_size)
    loaded = load_model(model, device=args.device, dtype=args.dtype, trust_remote_code=args.trust_remote_code,
                        revision=args.revision, allow_download=True)

    # calibrate() draws its own tqdm bar on a terminal.
    work_dir = calibrate(
        loaded, dataset=args.calib_dataset, samples=args.calib_samples, seqlen=args.calib_seqlen,
        seed=args.seed, work_dir=args.work_dir, data_dir=args.calib_data_dir, device=args.device,
        batch_size=args.batch_size,
    )
    print(f"wrote K/V stats to {work_dir}; next: python -m calib kv_qparams {work_dir} OUT_DIR --format kvq")
    return 0


def cmd_kv_qparams(args: argparse.Namespace) -> int:
    from .export import export
    from .workdir import check_model, load_work_dir

    stats = load_work_dir(args.work_dir)
    if args.format == "vllm" and args.model:
        return _vllm_folder(args, stats)
    if args.model:
        check_model(stats, _model_config(args.model, args.revision))
    files = export(
        stats, args.out_dir, args.format, kv_sym=args.kv_sym, num_tp=args.num_tp, kv_bits=args.kv_bits,
        granularity=args.granularity, qk_context=args.qk_context,
    )
    kind = "symmetric" if args.kv_sym or args.format == "vllm" else "asymmetric"
    print(f"wrote {len(files)} files to {args.out_dir} ({args.format}, {kind}, {stats.shape_str()})")
    if args.format == "kvq":
        from kvcache.modes import best_calibrated_mode
        from kvcache.qparams import KVQParams

        qp = KVQParams.load(files[0])
        print(f"use: python -m kvcache chat --kv {best_calibrated_mode(qp)} --qparams {files[0]}")
        if qp.k_transform is not None and args.qk_context is None:
            print(f"the key transform fits positions up to {stats.meta.get('seqlen', 'the calibration length')}; for "
                  "longer contexts export with --qk-context N (the context you serve): keys then lose no more late "
                  "in it than early")
    elif args.format == "vllm":
        print("for a model folder vLLM serves as is, rerun with --model MODEL_DIR (the model they were calibrated on)")
    else:
        print("copy them into the TurboMind weights dir and set quant_policy = 4 (see --help for versions)")
    return 0


def _vllm_folder(args: argparse.Namespace, stats) -> int:
    """``--format vllm --model MODEL_DIR``: the ready-to-serve copy of the model."""
    from kvcache.models.hub import names_hub_model
    from kvcache.models.loader import DEFAULT_MODEL, resolve_model

    from .export import READY_README, check_options, export_vllm_model

    if args.model == DEFAULT_MODEL:
        raise UsageError("--model default is a .gguf model; the vllm format needs a Hugging Face model folder "
                       "(config.json + *.safetensors): give one, or leave out --model for the scales alone")
    granularity = check_options("vllm", num_tp=args.num_tp, kv_bits=args.kv_bits, granularity=args.granularity)
    model_dir = args.model  # a local path as given: the export says why it is not a model folder if it is none
    if names_hub_model(args.model) or args.revision:
        model_dir, _ = resolve_model(args.model, revision=args.revision, allow_download=True)
    folder = export_vllm_model(stats, model_dir, args.out_dir, granularity=granularity)
    how = f"{folder.linked} files hard-linked" + (f", {folder.copied} copied" if folder.copied else "")
    print(f"wrote {folder.out_dir}: a copy of {args.model} ({how}) with FP8 KV-cache scales ({granularity}, "
          f"{stats.shape_str()}); new files: {', '.join(p.name for p in folder.written)}")
    if folder.compressed_tensors:
        print(f"checked: compressed-tensors {folder.compressed_tensors} parses its quantization_config")
    print(f"serve: vllm serve {folder.out_dir} --kv-cache-dtype fp8")
    print(f"note: vLLM itself was not run here; the layout follows vLLM's loader source ({READY_README})")
    return 0


def cmd_lmdeploy(args: argparse.Namespace) -> int:
    from kvcache.modes import get_mode

    from .lmdeploy import lmdeploy_equivalent

    print(lmdeploy_equivalent(get_mode(args.kv), args.model).text())
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from kvcache.models.loader import load_model
    from kvcache.qparams import KVQParams

    from .data import check_dataset
    from .plan import plan_bits, plan_path, summary, write_plan

    plan_path(args.out)
    if args.budget_dppl <= 0:
        raise UsageError(f"--budget-dppl is a Δppl budget in percent and must be positive, got {args.budget_dppl}")
    check_dataset(args.calib_dataset, args.calib_data_dir)
    model = _model_arg(args, "plan")
    qparams = KVQParams.load(args.qparams) if args.qparams else None
    loaded = load_model(model, device=args.device, dtype=args.dtype, revision=args.revision, allow_download=True)
    plan, spec = plan_bits(
        loaded, args.budget_dppl, qparams=qparams, dataset=args.calib_dataset, samples=args.calib_samples,
        seqlen=args.calib_seqlen, data_dir=args.calib_data_dir, name=str(Path(args.out).expanduser()),
        progress=lambda f, m: print(f"\r[{f:5.1%}] {m:<60}", end="", file=sys.stderr, flush=True),
    )
    print(file=sys.stderr)
    path = write_plan(spec, args.out)
    print(summary(plan))
    print(f"wrote {path}; use it: python -m kvcache evaluate --kv fp16,{path}" + (f" --qparams {args.qparams}" if qparams else ""))
    return 0


def _model_config(model: str, revision: str | None = None):
    """The transformers config to check stats against: read alone for an HF dir (or a Hub id's), else via the loader."""
    from kvcache.models.loader import load_model, resolve_model

    path, _ = resolve_model(model, revision=revision, allow_download=True)
    if path.is_dir() and (path / "config.json").is_file():
        from transformers import AutoConfig

        try:
            return AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=False)
        except (OSError, ValueError) as exc:
            raise UsageError(f"could not read {path / 'config.json'} ({str(exc).splitlines()[0]})") from None
    return load_model(model, device="cpu", revision=revision).config


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    command = {"calibrate": cmd_calibrate, "kv_qparams": cmd_kv_qparams, "lmdeploy": cmd_lmdeploy,
               "plan": cmd_plan}[args.command]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            rc = command(args)
        except KVQError as exc:
            _print_warnings(caught)
            print(f"error: {one_line(exc)}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            _print_warnings(caught)
            print("\ninterrupted", file=sys.stderr)
            return 130
        except Exception as exc:  # noqa: BLE001  a bug: one line here, the traceback in the log
            _print_warnings(caught)
            print(internal_error(exc, f"python -m calib {args.command}"), file=sys.stderr)
            return 1
    _print_warnings(caught)
    return rc


def _print_warnings(caught: list[warnings.WarningMessage]) -> None:
    seen: set[str] = set()
    for w in caught:
        text = one_line(w.message)
        # Only our own warnings: library chatter (deprecations and the like) stays out of the way.
        if issubclass(w.category, (DeprecationWarning, PendingDeprecationWarning, FutureWarning)) or text in seen:
            continue
        seen.add(text)
        print(f"warning: {text}", file=sys.stderr)
