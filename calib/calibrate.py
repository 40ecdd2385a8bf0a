"""K/V and activation statistics over calibration text, layer by layer (LMDeploy's ``lite calibrate``).

The model runs one decoder layer at a time, as LMDeploy does, so the GPU holds one layer's weights
and one batch's activations, never the whole model (how LMDeploy calibrates a 7B model on 128 x 2048
tokens on a 24 GB GPU): the inputs of layer 0 are caught with a pre-forward hook that stops the
forward (the Catcher trick); then each layer in turn moves to the compute device, runs every sample
(``batch_size`` at a time) with observers attached, hands its outputs (kept on the CPU when computing
on CUDA) to the next layer and moves back.

What is observed, per layer, over every calibration token:

* K and V as stored in the KV cache (K after RoPE): an :class:`ObservingCache` is passed to the layer
  call; its ``update()`` feeds the observers and returns the states unchanged.
* K before RoPE: ``k_proj``'s output reshaped to ``(num_kv_heads, head_dim)``, by a forward hook
  (for models with a K norm, e.g. Qwen3's ``k_norm``, that is before the norm too).
* The input and output of every ``nn.Linear`` in the decoder layer, per channel.

The work dir holds LMDeploy's files (``key_stats.pth``, ``value_stats.pth``, ``inputs_stats.pth``,
``outputs_stats.pth``: ``{stat: {module name: tensor}}``) plus ``key_stats_pre_rope.pth`` and
``calib_meta.json``. It is written to a temporary folder next to it and swapped in at the end, so a
failed or cancelled run leaves a previous work dir as it was.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import transformers
from torch import nn
from tqdm.auto import tqdm
from transformers.cache_utils import Cache

from kvcache.capacity import free_memory_bytes
from kvcache.compat import cache_kwargs
from kvcache.kv_shape import KVShape, config_hash
from kvcache.overlap import ngram_sketch

from .data import CalibCancelled, CalibDataError, check_seqlen, load_calib_windows
from .observers import ACTIVATION_STATS, KV_STATS, ActivationObserver, KVObserver
from .stats_io import KEY_STATS_FILE, META_FILE, META_FORMAT_VERSION, VALUE_STATS_FILE

__all__ = [
    "calibrate", "ObservingCache", "CalibError", "CalibOOMError", "CalibNaNError", "CalibCancelled", "CalibDataError",
    "WORK_DIR_FILES",
]

TOOL = "kvq-studio calib"
TOOL_VERSION = "0.1.0"
KEY_STATS_PRE_ROPE_FILE = "key_stats_pre_rope.pth"
INPUTS_STATS_FILE = "inputs_stats.pth"
OUTPUTS_STATS_FILE = "outputs_stats.pth"
WORK_DIR_FILES = (
    KEY_STATS_FILE, VALUE_STATS_FILE, KEY_STATS_PRE_ROPE_FILE, INPUTS_STATS_FILE, OUTPUTS_STATS_FILE, META_FILE,
)
# Share of the progress bar given to loading the data (the model writing it, for 'self').
_DATA_SHARE = {"self": 0.3}
_CACHE_KWARGS = ("cache", "past_key_values", "past_key_value")

Progress = Callable[[float, str], "bool | None"]


class CalibError(ValueError):
    """A calibration run that cannot start or finish; the message says what to do."""


class CalibNaNError(CalibError):
    """NaN or inf in the collected statistics; the message names the layer."""


class CalibOOMError(RuntimeError):
    """Out of GPU (or CPU) memory; the message names the largest size that fits."""


class ObservingCache(Cache):
    """A ``Cache`` that stores nothing: ``update()`` shows K/V to ``on_update(layer_idx, key, value)``
    (``[batch, num_kv_heads, seq, head_dim]``, exactly what a cache would store) and returns them unchanged."""

    is_compileable = False

    def __init__(self, on_update: Callable[[int, torch.Tensor, torch.Tensor], None]):
        super().__init__(layers=[])
        self.on_update = on_update

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        self.on_update(layer_idx, key_states, value_states)
        return key_states, value_states

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0

    def get_mask_sizes(self, query_length: int, *args, **kwargs) -> tuple[int, int]:
        return query_length, 0


# --- model structure -------------------------------------------------------------------------------


@dataclass
class _Structure:
    layers: nn.ModuleList
    layers_name: str  # "model.layers"
    attn_names: list[str]  # "model.layers.0.self_attn"
    attns: list[nn.Module]
    shape: KVShape


def _structure(model: nn.Module) -> _Structure:
    config = model.config
    shape = KVShape.from_config(config)
    layers_name, layers = None, None
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) == shape.num_layers and name:
            layers_name, layers = name, mod
            break
    if layers is None:
        raise CalibError(f"cannot find the {shape.num_layers} decoder layers of {type(model).__name__}")
    attn_names, attns = [], []

    def is_attention(m: nn.Module) -> bool:
        return isinstance(getattr(m, "k_proj", None), nn.Linear) and isinstance(getattr(m, "v_proj", None), nn.Linear)

    for i, layer in enumerate(layers):
        found = next(((n, m) for n, m in layer.named_modules() if is_attention(m)), None)
        if found is None:
            raise CalibError(
                f"decoder layer {i} of {type(model).__name__} has no attention module with k_proj and v_proj: "
                "calibrate supports Llama-style attention (Llama, Mistral, Qwen2/3, InternLM3)"
            )
        attn_names.append(f"{layers_name}.{i}.{found[0]}")
        attns.append(found[1])
    k_out = attns[0].k_proj.out_features
    if k_out != shape.num_kv_heads * shape.head_dim:
        raise CalibError(
            f"k_proj of {attn_names[0]} has {k_out} outputs, the config says {shape.num_kv_heads} KV heads x "
            f"head_dim {shape.head_dim}"
        )
    return _Structure(layers, layers_name, attn_names, attns, shape)


# --- per-layer observers --------------------------------------------------------------------------


@dataclass
class _LayerObservers:
    key: KVObserver
    value: KVObserver
    key_pre_rope: KVObserver
    inputs: dict[str, ActivationObserver] = field(default_factory=dict)
    outputs: dict[str, ActivationObserver] = field(default_factory=dict)


def _attach(layer: nn.Module, prefix: str, attn: nn.Module, shape: KVShape, obs: _LayerObservers) -> list:
    """Forward hooks on every nn.Linear of ``layer`` (inputs/outputs) and on ``k_proj`` (K before RoPE)."""
    handles = []
    kvh, d = shape.num_kv_heads, shape.head_dim

    def linear_hook(name: str):
        def hook(mod: nn.Module, args: tuple, out: torch.Tensor) -> None:
            obs.inputs[name].update(args[0])
            obs.outputs[name].update(out)

        return hook

    for name, mod in layer.named_modules():
        if isinstance(mod, nn.Linear):
            full = f"{prefix}.{name}"
            obs.inputs[full] = ActivationObserver(mod.in_features)
            obs.outputs[full] = ActivationObserver(mod.out_features)
            handles.append(mod.register_forward_hook(linear_hook(full)))

    def k_pre_rope_hook(mod: nn.Module, args: tuple, out: torch.Tensor) -> None:
        obs.key_pre_rope.update(out.view(*out.shape[:-1], kvh, d))

    handles.append(attn.k_proj.register_forward_hook(k_pre_rope_hook))
    return handles


# --- progress -------------------------------------------------------------------------------------


class _Progress:
    """A tqdm bar plus the caller's ``progress(fraction, message)``; returning False cancels."""

    def __init__(self, callback: Progress | None, bar: bool | None, start: float = 0.0):
        self.callback, self.start = callback, start
        self.total, self.done = 1, 0
        self.bar = None
        self._bar_on = bar

    def data_phase(self, share: float) -> Callable[[float, str], bool | None]:
        def report(fraction: float, message: str) -> bool | None:
            self.report(fraction * share, message)
            return None

        return report

    def begin(self, total: int, start: float) -> None:
        self.total, self.start, self.done = max(total, 1), start, 0
        disable = None if self._bar_on is None else not self._bar_on  # None: only on a terminal
        self.bar = tqdm(total=total, desc="calibrate", unit="batch", disable=disable, leave=False)

    def step(self, message: str) -> None:
        self.done += 1
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix_str(message, refresh=False)
        self.report(self.start + (1.0 - self.start) * self.done / self.total, message)

    def report(self, fraction: float, message: str) -> None:
        if self.callback is None:
            return
        if self.callback(min(max(fraction, 0.0), 1.0), message) is False:
            raise CalibCancelled(
                f"calibration cancelled ({message}): nothing was written, the old work dir is untouched"
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# --- the work dir ---------------------------------------------------------------------------------


def _check_work_dir(work_dir: Path) -> None:
    """Refuse a work dir that replacing as a whole would damage (a file, cwd, or one holding other files)."""
    if work_dir.exists() and not work_dir.is_dir():
        raise CalibError(f"work dir {work_dir} is a file: choose a folder with --work-dir")
    if work_dir.is_dir():
        cwd = Path.cwd().resolve()
        if cwd == work_dir or work_dir in cwd.parents:
            raise CalibError(f"work dir {work_dir} holds the current directory: choose a new folder with --work-dir")
        foreign = sorted(p.name for p in work_dir.iterdir() if p.name not in WORK_DIR_FILES)
        if foreign:
            shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
            raise CalibError(
                f"work dir {work_dir} holds files that are not calibration output ({shown}); it is replaced as a "
                "whole when calibration ends: choose an empty or new folder with --work-dir"
            )
    parent = work_dir.parent
    parent.mkdir(parents=True, exist_ok=True)
    if not os.access(parent, os.W_OK):
        raise CalibError(f"cannot write next to the work dir: {parent} is not writable; choose another --work-dir")


def _write_work_dir(work_dir: Path, files: dict[str, Any]) -> None:
    """Write ``files`` into a temporary folder next to ``work_dir``, then swap it in (old one aside, then removed)."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{work_dir.name}.tmp-", dir=work_dir.parent))
    try:
        for name, obj in files.items():
            if name.endswith(".json"):
                (tmp / name).write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
            else:
                torch.save(obj, tmp / name)
        old = None
        if work_dir.exists():
            old = work_dir.parent / f".{work_dir.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(work_dir, old)
        try:
            os.rename(tmp, work_dir)
        except BaseException:
            if old is not None:
                os.rename(old, work_dir)
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# --- memory ---------------------------------------------------------------------------------------


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB"


def _check_cpu_memory(samples: int, seqlen: int, hidden: int, act_bytes: int) -> None:
    """The activations of all samples wait in CPU memory between layers: refuse early when they cannot."""
    need = samples * seqlen * hidden * act_bytes
    avail = free_memory_bytes("cpu")
    if need <= 0.8 * avail:
        return
    fit = max(0, int(0.8 * avail // (seqlen * hidden * act_bytes)))
    raise CalibOOMError(
        f"the activations of {samples} samples x {seqlen} tokens need {_gib(need)} of CPU memory, {_gib(avail)} is "
        f"available: at most about {fit} samples x {seqlen} fit; lower --calib-samples (or --calib-seqlen)"
    )


@dataclass
class _MemoryModel:
    """Bytes one decoder layer's forward needs per token: ``linear + quadratic * seqlen`` (attention scores)."""

    linear: float
    quadratic: float
    layer_bytes: int
    measured: float | None = None  # bytes per token measured at ``measured_seqlen``
    measured_seqlen: int = 0

    def per_token(self, seqlen: int) -> float:
        analytic = self.linear + self.quadratic * seqlen
        if self.measured is None:
            return analytic
        return self.measured * analytic / (self.linear + self.quadratic * self.measured_seqlen)


def _memory_model(struct: _Structure, model: nn.Module, act_bytes: int) -> _MemoryModel:
    cfg = getattr(model.config, "text_config", None) or model.config
    h = cfg.hidden_size
    inter = max((m.out_features for m in struct.layers[0].modules() if isinstance(m, nn.Linear)), default=h)
    s = struct.shape
    q, kv = s.num_heads * s.head_dim, s.num_kv_heads * s.head_dim
    linear = act_bytes * (4 * h + 2 * q + 4 * kv + 3 * inter) + 8 * inter
    quadratic = 2 * s.num_heads * act_bytes  # scores + softmax when SDPA takes its math path
    layer_bytes = max(sum(p.numel() * p.element_size() for p in layer.parameters()) for layer in struct.layers)
    return _MemoryModel(linear, quadratic, layer_bytes)


def _oom_message(where: str, device: torch.device, batch_size: int, seqlen: int, mem: _MemoryModel) -> str:
    if device.type == "cuda":
        torch.cuda.empty_cache()
    free, what = free_memory_bytes(device), ("GPU" if device.type == "cuda" else "CPU")
    budget = 0.9 * free - mem.layer_bytes
    per_sample = seqlen * mem.per_token(seqlen)
    fit_batch = int(budget // per_sample) if budget > 0 else 0
    scale = mem.per_token(seqlen) / (mem.linear + mem.quadratic * seqlen)
    lin, quad = mem.linear * scale, mem.quadratic * scale
    if budget <= 0:
        fit_seqlen = 0
    elif quad > 0:
        fit_seqlen = int((-lin + math.sqrt(lin * lin + 4 * quad * budget)) / (2 * quad))
    else:
        fit_seqlen = int(budget // lin)
    fit_seqlen = fit_seqlen // 128 * 128 if fit_seqlen >= 256 else fit_seqlen
    head = (
        f"out of {what} memory in {where} with batch_size {batch_size} x seqlen {seqlen} "
        f"(about {_gib(per_sample)} per sample, {_gib(free)} free on {device})"
    )
    if fit_batch >= 1:
        fits = f"the largest that fits is about batch_size {min(fit_batch, batch_size)} x seqlen {seqlen}"
        if fit_seqlen > seqlen:
            fits += f" (or 1 x {fit_seqlen})"
    elif fit_seqlen >= 1:
        fits = (
            f"seqlen {seqlen} does not fit even at batch_size 1; the largest that fits is about "
            f"batch_size 1 x seqlen {fit_seqlen}"
        )
    else:
        fits = "not even one short sample fits: free memory, or calibrate on the CPU (--device cpu)"
    samples = ""
    if what == "GPU":
        samples = " (--calib-samples does not count: activations wait in CPU memory between layers)"
    return f"{head}: {fits}; lower --batch-size or --calib-seqlen{samples}"


def _is_oom(exc: BaseException) -> bool:
    oom = getattr(torch, "OutOfMemoryError", None) or torch.cuda.OutOfMemoryError
    if isinstance(exc, oom):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("can't allocate memory" in text or "not enough memory" in text)


# --- the Catcher ----------------------------------------------------------------------------------


class _StopForward(Exception):
    """Raised by the layer-0 pre-hook once it has the layer's inputs."""


def _move(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(_move(o, device) for o in obj)
    if isinstance(obj, list):
        return [_move(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: _move(v, device) for k, v in obj.items()}
    return obj


def _catch_layer0_inputs(
    model: nn.Module, layer0: nn.Module, batches: list[torch.Tensor], store: torch.device, progress: _Progress
) -> tuple[list[torch.Tensor], dict[int, dict[str, Any]]]:
    """Run the model up to decoder layer 0 for every batch: its hidden-state inputs, and its call kwargs
    (position embeddings, mask, ...) once per batch size."""
    hidden_states: list[torch.Tensor] = []
    kwargs_by_batch: dict[int, dict[str, Any]] = {}
    caught: dict[str, Any] = {}

    def catcher(module: nn.Module, args: tuple, kwargs: dict[str, Any]):
        kwargs = dict(kwargs)
        caught["hidden"] = args[0] if args else kwargs.pop("hidden_states")
        caught["kwargs"] = {k: v for k, v in kwargs.items() if k not in _CACHE_KWARGS}
        raise _StopForward

    embed_device = model.get_input_embeddings().weight.device
    handle = layer0.register_forward_pre_hook(catcher, with_kwargs=True)
    try:
        for j, ids in enumerate(batches):
            caught.clear()
            try:
                model(input_ids=ids.to(embed_device), use_cache=False)
            except _StopForward:
                pass
            if "hidden" not in caught:
                raise CalibError(f"{type(model).__name__}'s forward never reached decoder layer 0")
            hidden_states.append(caught["hidden"].to(store))
            kwargs_by_batch.setdefault(ids.shape[0], caught["kwargs"])
            progress.step(f"embeddings {j + 1}/{len(batches)}")
    finally:
        handle.remove()
    return hidden_states, kwargs_by_batch


# --- calibrate ------------------------------------------------------------------------------------


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

    ``loaded``: a :class:`kvcache.model_loader.LoadedModel`, or anything with ``.model`` (a transformers
    causal LM), ``.tokenizer`` and ``.name`` (``.source`` is recorded when present).
    ``dataset`` / ``samples`` / ``seqlen`` / ``seed`` / ``data_dir``: see :func:`calib.data.load_calib_windows`.
    ``windows``: ``[samples, seqlen]`` token ids to use instead of loading ``dataset`` (which is then only
    recorded as their name). ``device``: where each layer runs (default: where the model is).
    ``progress(fraction, message)``: called after every batch; returning False (or raising
    :class:`CalibCancelled`) stops the run and leaves ``work_dir`` as it was. ``bar``: the terminal tqdm
    bar (None: only on a terminal). Returns the work dir.
    """
    model = loaded.model
    struct = _structure(model)
    shape = struct.shape
    work_dir = Path(work_dir).expanduser().resolve()
    _check_work_dir(work_dir)
    if batch_size < 1:
        raise CalibError(f"batch_size must be at least 1, got {batch_size}")
    model_device = next(model.parameters()).device
    try:
        compute = torch.device(device) if device is not None else model_device
    except RuntimeError:
        raise CalibError(f"unknown device {device!r}: use 'cpu', 'cuda' or 'cuda:N'") from None
    if compute.type == "cuda" and not torch.cuda.is_available():
        raise CalibError("CUDA was asked for but is not available: use device 'cpu'")

    prog = _Progress(progress, bar)
    name = str(dataset)
    windows_given = windows is not None
    share = 0.0 if windows is not None else _DATA_SHARE.get(name.lower(), 0.0)
    prog.report(0.0, "loading calibration data" if windows is None else "calibration windows given")
    if windows is None:
        try:
            windows = load_calib_windows(
                name, loaded.tokenizer, samples, seqlen, seed=seed, data_dir=data_dir, model=model,
                progress=prog.data_phase(share) if share else None,
            )
        except Exception as exc:  # 'self' runs the model to write its text: it can run out of memory too
            if not _is_oom(exc):
                raise
            prog.close()
            raise CalibOOMError(f"out of memory while loading the {name!r} calibration data ({samples} x {seqlen} "
                                "tokens): lower --calib-samples or --calib-seqlen") from None
    windows = _check_windows(windows, model)
    samples, seqlen = windows.shape
    check_seqlen(seqlen, model)

    dtype = next(model.parameters()).dtype
    act_bytes = torch.finfo(dtype).bits // 8 if dtype.is_floating_point else 4
    hidden_size = (getattr(model.config, "text_config", None) or model.config).hidden_size
    _check_cpu_memory(samples, seqlen, hidden_size, act_bytes)
    store = torch.device("cpu") if compute.type == "cuda" else compute
    batches = list(windows.split(batch_size))
    mem = _memory_model(struct, model, act_bytes)

    run = _Run(struct, compute, store, prog, mem, dtype)
    prog.begin(len(batches) * (shape.num_layers + 1), share)
    oom = False
    try:
        _observe(run, model, batches)
        prog.report(1.0, f"saving the stats to {work_dir}")
    except Exception as exc:
        if not _is_oom(exc):
            raise
        oom = True  # leave the except block first, so the failed batch's tensors are freed before measuring
    finally:
        prog.close()
        if compute.type == "cuda":
            torch.cuda.empty_cache()
    if oom:
        raise CalibOOMError(_oom_message(run.where, compute, run.batch, seqlen, mem))

    meta = _meta(loaded, model, shape, struct, name, data_dir, windows_given=windows_given,
                 samples=samples, seqlen=seqlen, seed=seed, batch_size=batch_size, dtype=dtype, device=compute)
    meta["text_sketch"] = ngram_sketch(windows)  # lets an evaluation say whether its text overlaps this one
    _write_work_dir(work_dir, {
        KEY_STATS_FILE: run.stats["key"],
        VALUE_STATS_FILE: run.stats["value"],
        KEY_STATS_PRE_ROPE_FILE: run.stats["key_pre_rope"],
        INPUTS_STATS_FILE: run.inputs_stats,
        OUTPUTS_STATS_FILE: run.outputs_stats,
        META_FILE: meta,
    })
    return work_dir


@dataclass
class _Run:
    """One calibration run's state: where things run, the stats gathered so far, where it is now."""

    struct: _Structure
    compute: torch.device
    store: torch.device  # where activations wait between layers
    prog: _Progress
    mem: _MemoryModel
    dtype: torch.dtype
    stats: dict = field(default_factory=lambda: {
        k: {s: {} for s in KV_STATS} for k in ("key", "value", "key_pre_rope")})
    inputs_stats: dict = field(default_factory=lambda: {s: {} for s in ACTIVATION_STATS})
    outputs_stats: dict = field(default_factory=lambda: {s: {} for s in ACTIVATION_STATS})
    where: str = "the embeddings"
    batch: int = 0


def _observe(run: _Run, model: nn.Module, batches: list[torch.Tensor]) -> None:
    """Catch layer 0's inputs, then run every layer over all batches with its observers attached."""
    struct, compute, shape = run.struct, run.compute, run.struct.shape
    run.batch = batches[0].shape[0]
    hidden, kwargs_by_batch = _catch_layer0_inputs(model, struct.layers[0], batches, run.store, run.prog)
    dev_kwargs = {b: _move(kw, compute) for b, kw in kwargs_by_batch.items()}
    for kw in dev_kwargs.values():
        if "use_cache" in kw:
            kw["use_cache"] = True
    for i, layer in enumerate(struct.layers):
        run.where = f"layer {i} ({struct.attn_names[i]})"
        obs = _LayerObservers(*(KVObserver(shape.num_kv_heads, shape.head_dim) for _ in range(3)))

        def on_update(layer_idx: int, k: torch.Tensor, v: torch.Tensor, obs: _LayerObservers = obs) -> None:
            obs.key.update(k.transpose(1, 2))  # [batch, heads, seq, dim] -> [batch, seq, heads, dim]
            obs.value.update(v.transpose(1, 2))

        cache = ObservingCache(on_update)
        layer_device = next(layer.parameters()).device
        handles = _attach(layer, f"{struct.layers_name}.{i}", struct.attns[i], shape, obs)
        try:
            layer.to(compute)
            for j, h in enumerate(hidden):
                run.batch = h.shape[0]
                measure = compute.type == "cuda" and j == 0
                if measure:
                    torch.cuda.reset_peak_memory_stats(compute)
                    base = torch.cuda.memory_allocated(compute)
                out = layer(h.to(compute), **dev_kwargs[h.shape[0]], **cache_kwargs(cache))
                out = out[0] if isinstance(out, tuple) else out
                if measure:
                    used = (torch.cuda.max_memory_allocated(compute) - base) / h[..., 0].numel()
                    if run.mem.measured is None or used > run.mem.measured:
                        run.mem.measured, run.mem.measured_seqlen = used, h.shape[1]
                hidden[j] = out.to(run.store)  # layer i's outputs are layer i+1's inputs
                run.prog.step(f"layer {i + 1}/{shape.num_layers}, batch {j + 1}/{len(hidden)}")
        finally:
            for handle in handles:
                handle.remove()
            layer.to(layer_device)
        _collect(i, struct, obs, run.stats, run.inputs_stats, run.outputs_stats, run.dtype)


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


def _collect(i: int, struct: _Structure, obs: _LayerObservers, stats: dict, inputs_stats: dict,
             outputs_stats: dict, dtype: torch.dtype) -> None:
    """Move layer ``i``'s observer results into the stat dicts, refusing NaN/inf."""
    attn = struct.attn_names[i]
    hint = (
        f"the model overflows in {str(dtype).removeprefix('torch.')} on this data: calibrate in float32 or "
        "bfloat16, or check the model's weights" if dtype in (torch.float16, torch.bfloat16)
        else "check the model's weights"
    )
    for key, label in (("key", "K"), ("value", "V"), ("key_pre_rope", "K before RoPE")):
        for s, t in getattr(obs, key).stats().items():
            if not torch.isfinite(t).all():
                raise CalibNaNError(f"layer {i} ({attn}): {label} {s} has NaN or inf values; {hint}")
            stats[key][s][attn] = t
    for group, out in ((obs.inputs, inputs_stats), (obs.outputs, outputs_stats)):
        which = "input" if group is obs.inputs else "output"
        for name, o in group.items():
            if o.num_tokens == 0:  # e.g. an MoE expert no token was routed to
                continue
            for s, t in o.stats().items():
                if not torch.isfinite(t).all():
                    raise CalibNaNError(f"layer {i} ({name}): {which} {s} has NaN or inf values; {hint}")
                out[s][name] = t


def _meta(loaded: Any, model: nn.Module, shape: KVShape, struct: _Structure, dataset: str, data_dir: Any, *,
          windows_given: bool, samples: int, seqlen: int, seed: int, batch_size: int, dtype: torch.dtype,
          device: torch.device) -> dict[str, Any]:
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
