"""What LMDeploy >= 0.4 setting matches a KV mode of ours.

LMDeploy 0.4 (PR #1377) quantizes the KV cache online: ``quant_policy`` 8 = int8, 4 = int4, each per token and
per KV head, asymmetric (a scale and a zero point), no files (LMDeploy's docs, quantization/kv_quant.md).
Before 0.4, ``quant_policy=4`` meant TurboMind's int8 KV cache with offline ``past_kv_scale`` files (see
``python -m calib kv_qparams --help``). A mode matches when it stores what LMDeploy stores; each property that
LMDeploy cannot express is one entry of :data:`MISMATCHES`, so a new mode property is one new line there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from kvcache.modes import KVMode

# quant_policy -> bits, as LMDeploy >= 0.4 reads it (0: the model's fp16/bf16 KV cache).
QUANT_POLICIES = {8: 8, 4: 4}
POLICY_CHANGED = (
    "quant_policy=4 meant int8 with TurboMind past_kv_scale files up to LMDeploy 0.3.x; from 0.4 it means "
    "online int4 (8 is online int8)"
)


def _pairs(mode: KVMode) -> list:
    return list(mode.layers or ((mode.k, mode.v),))


def _codecs(mode: KVMode) -> list:
    return [c for pair in _pairs(mode) for c in pair]


def _bits(mode: KVMode) -> tuple[int, int]:
    return max(k.bits for k, _ in _pairs(mode)), max(v.bits for _, v in _pairs(mode))


def _any(mode: KVMode, test: Callable[[Any], bool]) -> bool:
    return any(test(c) for c in _codecs(mode) if c.quantized)


# (does the mode have it?, why LMDeploy cannot do it). Checked in order; the first that applies is the reason.
MISMATCHES: tuple[tuple[Callable[[KVMode], Any], Callable[[KVMode], str]], ...] = (
    (lambda m: _any(m, lambda c: c.scaling == "static"),
     lambda m: "its parameters come from a calibration, and LMDeploy >= 0.4 reads none: it computes them per token online"),
    (lambda m: _any(m, lambda c: c.qk_transform),
     lambda m: "its keys go through a calibrated query-aware transform; LMDeploy quantizes them as they are"),
    (lambda m: _any(m, lambda c: c.rotate),
     lambda m: "it rotates K/V (Hadamard) before quantizing; LMDeploy quantizes them unrotated"),
    (lambda m: m.layers is not None and len(set(m.layers)) > 1,
     lambda m: "its bits differ from layer to layer (a plan); quant_policy sets one width for every layer"),
    (lambda m: len({c.bits for c in _codecs(m)}) > 1,
     lambda m: f"K and V have different widths ({_bits(m)[0]}/{_bits(m)[1]} bits); quant_policy sets one for both"),
    (lambda m: _any(m, lambda c: c.group_size),
     lambda m: "it takes parameters per group of channels; LMDeploy per token and KV head"),
    (lambda m: m.sink_tokens,
     lambda m: f"it keeps the first {m.sink_tokens} tokens in fp16; LMDeploy quantizes every token"),
    (lambda m: _any(m, lambda c: c.symmetric),
     lambda m: "it is symmetric (no zero point); LMDeploy is asymmetric"),
    (lambda m: mode_bits(m) not in QUANT_POLICIES.values(),
     lambda m: f"it is {mode_bits(m)}-bit; LMDeploy offers 8 (quant_policy 8) and 4 (quant_policy 4)"),
)


@dataclass(frozen=True)
class LMDeployEquivalent:
    """LMDeploy's setting for a KV mode: ``exact``, or the ``closest`` one and the ``reason`` it differs."""

    mode: str
    quant_policy: int  # the equivalent policy, or the closest one when not exact
    exact: bool
    reason: str = ""
    model: str = "MODEL"

    @property
    def serve(self) -> str:
        return f"lmdeploy serve api_server {self.model}{self._flag}"

    @property
    def chat(self) -> str:
        return f"lmdeploy chat {self.model}{self._flag}"

    @property
    def python(self) -> str:
        return f"pipeline({self.model!r}, backend_config=TurbomindEngineConfig(quant_policy={self.quant_policy}))"

    @property
    def _flag(self) -> str:
        return f" --quant-policy {self.quant_policy}" if self.quant_policy else ""

    def text(self) -> str:
        """What the CLI prints (and the UI can show): the commands, or the reason and the closest setting."""
        what = {0: "fp16/bf16 KV cache (quant_policy 0, the default)", 8: "online int8 (quant_policy 8)",
                4: "online int4 (quant_policy 4)"}[self.quant_policy]
        head = (f"{self.mode}: LMDeploy >= 0.4 equivalent: {what}" if self.exact else
                f"{self.mode}: no LMDeploy >= 0.4 equivalent: {self.reason}; closest: {what}")
        lines = [head, f"  serve:  {self.serve}", f"  chat:   {self.chat}",
                 f"  python: from lmdeploy import pipeline, TurbomindEngineConfig; {self.python}"]
        if self.quant_policy == 4:
            lines.append(f"  note:   {POLICY_CHANGED}")
        return "\n".join(lines)


def mode_bits(mode: KVMode) -> int:
    """The widest of K's and V's bits (16 for an unquantized mode)."""
    return max(_bits(mode))


def closest_policy(mode: KVMode) -> int:
    """0 for an unquantized mode, else 8 unless the mode is 4 bits or narrower (then 4)."""
    if not mode.quantized:
        return 0
    return 4 if mode_bits(mode) <= 4 else 8


def lmdeploy_equivalent(mode: KVMode | str, model: str = "MODEL") -> LMDeployEquivalent:
    """The LMDeploy >= 0.4 setting for ``mode`` (a :class:`KVMode` or its name) and ``model``."""
    if isinstance(mode, str):
        from kvcache.modes import get_mode

        mode = get_mode(mode)
    policy = closest_policy(mode)
    if not mode.quantized:
        return LMDeployEquivalent(mode.name, 0, True, model=model)
    for applies, reason in MISMATCHES:
        if applies(mode):
            return LMDeployEquivalent(mode.name, policy, False, reason(mode), model)
    return LMDeployEquivalent(mode.name, policy, True, model=model)
