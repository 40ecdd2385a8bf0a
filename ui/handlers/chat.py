"""Chat tab: one message to two conversations (fp16 left, the chosen mode right), both replies streamed."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from kvcache.engine.chat import ChatSession, GenerationConfig
from kvcache.errors import KVCacheFull
from kvcache.modes import get_mode

from .. import charts
from ..state import AppState, SessionState, UserError, kv_label
from .common import empty_cuda_cache


def divergence(left: ChatSession | None, right: ChatSession | None) -> str:
    """Where the two replies of the current turn first differ, by token index."""
    if left is None or right is None:
        return ""
    a, b = left.last.token_ids, right.last.token_ids
    if not a and not b:
        return ""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            tok = left.loaded.tokenizer
            return f"first differs at token {i}: {tok.decode([x])!r} vs {tok.decode([y])!r}"
    if len(a) == len(b):
        return f"identical so far ({len(a)} tokens)"
    return f"identical for the first {min(len(a), len(b))} tokens"


def pane_stats(session: ChatSession | None, diverge: str, running: bool = False) -> str:
    """The line under a pane: tokens, decode tokens/s (this pane's own compute), prefill, KV bytes, divergence.

    While a reply streams the figures are live: the prefill shows as running until its time is known, and
    tokens/s appears once decode steps have been timed.
    """
    if session is None:
        return ""
    s = session.last
    kv = session.memory()
    prefill_done = s.prefill_s > 0 or not running
    speed = s.decode_tokens_per_s
    parts = [
        f"**{s.new_tokens}** tokens",
        f"**{speed:.1f}** tokens/s" if speed else ("tokens/s after the second token" if running else "no decode steps"),
        f"prefill {s.prompt_tokens} tokens in {s.prefill_s:.2f} s" if prefill_done else f"prefilling {s.prompt_tokens} tokens…",
        f"KV **{charts.fmt_bytes(kv.bytes_used)}** held ({kv.bytes_used:,} B, {kv.tokens_stored} tokens)",
    ]
    if s.stopped:
        parts.append("stopped")
    if s.cache_full:
        parts.append(f"⚠️ {s.cache_full}")
    if diverge:
        parts.append(diverge)
    return ("generating… · " if running else "") + " · ".join(parts)


def _history(prior: list[dict[str, str]], user: str, reply: str) -> list[dict[str, str]]:
    return [*prior, {"role": "user", "content": user}, {"role": "assistant", "content": reply}]


def chat(
    app: AppState,
    sess: SessionState,
    message: str,
    mode: str,
    system_prompt: str,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    top_p: float = 1.0,
) -> Iterator[tuple[list[dict[str, str]], list[dict[str, str]], str, str]]:
    """Send ``message`` to both engines and stream both replies at once, token by token.

    Yields ``(left_history, right_history, left_stats, right_stats)``. With the app's batch worker the
    two replies (and every other session's) are computed there, batched per KV pool; tokens/s counts
    each engine's own compute time. ``sess.stop`` (the Stop button) ends both replies.
    """
    message = (message or "").strip()
    if not message:
        raise UserError("Type a message first.")
    if sess.submitted:  # the page cleared the flag at Send: a Stop since then stops this turn before it starts
        sess.submitted = False
        if sess.stop.is_set():
            yield chat_view(sess)
            return
    else:
        sess.stop.clear()
    with sess.turn_lock:  # Clear, a mode switch or new parameters wait for this turn to end
        yield from _turn(app, sess, message, mode, system_prompt, max_new_tokens, temperature, top_p)


def _turn(
    app: AppState, sess: SessionState, message: str, mode: str, system_prompt: str, max_new_tokens: int,
    temperature: float, top_p: float,
) -> Iterator[tuple[list[dict[str, str]], list[dict[str, str]], str, str]]:
    left, right = sess.engines(app, mode)
    app.sessions.add(sess)
    system = (system_prompt or "").strip() or None
    left.system_prompt = right.system_prompt = system
    config = GenerationConfig(
        max_new_tokens=max(1, int(max_new_tokens)), temperature=float(temperature), top_p=float(top_p)
    )
    engines = (left, right)
    priors = [list(e.messages) for e in engines]
    replies = ["", ""]
    streams: list[Iterator[str] | None] = [e.stream_reply(message, config, sess.stop) for e in engines]

    def frame() -> tuple[list[dict[str, str]], list[dict[str, str]], str, str]:
        div = divergence(left, right)
        return (
            _history(priors[0], message, replies[0]),
            _history(priors[1], message, replies[1]),
            pane_stats(left, div, running=streams[0] is not None),
            pane_stats(right, div, running=streams[1] is not None),
        )

    yield _history(priors[0], message, ""), _history(priors[1], message, ""), "", ""
    try:
        while any(s is not None for s in streams):
            for i, stream in enumerate(streams):
                if stream is None:
                    continue
                try:
                    replies[i] += next(stream)
                except StopIteration:
                    streams[i] = None
                except KVCacheFull as exc:  # the shared pool is full: this pane's turn is undone, the other goes on
                    streams[i] = None
                    replies[i] = f"⚠️ Not answered: {exc}."
            yield frame()
    except torch.OutOfMemoryError:
        for s in streams:
            if s is not None:
                s.close()
        sess.reset_chat()
        empty_cuda_cache()
        raise UserError(
            "Out of GPU memory during the reply: the conversation was cleared to free its KV cache. "
            "Try fewer max new tokens or a shorter conversation."
        ) from None
    finally:
        for s in streams:
            if s is not None:
                s.close()


def submit(sess: SessionState) -> None:
    """The page's Send: a new turn is queued; Stop from now on applies to it, even before it starts."""
    sess.stop.clear()
    sess.submitted = True


def stop(sess: SessionState) -> None:
    """Stop this session's running replies: the worker stops after its current token."""
    sess.stop.set()


def reset_chat(sess: SessionState) -> tuple[list, list, str, str]:
    """Forget both conversations (a running turn is stopped first) and give their blocks back."""
    sess.stop.set()
    with sess.turn_lock:
        sess.reset_chat()
    return [], [], "", ""


def chat_view(sess: SessionState) -> tuple[list, list, str, str]:
    """Both panes as the engines hold them now (e.g. after a Stop)."""
    engines = (sess.left, sess.right)
    div = divergence(*engines)
    return (
        [dict(m) for m in sess.left.messages] if sess.left else [],
        [dict(m) for m in sess.right.messages] if sess.right else [],
        pane_stats(sess.left, div),
        pane_stats(sess.right, div),
    )


def set_mode(app: AppState, sess: SessionState, mode: str) -> tuple[list, list, str, str, str]:
    """Switch the right pane's KV mode; both conversations start fresh so they stay comparable."""
    kv = get_mode(sess.resolve_mode(mode))
    reset_chat(sess)
    if sess.right is not None and sess.right.kv != kv.name:
        sess.right = None
    qparams, label = sess.current_qparams(app)
    name = kv_label(kv.name)
    if kv.needs_qparams and qparams is None:
        note = f"⚠️ {name} needs calibrated parameters: calibrate in the Calibrate tab, then press 'Use in chat'."
    elif kv.needs_qparams:
        note = f"{name} with parameters from {label}."
    else:
        note = f"{name}: {kv.description}."
    if kv.layers is not None:
        note += f" {kv.describe_codecs()}: K {kv.k_bits:.1f} / V {kv.v_bits:.1f} bits on average."
    return [], [], "", "", note


