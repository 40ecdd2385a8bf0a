"""The bit planner: bits per layer, for K and V separately, that meet a quality budget at the fewest bytes.

The planning windows are split in two disjoint halves (:func:`split_windows`): the plan is chosen on the
first and verified on the second, which it never saw, so its reported Δppl is not fitted to its own text.

1. **Sensitivity**, measured on the first half: for every layer and side, the KL (vs the fp16 cache) of
   storing only that layer's K (or V) in each candidate codec (16 down to 2 bits), every other layer in fp16.
2. **Choice**: a multiple-choice knapsack over (layer, side): each takes one candidate, its measured KL
   adds up (an assumption: errors of different layers are close to independent), and the plan is the
   cheapest whose predicted Δppl, ``exp(sum KL) - 1`` (for a small perturbation of a calibrated model the
   expected NLL change is about the KL), stays within the budget. Solved exactly by dynamic programming
   over the byte cost.
3. **Verification** on the held-out half: the budget is a Δppl, so Δppl decides, with a margin for its
   noise: the upper end of its paired bootstrap 95% interval must be within the budget. When it is not, the
   KL budget is tightened (layers move back up) and the plan chosen again. When no tightening that stays
   cheaper than 8 bits everywhere meets it, 8 bits everywhere is the plan if it meets it.
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
from ..modes import FP16, INT8_ROT, SEQUENCE_TOKENS, Codec, KVMode, allocated_keys, get_mode, peak_lloyd_max
from ..qparams import KVQParams
from ..shape import KVShape
from .evaluate import delta_ppl_interval

ProgressFn = Callable[[float, str], Any]
SINK_TOKENS = 4


def candidates(calibrated: bool, allocated: bool = False) -> dict[str, list[Codec]]:
    """The codecs each side may take, widest first: fp16, then the best rotated code of 8, 4, 3 and 2 bits: int8 per
    head; below, symmetric groups on the ``lloyd-max-peak`` levels (lower KL than the uniform grid at 4 and 3 bits
    on both evaluation texts, README "Below 4 bits"), groups of 16 at 4 bits and of 32 below.

    Keys go through the query-aware transform when calibrated (it pays at every width); with ``allocated`` (the
    parameters carry the key eigenbasis) keys below 8 bits are allocated per channel at the same bytes as those
    groups (4.75, 3.25 and 2.25 bits per channel and one scale: 1.5x, 1.8x and 2.8x lower KL, keys alone, README).
    """
    quantized = (INT8_ROT, peak_lloyd_max(4, 16), peak_lloyd_max(3, 32), peak_lloyd_max(2, 32))
    keys = [replace(c, qk_transform=calibrated) for c in quantized]
    if calibrated and allocated:
        keys = [keys[0], *(allocated_keys(b) for b in ALLOCATED_KEY_BITS)]
    return {"k": [FP16, *keys], "v": [FP16, *quantized]}


ALLOCATED_KEY_BITS = (4.75, 3.25, 2.25)  # at head_dim 64: the bytes of 4-bit groups of 16, 3- and 2-bit groups of 32


MIN_WINDOWS = 4  # two to choose on, two to verify on (a bootstrap interval needs two)


def split_windows(windows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The planning windows in two disjoint halves: ``(choose_on, verify_on)``; the held-out half gets the odd one."""
    n = windows.shape[0]
    if n < MIN_WINDOWS:
        raise ConfigError(f"the planner needs at least {MIN_WINDOWS} planning windows (half to choose the plan, half "
                          f"to verify it on text it never saw), got {n}: raise the samples")
    return windows[: n // 2], windows[n // 2:]


@dataclass
class Scorer:
    """Teacher-forced KL / NLL of KV modes against the fp16 cache on fixed windows (reference computed once)."""

    model: Any
    windows: torch.Tensor
    qparams: KVQParams | None = None
    ref: torch.Tensor = field(init=False)  # [windows, positions, vocab] fp16 reference log-probs
    ref_nll: torch.Tensor = field(init=False)  # [windows] mean NLL of each window

    def __post_init__(self) -> None:
        self.ref = self._logprobs(get_mode(BASELINE_MODE))
        self.ref_nll = self._nll(self.ref)

    @torch.inference_mode()
    def _logprobs(self, mode: KVMode) -> torch.Tensor:
        cache = PagedKVCache.for_model(self.model, mode, qparams=self.qparams if mode.reads_qparams else None)
        logits = forward_tokens(self.model, cache, self.windows.to(self.model.device), last_only=False)[:, :-1]
        return torch.log_softmax(logits, dim=-1).cpu()

    def _nll(self, logp: torch.Tensor) -> torch.Tensor:
        return -logp.gather(-1, self.windows[:, 1:, None]).squeeze(-1).double().mean(-1)

    def score(self, mode: KVMode) -> dict[str, Any]:
        """``kl`` per position, ``dppl_pct`` (its 95% ``dppl_interval``) and ``top1_pct`` of ``mode`` on the windows."""
        logp = self._logprobs(mode)
        kl = float((self.ref.exp() * (self.ref - logp)).sum(-1).double().mean())
        top1 = float((logp.argmax(-1) == self.ref.argmax(-1)).double().mean()) * 100
        nll = self._nll(logp)
        return dict(kl=kl, dppl_pct=math.expm1(float((nll - self.ref_nll).mean())) * 100, top1_pct=top1,
                    dppl_interval=delta_ppl_interval(nll, self.ref_nll))


def _plan_mode(name: str, layers: list[tuple[Codec, Codec]], sinks: int = SINK_TOKENS, **kw: Any) -> KVMode:
    return KVMode(name, "a per-layer plan of the bit planner", layers[0][0], layers[0][1], sinks, layers=tuple(layers), **kw)


def sensitivity(scorer: Scorer, options: dict[str, list[Codec]], num_layers: int,
                progress: ProgressFn | None = None) -> dict[str, list[list[float]]]:
    """Per side: ``[layer][option]`` KL of that layer's side alone in that option (everything else fp16; fp16 is 0)."""
    out = {side: [[0.0] * len(opts) for _ in range(num_layers)] for side, opts in options.items()}
    todo = [(side, i, j) for side, opts in options.items() for i in range(num_layers) for j in range(len(opts))
            if opts[j] != FP16]
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
    predicted_dppl_pct: float  # from the sensitivities, on the windows it was chosen on
    verified: dict[str, Any]  # kl, dppl_pct, dppl_interval, top1_pct on the held-out windows
    bytes_ratio: float  # vs fp16, a SEQUENCE_TOKENS-long sequence (sinks included)
    budget_dppl_pct: float
    met: bool
    note: str = ""  # how the plan was reached when not by the knapsack (the 8-bit fallback)


def meets(verified: dict[str, Any], budget_dppl_pct: float) -> bool:
    """The budget check: the upper end of the held-out Δppl's 95% interval (the point estimate if none) within it."""
    interval = verified.get("dppl_interval")
    return (interval[1] if interval else verified["dppl_pct"]) <= budget_dppl_pct


def _uniform(options: dict[str, list[Codec]], bits: int, shape: KVShape) -> list[tuple[int, int]]:
    """The picks giving every layer's K and V the ``bits``-wide candidate."""
    k, v = ([c.mean_bits for c in options[s]].index(bits) for s in ("k", "v"))
    return [(k, v)] * shape.num_layers


def make_plan(held: Scorer, sens: dict[str, list[list[float]]], options: dict[str, list[Codec]], shape: KVShape,
              budget_dppl_pct: float, name: str = "plan", rounds: int = 6) -> Plan:
    """Choose on the sensitivities, verify on the held-out windows of ``held``, tighten until :func:`meets`.

    A tightening that costs as much as 8 bits everywhere stops the search; 8 bits everywhere is then the plan
    when it meets the budget. Raises :class:`ConfigError` (saying the closest reached, and its bytes) when it does not.
    """
    if budget_dppl_pct <= 0:
        raise ConfigError(f"a Δppl budget must be positive, got {budget_dppl_pct}%")
    fp16_bytes = get_mode(BASELINE_MODE).bytes_per_token(shape)

    def picked(picks: list[tuple[int, int]]) -> KVMode:
        return _plan_mode(name, [(options["k"][a], options["v"][b]) for a, b in picks])

    def plan(picks: list[tuple[int, int]], note: str = "") -> Plan:
        mode = picked(picks)
        verified = held.score(mode)
        predicted = math.expm1(sum(sens["k"][i][a] + sens["v"][i][b] for i, (a, b) in enumerate(picks))) * 100
        return Plan(mode, predicted, verified, mode.bytes_per_token_at(shape) / fp16_bytes, budget_dppl_pct,
                    meets(verified, budget_dppl_pct), note)

    eight = _uniform(options, 8, shape)
    eight_bytes = picked(eight).bytes_per_token_at(shape)
    kl_budget, tried = math.log1p(budget_dppl_pct / 100), []
    for _ in range(rounds):
        picks = choose(sens, options, shape, kl_budget)
        if picks is None or picks in tried or picked(picks).bytes_per_token_at(shape) >= eight_bytes:
            break
        tried.append(picks)
        found = plan(picks)
        if found.met:
            return found
        worst = max(found.verified.get("dppl_interval") or [found.verified["dppl_pct"]])
        # the held-out text costs more than predicted: ask the choice for less than the KL it just reached
        kl_budget = min(kl_budget, math.log1p(found.predicted_dppl_pct / 100)) * 0.95 * \
            math.log1p(budget_dppl_pct / 100) / math.log1p(max(worst, budget_dppl_pct) / 100)
    top = plan(eight, note="no tightening cheaper than 8 bits everywhere met the budget on the held-out windows; "
                           "8 bits everywhere does")
    if top.met:
        return top
    got = top.verified
    lo, hi = got["dppl_interval"] or (got["dppl_pct"], got["dppl_pct"])
    raise ConfigError(
        f"no plan meets Δppl <= {budget_dppl_pct}% on the held-out planning windows: the closest, 8 bits everywhere, "
        f"reached {got['dppl_pct']:+.3f}% (95% interval {lo:+.3f}% to {hi:+.3f}%, KL {got['kl']:.2e}) at "
        f"{top.bytes_ratio:.3f} of fp16's bytes; raise the budget"
    )


def plan_table(mode: KVMode) -> list[dict[str, Any]]:
    """One row per layer: its K and V codecs and bits (what the app and the CLI show)."""
    return [dict(layer=i, k=k.label(), v=v.label(), k_bits=k.mean_bits, v_bits=v.mean_bits) for i, (k, v) in enumerate(mode.layers)]


def plan_facts(plan: Plan, shape: KVShape, config_hash: str, model: str, text: str) -> dict[str, Any]:
    """What a plan file records beside its layers."""
    return dict(model=model, config_hash=config_hash, num_layers=shape.num_layers, planning_text=text,
                budget_dppl_pct=plan.budget_dppl_pct, predicted_dppl_pct=round(plan.predicted_dppl_pct, 4),
                verified=_rounded(plan.verified), bytes_ratio_at_2k=round(plan.bytes_ratio, 4),
                sequence_tokens=SEQUENCE_TOKENS, **({"note": plan.note} if plan.note else {}))


def _rounded(figures: dict[str, Any]) -> dict[str, Any]:
    return {k: [round(x, 6) for x in v] if isinstance(v, list) else v if v is None else round(v, 6)
            for k, v in figures.items()}
