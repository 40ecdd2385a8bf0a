"""The bit planner: bits per layer, for K and V separately, that meet a quality budget at the fewest bytes.

1. **Sensitivity**, measured: for every layer and side, the KL (vs the fp16 cache) of storing only that
   layer's K (or V) in each candidate codec, every other layer in fp16, teacher-forced on windows of a
   calibration text.
2. **Choice**: a multiple-choice knapsack over (layer, side): each takes one candidate, its measured KL
   adds up (an assumption: errors of different layers are close to independent), and the plan is the
   cheapest whose predicted Δppl, ``exp(sum KL) - 1`` (for a small perturbation of a calibrated model the
   expected NLL change is about the KL), stays within the budget. Solved exactly by dynamic programming
   over the byte cost.
3. **Verification**: the plan runs through the real cache on the same windows; when its measured KL
   predicts a Δppl over the budget (the errors did add up worse), the KL budget is tightened and the plan
   chosen again. The KL, not the measured Δppl, decides: over a few thousand positions Δppl moves by
   tenths of a percent with the text (its interval is that wide), the KL barely.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from ..config import BASELINE_MODE
from ..errors import ConfigError
from ..hf.cache import PagedKVCache
from ..hf.forward import forward_tokens
from ..modes import FP16, INT4_G16, INT8_ROT, SEQUENCE_TOKENS, Codec, KVMode, get_mode
from ..qparams import KVQParams
from ..storage.shape import KVShape

ProgressFn = Callable[[float, str], Any]
SINK_TOKENS = 4


def candidates(calibrated: bool) -> dict[str, list[Codec]]:
    """The codecs each side may take: 8-bit and 4-bit, rotated; keys through the query-aware transform when calibrated."""
    return {
        "k": [replace(INT8_ROT, qk_transform=calibrated), replace(INT4_G16, qk_transform=calibrated)],
        "v": [INT8_ROT, INT4_G16],
    }


@dataclass
class Scorer:
    """Teacher-forced KL / NLL of KV modes against the fp16 cache on fixed windows (reference computed once)."""

    model: Any
    windows: torch.Tensor
    qparams: KVQParams | None = None
    ref: torch.Tensor = field(init=False)  # [windows, positions, vocab] fp16 reference log-probs
    ref_nll: float = field(init=False)

    def __post_init__(self) -> None:
        self.ref = self._logprobs(get_mode(BASELINE_MODE))
        self.ref_nll = self._nll(self.ref)

    @torch.inference_mode()
    def _logprobs(self, mode: KVMode) -> torch.Tensor:
        cache = PagedKVCache.for_model(self.model, mode, qparams=self.qparams if mode.reads_qparams else None)
        logits = forward_tokens(self.model, cache, self.windows.to(self.model.device), last_only=False)[:, :-1]
        return torch.log_softmax(logits, dim=-1).cpu()

    def _nll(self, logp: torch.Tensor) -> float:
        return float(-logp.gather(-1, self.windows[:, 1:, None]).double().mean())

    def score(self, mode: KVMode) -> dict[str, float]:
        """``kl`` per position, ``dppl_pct`` and ``top1_pct`` of ``mode`` on the windows."""
        logp = self._logprobs(mode)
        kl = float((self.ref.exp() * (self.ref - logp)).sum(-1).double().mean())
        top1 = float((logp.argmax(-1) == self.ref.argmax(-1)).double().mean()) * 100
        return dict(kl=kl, dppl_pct=(math.exp(self._nll(logp) - self.ref_nll) - 1) * 100, top1_pct=top1)


def _plan_mode(name: str, layers: list[tuple[Codec, Codec]], sinks: int = SINK_TOKENS, **kw: Any) -> KVMode:
    return KVMode(name, "a per-layer plan of the bit planner", layers[0][0], layers[0][1], sinks, layers=tuple(layers), **kw)


def sensitivity(scorer: Scorer, options: dict[str, list[Codec]], num_layers: int,
                progress: ProgressFn | None = None) -> dict[str, list[list[float]]]:
    """Per side: ``[layer][option]`` KL of that layer's side alone in that option (everything else fp16)."""
    out = {side: [[0.0] * len(opts) for _ in range(num_layers)] for side, opts in options.items()}
    todo = [(side, i, j) for side, opts in options.items() for i in range(num_layers) for j in range(len(opts))]
    for n, (side, i, j) in enumerate(todo):
        layers = [(FP16, FP16)] * num_layers
        k, v = layers[i]
        layers[i] = (options["k"][j], v) if side == "k" else (k, options["v"][j])
        out[side][i][j] = scorer.score(_plan_mode("sensitivity", layers))["kl"]
        if progress:
            progress((n + 1) / len(todo), f"sensitivity: layer {i} {side.upper()} {options[side][j].label()}")
    return out


def choose(sens: dict[str, list[list[float]]], options: dict[str, list[Codec]], shape: KVShape,
           kl_budget: float) -> list[tuple[int, int]] | None:
    """The cheapest choice (option index of K and of V, per layer) whose summed KL is within ``kl_budget``.

    Dynamic programming over the bytes per token and head: ``best[c]`` is the least KL reaching cost ``c``.
    None when even the most expensive options exceed the budget.
    """
    items = [(side, i) for i in range(shape.num_layers) for side in ("k", "v")]
    cost = {side: [c.bytes_per_token_per_head(shape.head_dim) for c in options[side]] for side in options}
    best: dict[int, tuple[float, tuple[int, ...]]] = {0: (0.0, ())}
    for side, i in items:
        nxt: dict[int, tuple[float, tuple[int, ...]]] = {}
        for c, (loss, picks) in best.items():
            for j, extra in enumerate(cost[side]):
                cand = (loss + sens[side][i][j], picks + (j,))
                if c + extra not in nxt or cand[0] < nxt[c + extra][0]:
                    nxt[c + extra] = cand
        best = nxt
    for c in sorted(best):
        if best[c][0] <= kl_budget:
            picks = best[c][1]
            return [(picks[2 * i], picks[2 * i + 1]) for i in range(shape.num_layers)]
    return None


@dataclass
class Plan:
    mode: KVMode
    predicted_dppl_pct: float
    verified: dict[str, float]  # kl, dppl_pct, top1_pct on the planning windows
    bytes_ratio: float  # vs fp16, a SEQUENCE_TOKENS-long sequence (sinks included)
    budget_dppl_pct: float
    met: bool


def make_plan(scorer: Scorer, sens: dict[str, list[list[float]]], options: dict[str, list[Codec]], shape: KVShape,
              budget_dppl_pct: float, name: str = "plan", rounds: int = 4) -> Plan:
    """Choose, verify on the windows, tighten while the verified KL predicts more than the budget; the first that meets it.

    Raises :class:`ConfigError` (saying the closest reached, and its bytes) when even 8 bits everywhere miss it.
    """
    if budget_dppl_pct <= 0:
        raise ConfigError(f"a Δppl budget must be positive, got {budget_dppl_pct}%")
    kl_budget = math.log1p(budget_dppl_pct / 100)
    fp16_bytes = get_mode(BASELINE_MODE).bytes_per_token(shape)
    last = None
    for _ in range(rounds):
        picks = choose(sens, options, shape, kl_budget)
        if picks is None:
            break
        layers = [(options["k"][a], options["v"][b]) for a, b in picks]
        mode = _plan_mode(name, layers)
        verified = scorer.score(mode)
        predicted = (math.exp(sum(sens["k"][i][a] + sens["v"][i][b] for i, (a, b) in enumerate(picks))) - 1) * 100
        last = Plan(mode, predicted, verified, mode.bytes_per_token_at(shape) / fp16_bytes, budget_dppl_pct,
                    met=verified["kl"] <= math.log1p(budget_dppl_pct / 100))
        if last.met:
            return last
        kl_budget *= 0.95 * math.log1p(budget_dppl_pct / 100) / max(verified["kl"], 1e-12)  # added up worse: ask less
    if last is None or not last.met:
        top = _plan_mode(name, [(options["k"][0], options["v"][0])] * shape.num_layers)
        reached = scorer.score(top)
        raise ConfigError(
            f"no plan meets Δppl <= {budget_dppl_pct}% on the planning text: the closest, 8 bits everywhere, "
            f"reached {reached['dppl_pct']:+.3f}% (KL {reached['kl']:.2e}, predicting {math.expm1(reached['kl']) * 100:+.3f}%) at {top.bytes_per_token_at(shape) / fp16_bytes:.3f} of fp16's bytes; "
            "raise the budget"
        )
    return last


def plan_table(mode: KVMode) -> list[dict[str, Any]]:
    """One row per layer: its K and V codecs and bits (what the app and the CLI show)."""
    return [dict(layer=i, k=k.label(), v=v.label(), k_bits=k.bits, v_bits=v.bits) for i, (k, v) in enumerate(mode.layers)]


def plan_facts(plan: Plan, shape: KVShape, config_hash: str, model: str, text: str) -> dict[str, Any]:
    """What a plan file records beside its layers."""
    return dict(model=model, config_hash=config_hash, num_layers=shape.num_layers, planning_text=text,
                budget_dppl_pct=plan.budget_dppl_pct, predicted_dppl_pct=round(plan.predicted_dppl_pct, 4),
                verified={k: round(v, 6) for k, v in plan.verified.items()}, bytes_ratio_at_2k=round(plan.bytes_ratio, 4),
                sequence_tokens=SEQUENCE_TOKENS)
