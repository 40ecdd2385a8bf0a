"""The bit planner run on a calibration text: sensitivities, a plan for a Δppl budget, its spec file.

The algorithm lives in :mod:`kvcache.measure.planner`; this module feeds it windows of a calibration
dataset (by default the built-in corpus, never an evaluation text), half to choose the plan on and half,
held out, to verify it on, and writes the plan as the
``.json`` spec every ``--kv`` accepts (``python -m kvcache evaluate --kv plan.json``, chat, the app).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kvcache.measure.planner import (ALLOCATED_KEY_BITS, ProgressFn, Scorer, candidates, make_plan, plan_facts,
                                     plan_table, sensitivity, split_windows)
from kvcache.modes import allocated_keys, plan_to_json
from kvcache.qparams import KVQParams
from kvcache.shape import KVShape, config_hash

from .data import load_calib_windows
from .errors import CalibError

DEFAULT_DATASET, DEFAULT_SAMPLES, DEFAULT_SEQLEN = "builtin", 8, 256  # 4 windows to choose on, 4 held out


def plan_bits(
    loaded: Any, budget_dppl_pct: float, *, qparams: KVQParams | None = None, dataset: str = DEFAULT_DATASET,
    samples: int = DEFAULT_SAMPLES, seqlen: int = DEFAULT_SEQLEN, data_dir: str | None = None,
    progress: ProgressFn | None = None, name: str = "plan",
) -> tuple[Any, dict[str, Any]]:
    """Plan bits per layer for ``loaded`` within ``budget_dppl_pct`` on ``samples`` x ``seqlen`` tokens of ``dataset``.

    With ``qparams`` carrying key transforms the keys' candidates use them (the calibrated modes' codecs; with the
    key eigenbasis too, allocated keys below 8 bits); without, the calibration-free ones. Returns ``(plan, spec)``,
    the spec being the JSON a plan file holds.
    """
    model = loaded.model
    shape = KVShape.from_config(model.config)
    calibrated = qparams is not None and qparams.k_transform is not None
    if qparams is not None:
        qparams.check_matches(shape, needs_transform=calibrated)
    windows = load_calib_windows(dataset, loaded.tokenizer, samples, seqlen, data_dir=data_dir, model=model)
    choose_on, verify_on = split_windows(windows)
    report = (lambda f, m: progress(0.05 + 0.85 * f, m)) if progress else None
    if progress:
        progress(0.0, "fp16 reference on the planning windows")
    use = qparams if calibrated else None
    allocated = calibrated and qparams.k_basis is not None and all(
        allocated_keys(b).packs_in_bytes(shape.head_dim) for b in ALLOCATED_KEY_BITS)
    options = candidates(calibrated, allocated=allocated)
    sens = sensitivity(Scorer(model, choose_on, use), options, shape.num_layers, report)
    if progress:
        progress(0.9, "choosing the plan, verifying it on the held-out windows")
    plan = make_plan(Scorer(model, verify_on, use), sens, options, shape, budget_dppl_pct, name=name)
    facts = plan_facts(plan, shape, config_hash(model.config), getattr(loaded, "name", "?"),
                       f"{dataset}, {choose_on.shape[0]} x {windows.shape[1]} tokens to choose on, "
                       f"{verify_on.shape[0]} x {windows.shape[1]} held out to verify on")
    spec = plan_to_json(plan.mode, **facts, sensitivity_kl={s: v for s, v in sens.items()},
                        candidates={s: [c.label() for c in cs] for s, cs in options.items()},
                        calibrated=calibrated)
    if progress:
        progress(1.0, "plan ready")
    return plan, spec


def plan_path(path: str | Path) -> Path:
    """Where a plan's spec file goes: a ``.json`` file, not a folder (checked before the planning run)."""
    path = Path(path).expanduser()
    if path.is_dir() or path.suffix != ".json":
        raise CalibError(f"the plan goes into a .json file, not {path}: give e.g. --out plan.json")
    return path


def write_plan(spec: dict[str, Any], path: str | Path) -> Path:
    """Write a plan's spec file."""
    path = plan_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(spec, indent=1) + "\n", encoding="utf-8")
    return path


def summary(plan: Any) -> str:
    """The plan in a few lines: bits per layer (f: fp16; space-separated when some are fractional, allocated keys),
    bytes, predicted and held-out Δppl."""
    rows = plan_table(plan.mode)

    def per_layer(side: str) -> str:
        bits = ["f" if r[f"{side}_bits"] >= 16 else f"{r[f'{side}_bits']:g}" for r in rows]
        return (" " if any(len(b) > 1 for b in bits) else "").join(bits)

    k, v = per_layer("k"), per_layer("v")
    ver = plan.verified
    lo, hi = ver.get("dppl_interval") or (ver["dppl_pct"], ver["dppl_pct"])
    return (f"K bits per layer: {k}\nV bits per layer: {v}\n"
            f"bytes: {plan.bytes_ratio:.3f} of fp16 (a 2,048-token sequence, sinks included); "
            f"predicted Δppl {plan.predicted_dppl_pct:+.3f}%; verified through the cache on held-out windows: "
            f"Δppl {ver['dppl_pct']:+.3f}% (95% interval {lo:+.3f}% to {hi:+.3f}%, its upper end decides), "
            f"KL {ver['kl']:.2e}, top-1 {ver['top1_pct']:.2f}%; budget {plan.budget_dppl_pct}%"
            + (f"\n{plan.note}" if plan.note else ""))
