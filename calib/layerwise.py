"""The model run one decoder layer at a time, with observers on what calibration records.

As LMDeploy does, so the GPU holds one layer's weights and one batch's activations, never the whole
model (how LMDeploy calibrates a 7B model on 128 x 2048 tokens on a 24 GB GPU): the inputs of layer 0
are caught with a pre-forward hook that stops the forward (the Catcher trick); then each layer in turn
moves to the compute device, runs every batch with observers attached, hands its outputs (kept on the
CPU when computing on CUDA) to the next layer and moves back.

What is observed, per layer, over every calibration token:

* K and V as stored in the KV cache (K after RoPE): an :class:`ObservingCache` is passed to the layer
  call; its ``update()`` feeds the observers and returns the states unchanged.
* K before RoPE: ``k_proj``'s output reshaped to ``(num_kv_heads, head_dim)``, by a forward hook
  (for models with a K norm, e.g. Qwen3's ``k_norm``, that is before the norm too).
* The input and output of every ``nn.Linear`` in the decoder layer, per channel.
* The second moments ``E[k k^T]`` and ``E[q q^T]`` per KV head (K and Q after RoPE; a KV head's query
  heads averaged), from which the query-aware key transform is computed at export: the queries are
  seen by the ``kvq`` attention (:func:`kvcache.hf.attention.observing_queries`).

Every hook sees only the calibrating thread's forwards (:func:`this_thread_only`), so the app's chats may run
the same model between batches.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers.cache_utils import Cache

from kvcache.hf.attention import observing_queries
from kvcache.hf.compat import cache_kwargs
from kvcache.shape import KVShape

from .errors import CalibError, CalibNaNError
from .memory import MemoryModel
from .observers import ACTIVATION_STATS, KV_STATS, ActivationObserver, KVObserver, SecondMomentObserver
from .progress import RunProgress

_CACHE_KWARGS = ("cache", "past_key_values", "past_key_value")
KV_GROUPS = (("key", "K"), ("value", "V"), ("key_pre_rope", "K before RoPE"))  # stat group, its label


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
class DecoderStructure:
    """Where a causal LM keeps its decoder layers and their attention modules."""

    layers: nn.ModuleList
    layers_name: str  # "model.layers"
    attn_names: list[str]  # "model.layers.0.self_attn"
    attns: list[nn.Module]
    shape: KVShape


def _is_attention(m: nn.Module) -> bool:
    return isinstance(getattr(m, "k_proj", None), nn.Linear) and isinstance(getattr(m, "v_proj", None), nn.Linear)


def find_decoder_structure(model: nn.Module) -> DecoderStructure:
    """The decoder layers (the ModuleList as long as the config's layer count) and each one's attention."""
    shape = KVShape.from_config(model.config)
    found = next(((n, m) for n, m in model.named_modules()
                  if isinstance(m, nn.ModuleList) and len(m) == shape.num_layers and n), None)
    if found is None:
        raise CalibError(f"cannot find the {shape.num_layers} decoder layers of {type(model).__name__}")
    layers_name, layers = found
    attn_names, attns = [], []
    for i, layer in enumerate(layers):
        attn = next(((n, m) for n, m in layer.named_modules() if _is_attention(m)), None)
        if attn is None:
            raise CalibError(
                f"decoder layer {i} of {type(model).__name__} has no attention module with k_proj and v_proj: "
                "calibrate supports Llama-style attention (Llama, Mistral, Qwen2/3, InternLM3)"
            )
        attn_names.append(f"{layers_name}.{i}.{attn[0]}")
        attns.append(attn[1])
    k_out = attns[0].k_proj.out_features
    if k_out != shape.num_kv_heads * shape.head_dim:
        raise CalibError(
            f"k_proj of {attn_names[0]} has {k_out} outputs, the config says {shape.num_kv_heads} KV heads x "
            f"head_dim {shape.head_dim}"
        )
    return DecoderStructure(layers, layers_name, attn_names, attns, shape)


# --- per-layer observers --------------------------------------------------------------------------


@dataclass
class _LayerObservers:
    key: KVObserver
    value: KVObserver
    key_pre_rope: KVObserver
    key_moment: SecondMomentObserver
    query_moment: SecondMomentObserver
    inputs: dict[str, ActivationObserver] = field(default_factory=dict)
    outputs: dict[str, ActivationObserver] = field(default_factory=dict)

    @classmethod
    def of(cls, shape: KVShape) -> "_LayerObservers":
        kv = [KVObserver(shape.num_kv_heads, shape.head_dim) for _ in range(3)]
        return cls(*kv, *(SecondMomentObserver(shape.num_kv_heads, shape.head_dim) for _ in range(2)))

    def on_cache_update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> None:
        self.key.update(k.transpose(1, 2))  # [batch, heads, seq, dim] -> [batch, seq, heads, dim]
        self.value.update(v.transpose(1, 2))
        self.key_moment.update(k)

    def on_query(self, q: torch.Tensor) -> None:
        self.query_moment.update(q)


def this_thread_only(hook: Callable[..., Any]) -> Callable[..., Any]:
    """``hook``, silent when called from another thread than the one that made it: in the app, chat steps run the
    same model between calibration batches (they take turns on the device), and must not count in the stats."""
    owner = threading.get_ident()

    @functools.wraps(hook)
    def guarded(*args: Any, **kwargs: Any) -> Any:
        return hook(*args, **kwargs) if threading.get_ident() == owner else None

    return guarded


def _attach(layer: nn.Module, prefix: str, attn: nn.Module, shape: KVShape, obs: _LayerObservers) -> list:
    """Forward hooks on every nn.Linear of ``layer`` (inputs/outputs) and on ``k_proj`` (K before RoPE), seeing only
    this thread's forwards."""
    handles = []
    kvh, d = shape.num_kv_heads, shape.head_dim

    def linear_hook(name: str):
        @this_thread_only
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

    @this_thread_only
    def k_pre_rope_hook(mod: nn.Module, args: tuple, out: torch.Tensor) -> None:
        obs.key_pre_rope.update(out.view(*out.shape[:-1], kvh, d))

    handles.append(attn.k_proj.register_forward_hook(k_pre_rope_hook))
    return handles


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


def catch_layer0_inputs(
    model: nn.Module, layer0: nn.Module, batches: list[torch.Tensor], store: torch.device, progress: RunProgress
) -> tuple[list[torch.Tensor], dict[int, dict[str, Any]]]:
    """Run the model up to decoder layer 0 for every batch: its hidden-state inputs, and its call kwargs
    (position embeddings, mask, ...) once per batch size."""
    hidden_states: list[torch.Tensor] = []
    kwargs_by_batch: dict[int, dict[str, Any]] = {}
    caught: dict[str, Any] = {}

    @this_thread_only
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


# --- the run --------------------------------------------------------------------------------------


def _stat_groups(names: tuple[str, ...]) -> dict[str, dict]:
    return {s: {} for s in names}


@dataclass
class LayerwiseRun:
    """One calibration run's state: where things run, the stats gathered so far, where it is now."""

    struct: DecoderStructure
    compute: torch.device
    store: torch.device  # where activations wait between layers
    prog: RunProgress
    mem: MemoryModel
    dtype: torch.dtype
    stats: dict = field(default_factory=lambda: {k: _stat_groups(KV_STATS) for k, _ in KV_GROUPS})
    moments: dict = field(default_factory=lambda: {"key": {}, "query": {}, "tokens": {}})  # E[x x^T] per layer
    inputs_stats: dict = field(default_factory=lambda: _stat_groups(ACTIVATION_STATS))
    outputs_stats: dict = field(default_factory=lambda: _stat_groups(ACTIVATION_STATS))
    where: str = "the embeddings"  # what ran last: an OOM message names it
    batch: int = 0  # the batch size that ran last


def observe_layers(run: LayerwiseRun, model: nn.Module, batches: list[torch.Tensor]) -> None:
    """Catch layer 0's inputs, then run every layer over all batches with its observers attached."""
    run.batch = batches[0].shape[0]
    hidden, kwargs_by_batch = catch_layer0_inputs(model, run.struct.layers[0], batches, run.store, run.prog)
    dev_kwargs = {b: _move(kw, run.compute) for b, kw in kwargs_by_batch.items()}
    for kw in dev_kwargs.values():
        if "use_cache" in kw:
            kw["use_cache"] = True
    for i in range(len(run.struct.layers)):
        _observe_layer(run, i, hidden, dev_kwargs)


def _observe_layer(run: LayerwiseRun, i: int, hidden: list[torch.Tensor], dev_kwargs: dict[int, dict]) -> None:
    """Layer ``i`` over every batch: ``hidden`` (its inputs) is replaced by its outputs, its stats collected."""
    struct, compute, shape = run.struct, run.compute, run.struct.shape
    layer = struct.layers[i]
    run.where = f"layer {i} ({struct.attn_names[i]})"
    obs = _LayerObservers.of(shape)
    cache = ObservingCache(obs.on_cache_update)
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
            with observing_queries(struct.attns[i], this_thread_only(obs.on_query)):
                out = layer(h.to(compute), **dev_kwargs[h.shape[0]], **cache_kwargs(cache))
            out = out[0] if isinstance(out, tuple) else out
            if measure:
                run.mem.record((torch.cuda.max_memory_allocated(compute) - base) / h[..., 0].numel(), h.shape[1])
            hidden[j] = out.to(run.store)  # layer i's outputs are layer i+1's inputs
            run.prog.step(f"layer {i + 1}/{shape.num_layers}, batch {j + 1}/{len(hidden)}")
    finally:
        for handle in handles:
            handle.remove()
        layer.to(layer_device)
    _collect(run, i, obs)


def _collect(run: LayerwiseRun, i: int, obs: _LayerObservers) -> None:
    """Move layer ``i``'s observer results into the run's stat dicts, refusing NaN/inf."""
    attn, dtype = run.struct.attn_names[i], run.dtype
    hint = (
        f"the model overflows in {str(dtype).removeprefix('torch.')} on this data: calibrate in float32 or "
        "bfloat16, or check the model's weights" if dtype in (torch.float16, torch.bfloat16)
        else "check the model's weights"
    )
    for key, label in KV_GROUPS:
        for s, t in getattr(obs, key).stats().items():
            if not torch.isfinite(t).all():
                raise CalibNaNError(f"layer {i} ({attn}): {label} {s} has NaN or inf values; {hint}")
            run.stats[key][s][attn] = t
    if obs.query_moment.num_tokens:  # a model whose attention is not kvq shows no queries: no moments then
        for name in ("key", "query"):
            moment = getattr(obs, f"{name}_moment").stats()
            if not torch.isfinite(moment).all():
                raise CalibNaNError(f"layer {i} ({attn}): the {name} second moment has NaN or inf values; {hint}")
            run.moments[name][attn] = moment
        run.moments["tokens"][attn] = obs.key_moment.num_tokens
    for group, out, which in ((obs.inputs, run.inputs_stats, "input"), (obs.outputs, run.outputs_stats, "output")):
        for name, o in group.items():
            if o.num_tokens == 0:  # e.g. an MoE expert no token was routed to
                continue
            for s, t in o.stats().items():
                if not torch.isfinite(t).all():
                    raise CalibNaNError(f"layer {i} ({name}): {which} {s} has NaN or inf values; {hint}")
                out[s][name] = t
