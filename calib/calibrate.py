"""K/V and activation statistics over calibration text into a work dir (LMDeploy's ``lite calibrate``).

The pipeline: check the inputs (before anything heavy runs), load the calibration windows
(:mod:`calib.data`), run the model layer by layer with observers attached (:mod:`calib.layerwise`),
turn running out of memory into a message that names what fits (:mod:`calib.memory`), and swap the
work dir in at the end (:mod:`calib.workdir`), so a failed or cancelled run leaves a previous one as it was.

The work dir holds LMDeploy's files (``key_stats.pth``, ``value_stats.pth``, ``inputs_stats.pth``,
``outputs_stats.pth``: ``{stat: {module name: tensor}}``) plus ``key_stats_pre_rope.pth`` and
``calib_meta.json``.
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import transformers
from torch import nn

from kvcache.measure.overlap import ngram_sketch
from kvcache.models.variants import rope_inv_freq
from kvcache.shape import config_hash

from .data import check_dataset, check_seqlen, load_calib_windows
from .errors import (
    CalibCancelled,
    CalibDataError,
    CalibError,
    CalibNaNError,
    CalibOOMError,
)
from .layerwise import (
    DecoderStructure,
    LayerwiseRun,
    find_decoder_structure,
    observe_layers,
)
from .memory import MemoryModel, check_cpu_memory, is_oom, oom_message
from .progress import Progress, RunProgress
from .workdir import (
    INPUTS_STATS_FILE,
    KEY_STATS_FILE,
    KEY_STATS_PRE_ROPE_FILE,
    QK_MOMENTS_FILE,
    META_FILE,
    META_FORMAT_VERSION,
    OUTPUTS_STATS_FILE,
    VALUE_STATS_FILE,
    check_work_dir,
    write_work_dir,
)

# The errors are calib.errors'; importable from here too, as callers do.
__all__ = [
    "CalibCancelled",
    "CalibDataError",
    "CalibError",
    "CalibNaNError",
    "CalibOOMError",
    "calibrate",
    "check_inputs",
    "parse_device",
]

TOOL = "kvq-studio calib"
TOOL_VERSION = "0.1.0"
# Share of the progress bar given to loading the data (the model writing it, for 'self').
_DATA_SHARE = {"self": 0.3}


def parse_device(device: str | torch.device | None) -> torch.device | None:
    """``device`` as a torch device (None stays None: where the model is), refused when unknown or absent."""
    if device is None:
        return None
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise CalibError(f"unknown device {device!r}: use 'cpu', 'cuda' or 'cuda:N'") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CalibError("CUDA was asked for but is not available: use device 'cpu'")
    return dev


def check_inputs(
    *,
    dataset: str | None = "c4",
    samples: int = 128,
    seqlen: int = 2048,
    work_dir: str | Path = "./quant_output",
    data_dir: str | Path | None = None,
    device: str | torch.device | None = None,
    batch_size: int = 1,
) -> Path:
    """The checks that need no model (run them before loading one); returns the resolved work dir.

    ``dataset`` None: the windows are given (``samples``, ``seqlen`` and ``data_dir`` are not used then).
    """
    work_dir = check_work_dir(work_dir)
    if batch_size < 1:
        raise CalibError(f"batch_size must be at least 1, got {batch_size}")
    if dataset is not None:
        if samples < 1 or seqlen < 1:
            raise CalibDataError(f"samples and seqlen must be at least 1 (got samples={samples}, seqlen={seqlen})")
        check_dataset(dataset, data_dir)
    parse_device(device)
    return work_dir


@torch.no_grad()
def calibrate(
    loaded: Any,
    *,
    dataset: str = "c4",
    samples: int = 128,
    seqlen: int = 2048,
    seed: int = 0,
    work_dir: str | Path = "./quant_output",
    data_dir: str | Path | None = None,
    device: str | torch.device | None = None,
    progress: Progress | None = None,
    batch_size: int = 1,
    windows: torch.Tensor | None = None,
    bar: bool | None = None,
) -> Path:
    """Collect K/V and linear-layer statistics of ``loaded.model`` over calibration text into ``work_dir``.

    ``loaded``: a :class:`kvcache.models.loader.LoadedModel`, or anything with ``.model`` (a transformers
    causal LM), ``.tokenizer`` and ``.name`` (``.source`` is recorded when present).
    ``dataset`` / ``samples`` / ``seqlen`` / ``seed`` / ``data_dir``: see :func:`calib.data.load_calib_windows`.
    ``windows``: ``[samples, seqlen]`` token ids to use instead of loading ``dataset`` (which is then only
    recorded as their name). ``device``: where each layer runs (default: where the model is).
    ``progress(fraction, message)``: called after every batch; returning False (or raising
    :class:`CalibCancelled`) stops the run and leaves ``work_dir`` as it was. ``bar``: the terminal tqdm
    bar (None: only on a terminal). Returns the work dir.
    """
    name, given = str(dataset), windows is not None
    work_dir = check_inputs(dataset=None if given else name, samples=samples, seqlen=seqlen, work_dir=work_dir,
                            data_dir=data_dir, device=device, batch_size=batch_size)
    model = loaded.model
    struct = find_decoder_structure(model)
    compute = parse_device(device) or next(model.parameters()).device

    prog = RunProgress(progress, bar)
    share = 0.0 if given else _DATA_SHARE.get(name.lower(), 0.0)
    if windows is None:
        windows = _load_windows(loaded, name, samples, seqlen, seed, data_dir, prog, share)
    else:
        prog.report(0.0, "calibration windows given")
    windows = _check_windows(windows, model)
    samples, seqlen = windows.shape
    check_seqlen(seqlen, model)

    dtype = next(model.parameters()).dtype
    act_bytes = torch.finfo(dtype).bits // 8 if dtype.is_floating_point else 4
    hidden_size = (getattr(model.config, "text_config", None) or model.config).hidden_size
    check_cpu_memory(samples, seqlen, hidden_size, act_bytes)
    store = torch.device("cpu") if compute.type == "cuda" else compute
    batches = list(windows.split(batch_size))
    mem = MemoryModel.of(struct.layers, struct.shape, hidden_size, act_bytes)
    run = LayerwiseRun(struct, compute, store, prog, mem, dtype)
    prog.begin(len(batches) * (struct.shape.num_layers + 1), share)
    _observe(run, model, batches, work_dir)

    meta = _meta(loaded, model, struct, name, data_dir, windows_given=given, samples=samples, seqlen=seqlen,
                 seed=seed, batch_size=batch_size, dtype=dtype, device=compute)
    meta["text_sketch"] = ngram_sketch(windows)  # lets an evaluation say whether its text overlaps this one
    write_work_dir(work_dir, {
        KEY_STATS_FILE: run.stats["key"],
        VALUE_STATS_FILE: run.stats["value"],
        KEY_STATS_PRE_ROPE_FILE: run.stats["key_pre_rope"],
        **({QK_MOMENTS_FILE: _with_rope(run.moments, model)} if run.moments["key"] else {}),
        INPUTS_STATS_FILE: run.inputs_stats,
        OUTPUTS_STATS_FILE: run.outputs_stats,
        META_FILE: meta,
    })
    return work_dir


def _with_rope(moments: dict, model: nn.Module) -> dict:
    """The moments plus the model's RoPE frequencies: the export fits the key transform to a longer context with them."""
    inv_freq = rope_inv_freq(model)
    return {**moments, "rope_inv_freq": inv_freq} if inv_freq is not None else moments


def _load_windows(loaded: Any, name: str, samples: int, seqlen: int, seed: int, data_dir: Any,
                  prog: RunProgress, share: float) -> torch.Tensor:
    """The dataset's windows; 'self' runs the model to write its text, so it can run out of memory too."""
    prog.report(0.0, "loading calibration data")
    try:
        return load_calib_windows(name, loaded.tokenizer, samples, seqlen, seed=seed, data_dir=data_dir,
                                  model=loaded.model, progress=prog.data_phase(share) if share else None)
    except Exception as exc:
        if not is_oom(exc):
            raise
    prog.close()  # outside the except block, so the failed step's tensors are freed
    raise CalibOOMError(f"out of memory while loading the {name!r} calibration data ({samples} x {seqlen} "
                        "tokens): lower --calib-samples or --calib-seqlen")


def _observe(run: LayerwiseRun, model: nn.Module, batches: list[torch.Tensor], work_dir: Path) -> None:
    """Run every layer; out of memory becomes :class:`CalibOOMError` naming the largest size that fits."""
    oom = False
    try:
        observe_layers(run, model, batches)
        run.prog.report(1.0, f"saving the stats to {work_dir}")
    except Exception as exc:
        if not is_oom(exc):
            raise
        oom = True  # leave the except block first, so the failed batch's tensors are freed before measuring
    finally:
        run.prog.close()
        if run.compute.type == "cuda":
            torch.cuda.empty_cache()
    if oom:
        raise CalibOOMError(oom_message(run.where, run.compute, run.batch, batches[0].shape[1], run.mem))


def _check_windows(windows: Any, model: nn.Module) -> torch.Tensor:
    if not isinstance(windows, torch.Tensor) or windows.dim() != 2 or windows.dtype.is_floating_point:
        got = tuple(windows.shape) if isinstance(windows, torch.Tensor) else type(windows).__name__
        raise CalibDataError(f"windows must be a [samples, seqlen] tensor of token ids, got {got}")
    if windows.numel() == 0:
        raise CalibDataError("windows are empty: at least one sample of at least one token is needed")
    vocab = model.get_input_embeddings().num_embeddings
    lo, hi = int(windows.min()), int(windows.max())
    if lo < 0 or hi >= vocab:
        raise CalibDataError(f"windows hold token ids outside the model's vocabulary (0..{vocab - 1}): {lo}..{hi}")
    return windows.long().cpu()


def _meta(loaded: Any, model: nn.Module, struct: DecoderStructure, dataset: str, data_dir: Any, *,
          windows_given: bool, samples: int, seqlen: int, seed: int, batch_size: int, dtype: torch.dtype,
          device: torch.device) -> dict[str, Any]:
    """``calib_meta.json``: what was calibrated on what, so readers can check the model and name the data."""
    shape = struct.shape
    return {
        "format_version": META_FORMAT_VERSION,
        "tool": TOOL,
        "tool_version": TOOL_VERSION,
        "model": str(getattr(loaded, "name", None) or type(model).__name__),
        "model_path": str(getattr(loaded, "source", "") or ""),
        "model_type": getattr(model.config, "model_type", None),
        "config_hash": config_hash(model.config),
        "num_layers": shape.num_layers,
        "num_kv_heads": shape.num_kv_heads,
        "head_dim": shape.head_dim,
        "layer_names": struct.attn_names,
        "dataset": dataset,
        "windows_given": windows_given,
        "data_dir": str(data_dir) if data_dir is not None else None,
        "samples": samples,
        "seqlen": seqlen,
        "seed": seed,
        "batch_size": batch_size,
        "tokens_seen": samples * seqlen,
        "dtype": str(dtype).removeprefix("torch."),
        "device": str(device),
        "key_stats": "K as stored in the KV cache (after RoPE); key_stats_pre_rope.pth: k_proj output",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
    }
