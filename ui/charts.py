"""Pictures of numbers: memory gauges (HTML bars in nvitop's green/yellow/red), rolling memory
frames, K/V heatmaps and ranges, the bit planner's table, evaluation bars and the quality/bytes scatter.
Pure functions of data the library returned."""

from __future__ import annotations

import html
import time
from typing import Any

import matplotlib

matplotlib.use("Agg")  # never a GUI backend inside a server
import pandas as pd  # noqa: E402
import torch  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from .modes import point_group, point_groups
from .state import kv_label

MiB = 2**20
WARN_PCT, CRIT_PCT = 60.0, 85.0  # bar colours: green below 60 %, yellow below 85 %, red above


def fmt_bytes(n: int | float | None) -> str:
    if n is None:
        return "n/a"
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"


def level(pct: float) -> str:
    return "crit" if pct >= CRIT_PCT else "warn" if pct >= WARN_PCT else "ok"


def bar(label: str, value: float | None, total: float | None, detail: str = "", kind: str | None = None) -> str:
    """One gauge row: label, bar (coloured by level, or ``kind``), figures."""
    if value is None or not total:
        pct, figures = 0.0, "n/a"
    else:
        pct = max(0.0, min(100.0, 100.0 * value / total))
        figures = fmt_bytes(value) if kind else f"{fmt_bytes(value)} / {fmt_bytes(total)} ({pct:.1f}%)"
    return (
        f'<div class="gauge"><span class="gauge-label">{html.escape(label)}</span>'
        f'<span class="gauge-track"><span class="gauge-fill {kind or level(pct)}" style="width:{pct:.1f}%"></span></span>'
        f'<span class="gauge-figures">{html.escape(figures)}</span>'
        f'<span class="gauge-detail">{html.escape(detail)}</span></div>'
    )


def gauges_html(fig: dict[str, Any]) -> str:
    """The gauge panel for one reading (the dict the memory handler returns)."""
    stamp = time.strftime("%H:%M:%S", time.localtime(fig.get("timestamp", time.time())))
    head = f'reading at <span class="gauge-time">{stamp}</span> · every second'
    if fig.get("kv_all_sessions_bytes") is not None:
        head += f" · KV held by all sessions: {fmt_bytes(fig['kv_all_sessions_bytes'])}"
    rows: list[str] = [f'<div class="gauge-head">{head}</div>']
    for g in fig["gpus"]:
        mine = f"this process {fmt_bytes(g['process_used'])}" if g["process_used"] is not None else "this process: not visible to NVML"
        reserved = f", driver reserve {fmt_bytes(g['reserved'])}" if g.get("reserved") else ""
        rows.append(bar(f"GPU{g['index']} memory", g["used"], g["total"], f"{g['name']}: {mine}{reserved}"))
    t = fig.get("torch_cuda")
    if t:
        total = fig["gpus"][0]["total"] if fig["gpus"] else t["reserved"] or None
        rows.append(bar("torch allocated", t["allocated"], total, f"cuda:{t['device']}"))
        rows.append(bar("torch reserved", t["reserved"], total, "caching allocator"))
        rows.append(bar("torch peak", t["max_allocated"], total, "max allocated"))
    if fig.get("process_rss") is not None:
        rows.append(bar("process RSS", fig["process_rss"], fig.get("system_total"), "host memory of this app"))
    if fig.get("system_total"):
        used = fig["system_total"] - (fig.get("system_available") or 0)
        rows.append(bar("host memory", used, fig["system_total"], f"{fmt_bytes(fig.get('system_available'))} available"))
    used = [kv["bytes_used"] for kv in fig["kv"].values() if kv]
    scale = max(used) if used else 0
    for name, kv in fig["kv"].items():
        if kv is None:
            rows.append(bar(f"KV {name}", None, None, "no engine yet: send a message"))
            continue
        detail = (
            f"this conversation: {kv['bytes_used']:,} B, {kv['tokens_stored']} tokens in {kv['blocks_used']} blocks · "
            f"{kv['bytes_per_token']:,} B/token · its pool holds {kv['capacity_tokens']:,} tokens"
        )
        if kv.get("blocks_shared"):
            detail += f" · {kv['blocks_shared']} of them shared with other sessions (a common prefix: its pool counts them once)"
        if kv.get("fits_tokens") is not None:
            detail += f" · room for {kv['fits_tokens']:,} more tokens in free memory"
        # KV bars compare the two conversations (longest = 100 %); the pools have their own bars below.
        rows.append(bar(f"KV {name}", kv["bytes_used"], scale or None, detail, kind="kv"))
    for pool in fig.get("kv_pools", []):  # shared by every session; a full preallocated one is a warning sign
        detail = (f"{pool['blocks_used'] * pool['block_size']:,} of {pool['blocks'] * pool['block_size']:,} tokens "
                  f"in use, all sessions · {fmt_bytes(pool['bytes'])} " + ("held, grows on demand" if pool["growable"] else "preallocated")
                  + (f" · {pool['blocks_shared']} blocks shared, counted once" if pool.get("blocks_shared") else ""))
        rows.append(bar(f"KV pool {pool['kv']}", pool["bytes_used"], pool["bytes"], detail,
                        kind="kv" if pool["growable"] else None))
    batching = fig.get("batching")
    if batching:
        running = sum(p["running"] for p in batching["pools"].values())
        waiting = sum(p["waiting"] for p in batching["pools"].values())
        rows.append(
            f'<div class="gauge batching"><span class="gauge-label">batch worker</span><span class="gauge-detail">'
            f"{running} replies decoding, {waiting} waiting, all sessions · largest decode batch "
            f"{batching['max_batch']} · {batching['steps']:,} steps</span></div>"
        )
    return '<div class="gauges">' + "".join(rows) + "</div>"


def same_memory_columns(tokens: int = 2048) -> list[str]:
    return ["kv", "blocks", "tokens", "x fp16 tokens", f"sessions of {tokens} tokens", "engine"]


def same_conversation_columns(tokens: int = 2048) -> list[str]:
    return ["kv", "bytes/token", f"bytes for {tokens} tokens", "x fp16 bytes", "engine"]


OUTLIER_COLUMNS = ["layer", "K/V", "head", "channel", "absmax", "x median"]


def capacity_tables(report: dict[str, Any]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """A capacity plan as the two tables people confuse: same memory -> tokens; same conversation -> bytes."""
    n = report["session_tokens"]
    same_memory = pd.DataFrame(
        [(r["kv"], r["blocks"], r["tokens"], round(r["tokens_vs_fp16"], 3), r["sessions"], point_group(r["kv"]))
         for r in report["results"]],
        columns=same_memory_columns(n),
    )
    same_conversation = pd.DataFrame(
        [(r["kv"], r["bytes_per_token"], fmt_bytes(r["session_bytes"]), round(r["session_bytes_vs_fp16"], 3),
          point_group(r["kv"])) for r in report["results"]],
        columns=same_conversation_columns(n),
    )
    return same_memory, same_conversation


def memory_frames(log: list[dict[str, Any]]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Rolling plots: device/process memory and KV bytes (MiB) against seconds before now."""
    cols = ["seconds", "MiB", "series"]
    if not log:
        return pd.DataFrame(columns=cols), pd.DataFrame(columns=cols)
    now = log[-1]["t"]
    mem, kv = [], []
    for point in log:
        x = round(point["t"] - now, 1)
        for series, value in point["memory"].items():
            mem.append((x, value / MiB, series))
        for series, value in point["kv"].items():
            kv.append((x, value / MiB, series))
    return pd.DataFrame(mem, columns=cols), pd.DataFrame(kv, columns=cols)


# --- calibration ------------------------------------------------------------------------------------


def heatmap(stat: torch.Tensor, title: str) -> Figure:
    """A (num_kv_heads, head_dim) statistic as a heads x channels heatmap."""
    data = stat.float().cpu().numpy()
    heads, channels = data.shape
    fig = Figure(figsize=(8, 0.45 * heads + 1.3), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    im = ax.imshow(data, aspect="auto", cmap="magma", interpolation="nearest")
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("channel")
    ax.set_ylabel("KV head")
    ax.set_yticks(range(heads))
    ax.tick_params(labelsize=8)
    fig.colorbar(im, ax=ax, pad=0.01, fraction=0.04)
    return fig


def layer_ranges(key_stats: dict[str, list[torch.Tensor]], value_stats: dict[str, list[torch.Tensor]]) -> pd.DataFrame:
    """Per-layer min and max of K and V (over heads and channels), long form for a line plot."""
    rows = []
    for name, stats in (("K", key_stats), ("V", value_stats)):
        for i, (lo, hi) in enumerate(zip(stats["min"], stats["max"])):
            rows.append((i, float(hi.max()), f"{name} max"))
            rows.append((i, float(lo.min()), f"{name} min"))
    return pd.DataFrame(rows, columns=["layer", "value", "series"])


def outlier_channels(
    key_stats: dict[str, list[torch.Tensor]], value_stats: dict[str, list[torch.Tensor]], top: int = 12
) -> pd.DataFrame:
    """The channels whose absmax stands furthest above their layer's median channel."""
    rows = []
    for name, stats in (("K", key_stats), ("V", value_stats)):
        for i, absmax in enumerate(stats["absmax"]):
            a = absmax.float()
            median = float(a.median()) or 1e-12
            flat = a.flatten()
            k = min(top, flat.numel())
            values, idx = flat.topk(k)
            for v, j in zip(values.tolist(), idx.tolist()):
                head, channel = divmod(j, a.shape[1])
                rows.append((i, name, head, channel, round(v, 3), round(v / median, 1)))
    df = pd.DataFrame(rows, columns=OUTLIER_COLUMNS)
    return df.sort_values("x median", ascending=False).head(top).reset_index(drop=True)


# --- bit planner --------------------------------------------------------------------------------------

PLAN_COLUMNS = ["layer", "K bits", "V bits", "K", "V"]


def plan_table(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """A plan's rows (:func:`kvcache.measure.planner.plan_table`) as the page's table: bits and codec per layer."""
    return pd.DataFrame([(r["layer"], r["k_bits"], r["v_bits"], r["k"], r["v"]) for r in rows], columns=PLAN_COLUMNS)


# --- evaluation ---------------------------------------------------------------------------------------

EVAL_COLUMNS = ["kv", "perplexity", "Δppl %", "Δppl 95% CI", "KL vs fp16", "top-1 %", "first divergence",
                "KV bytes/token", "vs fp16", "calibrated on"]


def eval_table(report: dict[str, Any]) -> pd.DataFrame:
    from kvcache.measure.evaluate import calibration_label
    from kvcache.modes import get_mode

    cal = calibration_label(report.get("calibration"))
    rows = []
    for r in report["results"]:
        ci = r["delta_ppl_ci95"]
        med = r["first_divergence_median"]
        rows.append((
            kv_label(r["kv"]), round(r["ppl"], 4), round(r["delta_ppl_pct"], 3),
            f"[{ci[0]:+.3f}, {ci[1]:+.3f}]" if ci else "n/a", float(f"{r['kl_vs_fp16']:.3g}"),
            round(r["top1_match_pct"], 2),
            "n/a" if med is None else (f"≥{report['greedy_tokens']}" if med >= report["greedy_tokens"] else f"{med:g}"),
            r["kv_bytes_per_token"], r["kv_ratio_to_fp16"],
            cal if get_mode(r["kv"]).needs_qparams else "",
        ))
    return pd.DataFrame(rows, columns=EVAL_COLUMNS)


def eval_bars(report: dict[str, Any]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Two bar charts: quality (Δppl %) and cost (KV bytes per token), one bar per mode."""
    quality = pd.DataFrame([(kv_label(r["kv"]), r["delta_ppl_pct"]) for r in report["results"]], columns=["kv", "Δppl %"])
    cost = pd.DataFrame([(kv_label(r["kv"]), r["kv_bytes_per_token"]) for r in report["results"]],
                        columns=["kv", "KV bytes/token"])
    return quality, cost


# one colour per engine in the quality-vs-bytes picture, the same whichever modes were run (tab10, baseline grey first)
ENGINE_COLOURS = dict(zip(point_groups(), ["#7f7f7f", "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b",
                                           "#e377c2", "#bcbd22", "#17becf"]))
SCATTER_COLUMNS = ["kv", "engine", "bytes vs fp16", "Δppl %", "top-1 %", "KV bytes/token"]


def eval_scatter(report: dict[str, Any]) -> pd.DataFrame:
    """Quality against cost, one point per evaluated mode: Δppl (%) over KV bytes per token as a ratio to fp16's
    (a 2,048-token sequence, sinks included: what ``python -m kvcache modes`` gives), grouped by engine."""
    return pd.DataFrame(
        [(kv_label(r["kv"]), point_group(r["kv"]), r["kv_ratio_to_fp16"], round(r["delta_ppl_pct"], 4),
          round(r["top1_match_pct"], 2), r["kv_bytes_per_token"]) for r in report["results"]],
        columns=SCATTER_COLUMNS,
    )


# --- long context: by position, retrieval, which to pick --------------------------------------------

POSITION_COLUMNS = ["kv", "positions", "KL vs fp16", "Δppl %", "top-1 %"]


def _bucket(b: dict[str, Any]) -> str:
    return f"{b['start']}-{b['end']}"


def position_table(report: dict[str, Any]) -> pd.DataFrame:
    """KL, Δppl and top-1 per bucket of positions in the window, one row per mode and bucket."""
    return pd.DataFrame(
        [(kv_label(r["kv"]), _bucket(b), float(f"{b['kl']:.3g}"), round(b["dppl_pct"], 3), round(b["top1_match_pct"], 2))
         for r in report["results"][1:] for b in r.get("by_position", [])],
        columns=POSITION_COLUMNS,
    )


def position_frame(report: dict[str, Any]) -> pd.DataFrame:
    """KL per position bucket, long form for a line plot (x: the bucket's end, one line per mode)."""
    return pd.DataFrame(
        [(kv_label(r["kv"]), b["end"], b["kl"]) for r in report["results"][1:] for b in r.get("by_position", [])],
        columns=["kv", "position", "KL vs fp16"],
    )


def needle_heatmaps(report: dict[str, Any]) -> Figure:
    """One heatmap per mode (fp16 first): contexts down, depths across, the share of pass keys found."""
    modes = list(dict.fromkeys(c["kv"] for c in report["cells"]))
    lengths, depths = report["lengths"], report["depths"]
    fig = Figure(figsize=(3.2 * len(modes) + 0.8, 0.5 * len(lengths) + 1.6), dpi=100, layout="constrained")
    axes = fig.subplots(1, len(modes), squeeze=False)[0]
    cells = {(c["kv"], c["context"], c["depth"]): c for c in report["cells"]}
    im = None
    for ax, kv in zip(axes, modes):
        found = [[cells[(kv, n, d)]["correct"] / cells[(kv, n, d)]["trials"] for d in depths] for n in lengths]
        im = ax.imshow(found, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        for i, n in enumerate(lengths):
            for j, d in enumerate(depths):
                c = cells[(kv, n, d)]
                ax.text(j, i, f"{c['correct']}/{c['trials']}", ha="center", va="center", fontsize=8)
        ax.set_title(kv_label(kv), fontsize=10)
        ax.set_xticks(range(len(depths)), [f"{d:g}" for d in depths], fontsize=8)
        ax.set_yticks(range(len(lengths)), [str(n) for n in lengths], fontsize=8)
        ax.set_xlabel("needle depth")
    axes[0].set_ylabel("context (tokens)")
    if im is not None:
        fig.colorbar(im, ax=list(axes), fraction=0.03, pad=0.01, label="pass keys found")
    return fig


RECOMMEND_COLUMNS = ["#", "option", "engine", "KL vs fp16", "top-1 %", "Δppl %", "retrieval", "bytes/token",
                     "x fp16", "tokens in budget", "sessions in budget", "turn it on"]


def recommend_table(report: dict[str, Any]) -> pd.DataFrame:
    """``recommend``'s ranking as the page's table."""
    rows = []
    for o in report["options"]:
        ret = o["retrieval"]
        rows.append((o["rank"], o["name"], o["engine"], float(f"{o['kl']:.3g}"), round(o["top1_match_pct"], 2),
                     round(o["delta_ppl_pct"], 3), f"{ret['correct']}/{ret['trials']}" if ret else "-",
                     o["bytes_per_token"], o["ratio_to_fp16"], o["tokens_in_budget"], o["sessions_in_budget"],
                     o["command"]))
    return pd.DataFrame(rows, columns=RECOMMEND_COLUMNS)
