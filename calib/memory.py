"""How much memory a layer-by-layer calibration needs, so running out says what would fit.

The GPU holds one decoder layer's weights and one batch's activations; the activations of every sample
wait in CPU memory between layers. A layer's forward needs about ``linear + quadratic * seqlen`` bytes
per token (the quadratic part: attention scores when SDPA takes its math path); the first batch of each
layer measures the real figure on CUDA, and the model is scaled to it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from kvcache.shape import KVShape
from kvcache.storage.sizing import free_memory_bytes

from .errors import CalibOOMError


def gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB"


def is_oom(exc: BaseException) -> bool:
    """Out of memory on the GPU (torch's error) or the CPU (the allocator's RuntimeError)."""
    oom = getattr(torch, "OutOfMemoryError", None) or torch.cuda.OutOfMemoryError
    if isinstance(exc, oom):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("can't allocate memory" in text or "not enough memory" in text)


def check_cpu_memory(samples: int, seqlen: int, hidden: int, act_bytes: int) -> None:
    """The activations of all samples wait in CPU memory between layers: refuse early when they cannot."""
    need = samples * seqlen * hidden * act_bytes
    avail = free_memory_bytes("cpu")
    if need <= 0.8 * avail:
        return
    fit = max(0, int(0.8 * avail // (seqlen * hidden * act_bytes)))
    raise CalibOOMError(
        f"the activations of {samples} samples x {seqlen} tokens need {gib(need)} of CPU memory, {gib(avail)} is "
        f"available: at most about {fit} samples x {seqlen} fit; lower --calib-samples (or --calib-seqlen)"
    )


@dataclass
class MemoryModel:
    """Bytes one decoder layer's forward needs per token: ``linear + quadratic * seqlen`` (attention scores)."""

    linear: float
    quadratic: float
    layer_bytes: int  # the largest layer's weights
    measured: float | None = None  # bytes per token measured at ``measured_seqlen``
    measured_seqlen: int = 0

    @classmethod
    def of(cls, layers: nn.ModuleList, shape: KVShape, hidden_size: int, act_bytes: int) -> MemoryModel:
        """The analytic model of a Llama-style decoder layer (attention + gated MLP)."""
        h = hidden_size
        inter = max((m.out_features for m in layers[0].modules() if isinstance(m, nn.Linear)), default=h)
        q, kv = shape.num_heads * shape.head_dim, shape.num_kv_heads * shape.head_dim
        linear = act_bytes * (4 * h + 2 * q + 4 * kv + 3 * inter) + 8 * inter
        quadratic = 2 * shape.num_heads * act_bytes  # scores + softmax when SDPA takes its math path
        layer_bytes = max(sum(p.numel() * p.element_size() for p in layer.parameters()) for layer in layers)
        return cls(linear, quadratic, layer_bytes)

    def per_token(self, seqlen: int) -> float:
        analytic = self.linear + self.quadratic * seqlen
        if self.measured is None:
            return analytic
        return self.measured * analytic / (self.linear + self.quadratic * self.measured_seqlen)

    def record(self, bytes_per_token: float, seqlen: int) -> None:
        """A measured forward: the model keeps the largest figure."""
        if self.measured is None or bytes_per_token > self.measured:
            self.measured, self.measured_seqlen = bytes_per_token, seqlen

    def largest_fit(self, budget: float, seqlen: int) -> tuple[int, int]:
        """(batch size at ``seqlen``, seqlen at batch size 1) that fit in ``budget`` bytes."""
        per_sample = seqlen * self.per_token(seqlen)
        fit_batch = int(budget // per_sample) if budget > 0 else 0
        scale = self.per_token(seqlen) / (self.linear + self.quadratic * seqlen)
        lin, quad = self.linear * scale, self.quadratic * scale
        if budget <= 0:
            fit_seqlen = 0
        elif quad > 0:
            fit_seqlen = int((-lin + math.sqrt(lin * lin + 4 * quad * budget)) / (2 * quad))
        else:
            fit_seqlen = int(budget // lin)
        return fit_batch, fit_seqlen // 128 * 128 if fit_seqlen >= 256 else fit_seqlen


def oom_message(where: str, device: torch.device, batch_size: int, seqlen: int, mem: MemoryModel) -> str:
    """One line: where it ran out, how much a sample needs, and the largest batch size / seqlen that fits."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
    free, what = free_memory_bytes(device), ("GPU" if device.type == "cuda" else "CPU")
    fit_batch, fit_seqlen = mem.largest_fit(0.9 * free - mem.layer_bytes, seqlen)
    head = (
        f"out of {what} memory in {where} with batch_size {batch_size} x seqlen {seqlen} "
        f"(about {gib(seqlen * mem.per_token(seqlen))} per sample, {gib(free)} free on {device})"
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
