"""Long windows scored in chunks, the needle grid, and recommend: against direct computations, on tiny models."""

import math
from types import SimpleNamespace

import pytest
import torch

from kvcache import PagedKVCache
from kvcache.cli import main
from kvcache.errors import ConfigError, EvalError, MeasureCancelled
from kvcache.hf.forward import forward_tokens
from kvcache.measure.evaluate import by_position, evaluate, position_buckets, score_windows
from kvcache.measure.needle import check_grid, first_number, needle
from kvcache.measure.recommend import candidates, check_engine, recommend
from kvcache.measure.results_cache import ResultsCache
from kvcache.modes import KV_MODES


class CharTokenizer:
    """A tokenizer for tiny models: one id per ASCII character (vocabulary 128), no chat template."""

    eos_token_id = 0
    bos_token_id = None
    chat_template = None

    def __call__(self, text, add_special_tokens=False, return_tensors=None):
        ids = [ord(c) % 128 for c in text]
        return SimpleNamespace(input_ids=torch.tensor([ids]) if return_tensors == "pt" else ids)

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids if i)


@pytest.fixture
def sharp_llama(tiny_llama):
    """The tiny model with sharp next-token distributions: quantization's KL stands well above fp32 noise."""
    with torch.no_grad():
        tiny_llama.lm_head.weight.mul_(30)
    return tiny_llama


@pytest.fixture
def tiny(sharp_llama):
    return SimpleNamespace(model=sharp_llama, tokenizer=CharTokenizer(), name="tiny")


def test_position_buckets_are_the_fixed_edges_cut_at_the_window():
    assert position_buckets(512) == [(0, 512)]
    assert position_buckets(3000) == [(0, 512), (512, 1024), (1024, 2048), (2048, 3000)]
    assert position_buckets(8192)[-1] == (4096, 8192) and len(position_buckets(8192)) == 5
    assert position_buckets(10000)[-1] == (8192, 10000)


def test_scores_and_buckets_against_a_direct_computation(sharp_llama, one_torch_thread):
    """Per-position NLL/KL/top-1 equal log-softmax of one plain forward per mode; buckets are their means."""
    tiny_llama = sharp_llama
    torch.manual_seed(1)
    windows = torch.randint(0, 128, (2, 600))
    scores = score_windows(tiny_llama, windows, ["fp16", "int4-lmdeploy"], chunk_tokens=128)
    logp = {m: torch.log_softmax(forward_tokens(tiny_llama, PagedKVCache.for_model(tiny_llama, m), windows,
                                                last_only=False)[:, :-1].double(), -1) for m in ("fp16", "int4-lmdeploy")}
    targets = windows[:, 1:, None]
    for m in logp:
        assert torch.allclose(scores[m].nll, -logp[m].gather(-1, targets)[..., 0], atol=2e-4)
    kl = (logp["fp16"].exp() * (logp["fp16"] - logp["int4-lmdeploy"])).sum(-1)
    assert kl.mean() > 1e-3
    assert torch.allclose(scores["int4-lmdeploy"].kl, kl, atol=1e-5, rtol=1e-3)
    assert (scores["fp16"].kl == 0).all() and scores["fp16"].top1.all()
    buckets = by_position(scores["int4-lmdeploy"], scores["fp16"], 600)
    assert [(b["start"], b["end"], b["positions"]) for b in buckets] == [(0, 512, 1024), (512, 600, 2 * 87)]
    late = slice(512, 599)
    assert buckets[1]["kl"] == pytest.approx(float(kl[:, late].mean()), rel=2e-3)
    top = logp["int4-lmdeploy"].argmax(-1) == logp["fp16"].argmax(-1)
    assert buckets[1]["top1_match_pct"] == pytest.approx(100 * top[:, late].double().mean().item())
    nll = {m: -logp[m].gather(-1, targets)[..., 0][:, late].mean().item() for m in logp}
    assert buckets[1]["dppl_pct"] == pytest.approx(math.expm1(nll["int4-lmdeploy"] - nll["fp16"]) * 100, abs=1e-3)


@pytest.mark.parametrize("kv", ["int8-dynamic", "int8-rot", "int4-lmdeploy"])
def test_chunked_scoring_equals_one_shot(tiny, kv, one_torch_thread):
    text = "".join(chr(32 + (i * 7919) % 95) for i in range(3000))
    one = evaluate(tiny, text, [kv], seqlen=700, samples=2, greedy_prompts=0, chunk_tokens=4096)
    chunked = evaluate(tiny, text, [kv], seqlen=700, samples=2, greedy_prompts=0, chunk_tokens=96)
    assert chunked["chunk_tokens"] == 96 and "stored (quantized) copy" in chunked["scoring"]
    a, b = one["results"][1], chunked["results"][1]
    assert a["kl_vs_fp16"] > 0
    assert b["kl_vs_fp16"] == pytest.approx(a["kl_vs_fp16"], rel=1e-3)
    assert b["top1_match_pct"] == pytest.approx(a["top1_match_pct"], abs=100 / 1398 + 1e-9)  # one position at most
    assert b["ppl"] == pytest.approx(a["ppl"], rel=1e-5)
    for x, y in zip(a["by_position"], b["by_position"]):  # a bucket of 188 positions: a KL of 5e-6 moves 2e-3 (fp32 sums)
        assert (x["start"], x["end"]) == (y["start"], y["end"]) and y["kl"] == pytest.approx(x["kl"], rel=1e-2)


def test_progress_can_cancel(tiny, one_torch_thread):
    seen = []
    with pytest.raises(MeasureCancelled, match="cancelled"):
        evaluate(tiny, "abc " * 300, ["int8-dynamic"], seqlen=256, samples=2, greedy_prompts=0, chunk_tokens=64,
                 progress=lambda f, msg: seen.append(f) or len(seen) < 3)
    assert len(seen) == 3  # stopped at the unit whose callback said no


def test_needle_grid_structure_and_prefix_sharing(tiny, one_torch_thread, monkeypatch):
    from kvcache.hf import forward as forward_mod
    from kvcache.measure import needle as needle_mod

    fed = []
    real = forward_mod.forward_hidden
    monkeypatch.setattr(forward_mod, "forward_hidden", lambda model, cache, ids: fed.append(ids.shape[1]) or real(model, cache, ids))
    rep = needle(tiny, ["int8-dynamic"], lengths=[400, 700], depths=[0, 0.5, 1], trials=2, chunk_tokens=128)
    cells = rep["cells"]
    assert {(c["kv"], c["context"], c["depth"]) for c in cells} == {
        (m, n, d) for m in ("fp16", "int8-dynamic") for n in (400, 700) for d in (0.0, 0.5, 1.0)}
    assert all(c["trials"] == 2 and 0 <= c["correct"] <= 2 and len(c["answers"]) == 2 for c in cells)
    prompts = needle_mod._Prompts(tiny.tokenizer, needle_mod.NeedleDesign())
    for n in (400, 700):  # the whole prompt and its answer fit the context
        for d in (0, 0.5, 1):
            assert prompts.needle_at(n, d) + len(prompts.suffix(n, d, 12345)) + needle_mod.ANSWER_TOKENS <= n
    deepest = max(c["needle_at"] for c in cells)
    suffixes = sum(len(prompts.suffix(c["context"], c["depth"], needle_mod.pass_key(c["context"], c["depth"], t)))
                   for c in cells if c["kv"] == "fp16" for t in range(2))
    assert rep["prefill_tokens"]["fp16"] == deepest + suffixes  # the shared stream once, then each trial's suffix
    assert rep["prefill_tokens"]["fp16"] < 0.6 * rep["prompt_tokens"]
    prefilled = sum(fed) - sum(1 for x in fed if x == 1)  # decode steps feed one token each
    assert prefilled == sum(rep["prefill_tokens"].values())


def test_needle_retrieval_on_the_embedded_model(loaded_default):
    """What only a real model shows: with an fp16 cache it reads the pass key back, first and last."""
    rep = needle(loaded_default, ["fp16"], lengths=[320], depths=[0, 1], trials=1)
    assert [c["correct"] for c in rep["cells"]] == [1, 1], rep["cells"]


def test_needle_bad_input():
    with pytest.raises(EvalError, match=r"depth 1.5 is outside \[0, 1\]"):
        check_grid([1024], [0, 1.5], 1, 8192, 100)
    with pytest.raises(EvalError, match="beyond the model's 8192-token context"):
        check_grid([9000], [0], 1, 8192, 100)
    with pytest.raises(EvalError, match="at least 100"):
        check_grid([50], [0], 1, 8192, 100)
    assert first_number(" 12345.\n") == "12345" and first_number("none") is None


def test_recommend_candidates_follow_the_mode_table(monkeypatch):
    modes, notes = candidates("lmdeploy", has_qparams=False)
    assert [m.name for m in modes] == ["fp16", "lmdeploy:8", "lmdeploy:4", "lmdeploy:42", "int8-rot"]
    assert any("k8v4" in n and "skipped" in n for n in notes)
    with_q = [m.name for m in candidates("lmdeploy", has_qparams=True)[0]]
    assert with_q == ["fp16", "lmdeploy:8", "lmdeploy:4", "lmdeploy:42", "int8-qk", "k8v4", "int4"]
    import dataclasses

    new = dataclasses.replace(KV_MODES["int8-dynamic"], name="vllm:fp8-test", engine="vllm", serve="--kv-cache-dtype fp8")
    monkeypatch.setitem(KV_MODES, new.name, new)  # a scheme added to the table shows up unchanged
    assert "vllm:fp8-test" in [m.name for m in candidates("vllm", has_qparams=False)[0]]
    with pytest.raises(ConfigError, match="unknown engine 'tgi'; known engines: kvq, vllm, sglang, lmdeploy, llamacpp, hf$"):
        check_engine("tgi")


def test_recommend_ranks_caches_and_reports(tiny, tmp_path, monkeypatch, one_torch_thread):
    from kvcache.measure import recommend as rec

    store = ResultsCache(tmp_path / "m.sqlite")
    text = "".join(chr(32 + (i * 31) % 95) for i in range(2000))
    first = recommend(tiny, "lmdeploy", 256, text=text, budget_mib=1, store=store)
    assert set(first["measured_now"]) == {"fp16", "lmdeploy:8", "lmdeploy:4", "lmdeploy:42", "int8-rot"}
    opts = {o["name"]: o for o in first["options"]}
    assert [o["rank"] for o in first["options"]] == [1, 2, 3, 4, 5]
    assert [o["name"] for o in first["options"]] == sorted(opts, key=lambda n: opts[n]["kl"])
    assert opts["fp16"]["kl"] == 0 and opts["lmdeploy:4"]["kl"] > opts["int8-rot"]["kl"] > 0
    assert opts["lmdeploy:4"]["command"] == "lmdeploy serve api_server MODEL --quant-policy 4"
    assert opts["int8-rot"]["command"] == "--kv int8-rot"
    from kvcache.shape import KVShape

    shape = KVShape.from_config(tiny.model.config)
    assert opts["int8-rot"]["bytes_per_token"] == round(KV_MODES["int8-rot"].bytes_per_token_at(shape, 256), 1)
    assert opts["fp16"]["tokens_in_budget"] == (2**20 // (64 * shape.float_bytes_per_token())) * 64
    assert opts["fp16"]["sessions_in_budget"] == opts["fp16"]["tokens_in_budget"] // 256
    calls = []
    monkeypatch.setattr(rec, "score_windows", lambda *a, **k: calls.append(a))
    second = recommend(tiny, "lmdeploy", 256, text=text, budget_mib=1, store=store)
    assert calls == [] and second["measured_now"] == []  # all from the cache
    assert [o["kl"] for o in second["options"]] == [o["kl"] for o in first["options"]]
    with pytest.raises(EvalError, match="beyond the model's 1024-token context"):
        recommend(tiny, "lmdeploy", 2048, text=text, store=store)
    with pytest.raises(EvalError, match="the text has 1000 tokens, fewer than one window of 1024 tokens"):
        recommend(tiny, "lmdeploy", 1024, text=text[:1000], store=store)


def test_cli_errors_are_one_line(capsys):
    cases = [
        (["recommend", "--engine", "tgi", "--context", "4096"], "unknown engine 'tgi'; known engines: kvq, vllm, sglang"),
        (["needle", "--depths", "0,2"], "needle depth 2 is outside [0, 1]"),
        (["needle", "--lengths", "1024,x"], "--lengths takes comma-separated numbers"),
        (["needle", "--lengths", "16384"], "beyond the model's 8192-token context"),
        (["recommend", "--engine", "vllm", "--context", "9000"], "beyond the model's 8192-token context"),
        (["evaluate", "--seqlen", "9000"], "beyond the model's 8192 positions"),
        (["evaluate", "--text", "builtin-en-long", "--seqlen", "8192", "--samples", "3", "--chunk-tokens", "0"],
         "--chunk-tokens must be at least 1"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err.startswith("error: ") and message in err, err


def test_the_report_says_where_per_tensor_scales_came_from(tiny, one_torch_thread):
    """fp8 per-tensor schemes read 1.0 without --qparams (the engines' default): the row and the table say so."""
    from kvcache.measure.evaluate import format_table

    text = "".join(chr(32 + (i * 7919) % 95) for i in range(400))
    report = evaluate(tiny, text, ["vllm:fp8", "int8-dynamic"], seqlen=128, samples=2, greedy_prompts=0)
    scales = {r["kv"]: r["tensor_scales"] for r in report["results"]}
    assert scales == {"fp16": None, "vllm:fp8": "1.0", "int8-dynamic": None}
    assert "per-tensor scales (fp8/fp4 schemes): 1.0, the engines' default" in format_table(report)
