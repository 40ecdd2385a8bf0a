"""Observers: small running-statistics trackers, fed one tensor at a time by the calibration loop.

They know nothing about models or hooks (``calib.layerwise`` wires them in). Running values stay on
the device of the first tensor seen (no host sync per update); ``stats()`` returns CPU float32.
Max/min/absmax are exact; means are token-weighted running sums in float64 (each batch summed in
float32 first: float64 reductions are ~10x slower), so they do not depend on how the tokens were split
into batches.
"""

from __future__ import annotations

import torch

KV_STATS = ("max", "min", "absmax")
ACTIVATION_STATS = ("max", "min", "mean", "absmax", "absmean")


class KVObserver:
    """Per (KV head, channel) ``max``, ``min`` and ``absmax`` of K or V over every token.

    ``update(x)`` takes ``x`` whose last two dims are ``(num_kv_heads, head_dim)``, e.g.
    ``[batch, seq, num_kv_heads, head_dim]`` (transpose a cache's ``[batch, heads, seq, dim]`` first).
    """

    def __init__(self, num_kv_heads: int, head_dim: int):
        self.num_kv_heads, self.head_dim = num_kv_heads, head_dim
        self.max: torch.Tensor | None = None
        self.min: torch.Tensor | None = None
        self.absmax: torch.Tensor | None = None
        self.num_tokens = 0

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        if x.dim() < 2 or tuple(x.shape[-2:]) != (self.num_kv_heads, self.head_dim):
            raise ValueError(
                f"KVObserver({self.num_kv_heads}, {self.head_dim}) got a tensor of shape {tuple(x.shape)}; "
                "its last two dims must be (num_kv_heads, head_dim)"
            )
        flat = x.detach().reshape(-1, self.num_kv_heads, self.head_dim)
        if flat.shape[0] == 0:
            return
        hi, lo = flat.amax(0).float(), flat.amin(0).float()
        absmax = torch.maximum(hi.abs(), lo.abs())
        if self.max is None:
            self.max, self.min, self.absmax = hi, lo, absmax
        else:
            torch.maximum(self.max, hi, out=self.max)
            torch.minimum(self.min, lo, out=self.min)
            torch.maximum(self.absmax, absmax, out=self.absmax)
        self.num_tokens += flat.shape[0]

    def stats(self) -> dict[str, torch.Tensor]:
        """``{"max", "min", "absmax"}``, each ``(num_kv_heads, head_dim)`` float32 on the CPU."""
        if self.max is None:
            raise RuntimeError("KVObserver.stats(): no tokens were observed")
        return {"max": self.max.cpu(), "min": self.min.cpu(), "absmax": self.absmax.cpu()}


class ActivationObserver:
    """Per channel ``max``, ``min``, ``mean``, ``absmax`` and ``absmean`` of an activation.

    ``update(x)`` takes any ``[..., num_channels]`` tensor; every leading position is one token.
    """

    def __init__(self, num_channels: int):
        self.num_channels = num_channels
        self.max: torch.Tensor | None = None
        self.min: torch.Tensor | None = None
        self.sum: torch.Tensor | None = None  # float64
        self.abssum: torch.Tensor | None = None  # float64
        self.num_tokens = 0

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        if x.dim() < 1 or x.shape[-1] != self.num_channels:
            raise ValueError(
                f"ActivationObserver({self.num_channels}) got a tensor of shape {tuple(x.shape)}; "
                f"its last dim must be {self.num_channels}"
            )
        flat = x.detach().reshape(-1, self.num_channels)
        if flat.shape[0] == 0:
            return
        hi, lo = flat.amax(0).float(), flat.amin(0).float()
        # fp32 sums within a batch (fast, accurate at batch sizes), float64 running sums across batches
        s = flat.sum(0, dtype=torch.float32).double()
        a = flat.abs().sum(0, dtype=torch.float32).double()
        if self.max is None:
            self.max, self.min, self.sum, self.abssum = hi, lo, s, a
        else:
            torch.maximum(self.max, hi, out=self.max)
            torch.minimum(self.min, lo, out=self.min)
            self.sum += s
            self.abssum += a
        self.num_tokens += flat.shape[0]

    def stats(self) -> dict[str, torch.Tensor]:
        """``{"max", "min", "mean", "absmax", "absmean"}``, each ``(num_channels,)`` float32 on the CPU."""
        if self.max is None:
            raise RuntimeError("ActivationObserver.stats(): no tokens were observed")
        n = self.num_tokens
        return {
            "max": self.max.cpu(),
            "min": self.min.cpu(),
            "mean": (self.sum / n).float().cpu(),
            "absmax": torch.maximum(self.max.abs(), self.min.abs()).cpu(),
            "absmean": (self.abssum / n).float().cpu(),
        }


class SecondMomentObserver:
    """Per KV head, the uncentered second moment ``E[x x^T]`` (``[num_kv_heads, d, d]``) of K or Q.

    ``update(x)`` takes ``[batch, heads, seq, d]`` with ``heads`` a multiple of ``num_kv_heads``: the
    query heads that share a KV head are averaged into that head's moment (what the query-aware key
    transform needs). Running sums in float64.
    """

    def __init__(self, num_kv_heads: int, head_dim: int):
        self.num_kv_heads, self.head_dim = num_kv_heads, head_dim
        self.sum: torch.Tensor | None = None
        self.num_tokens = 0

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        b, h, s, d = x.shape
        if d != self.head_dim or h % self.num_kv_heads:
            raise ValueError(f"SecondMomentObserver({self.num_kv_heads}, {self.head_dim}) got {tuple(x.shape)}")
        g = x.detach().double().reshape(b, self.num_kv_heads, h // self.num_kv_heads, s, d)
        moment = torch.einsum("bhgsd,bhgse->hde", g, g) / g.shape[2]
        self.sum = moment if self.sum is None else self.sum + moment
        self.num_tokens += b * s

    def stats(self) -> torch.Tensor:
        """``E[x x^T]`` per KV head, float64 on the CPU."""
        if self.sum is None:
            raise RuntimeError("SecondMomentObserver.stats(): no tokens were observed")
        return (self.sum / self.num_tokens).cpu()
