"""Evaluation through the cache on the real default model, and its bad-input errors."""

import json

import pytest

from kvcache.cli import DEFAULT_EVAL_TEXT, main
from kvcache.evaluate import EvalError, evaluate, make_windows, read_text


@pytest.fixture(scope="module")
def report(loaded_default):
    text = read_text(DEFAULT_EVAL_TEXT)
    return evaluate(loaded_default, text, ["fp16", "int8-dynamic"], seqlen=256, samples=4, batch_size=2,
                    greedy_prompts=2, greedy_tokens=8)


def test_report_fields_and_baseline(report):
    assert report["tokens_scored"] == 4 * 255
    fp16, dyn = report["results"]
    assert fp16["kv"] == "fp16" and fp16["delta_ppl_pct"] == 0 and fp16["kl_vs_fp16"] == 0
    assert 1 < fp16["ppl"] < 100  # a real model on English prose
    assert dyn["kv_bytes_per_token"] / fp16["kv_bytes_per_token"] <= 0.535


def test_int8_dynamic_perplexity_within_bound(report):
    dyn = report["results"][1]
    # The quantized cache really changes what attention reads (KL > 0), but barely.
    assert 0 < dyn["kl_vs_fp16"] < 5e-3
    assert abs(dyn["delta_ppl_pct"]) < 0.5
    assert dyn["greedy_match_pct"] >= 75


def test_scoring_goes_through_the_cache(loaded_default, monkeypatch):
    """A cache that stores zeros must change the logits: attention reads the stored copy, not fresh K/V."""
    from kvcache import PagedKVCache
    from kvcache import cache as cache_mod
    from kvcache.generation import forward_tokens

    ids = loaded_default.tokenizer("The cache stores keys and values for every token.", return_tensors="pt").input_ids
    clean = forward_tokens(loaded_default.model, PagedKVCache.for_model(loaded_default.model, "fp16"), ids, last_only=False)
    store = cache_mod.store_kv
    monkeypatch.setattr(cache_mod, "store_kv", lambda layer, k, v, slots: store(layer, 0 * k, 0 * v, slots))
    broken = forward_tokens(loaded_default.model, PagedKVCache.for_model(loaded_default.model, "fp16"), ids, last_only=False)
    assert (clean - broken).abs().max() > 1.0


def test_bad_text_files(tmp_path, loaded_default):
    with pytest.raises(EvalError, match="not found"):
        read_text(tmp_path / "nope.txt")
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(EvalError, match="empty"):
        read_text(tmp_path / "empty.txt")
    (tmp_path / "latin1.txt").write_bytes("café crème".encode("latin-1"))
    with pytest.raises(EvalError, match="not UTF-8"):
        read_text(tmp_path / "latin1.txt")
    with pytest.raises(EvalError, match="fewer than one window"):
        make_windows(loaded_default.tokenizer, "too short", 512, 16, 8192)
    with pytest.raises(EvalError, match="beyond the model's 8192 positions"):
        make_windows(loaded_default.tokenizer, "x " * 10, 9000, 16, 8192)


def test_cli_errors_are_one_line(tmp_path, capsys):
    (tmp_path / "t.txt").write_text("hello world " * 50)
    cases = [
        (["evaluate", "--kv", "fp16,int4"], "valid modes: fp16, int8, int8-dynamic"),
        (["evaluate", "--kv", "int8"], "needs --qparams"),
        (["evaluate", "--text-file", str(tmp_path / "missing.txt")], "text file not found"),
        (["evaluate", "--kv", "int8", "--qparams", str(tmp_path / "q.safetensors")], "qparams file not found"),
        (["evaluate", "--model", str(tmp_path / "no-model"), "--text-file", str(tmp_path / "t.txt")], str(tmp_path / "no-model")),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and message in err and "\n" not in err, err


def test_cli_writes_json(tmp_path, loaded_default, capsys):
    out = tmp_path / "eval.json"
    rc = main(["evaluate", "--kv", "fp16,int8-dynamic", "--seqlen", "64", "--samples", "2",
               "--greedy-prompts", "1", "--greedy-tokens", "4", "--json", str(out)])
    assert rc == 0
    data = json.loads(out.read_text())
    assert set(data) >= {"model", "text_file", "seqlen", "tokens_scored", "results"}
    assert [r["kv"] for r in data["results"]] == ["fp16", "int8-dynamic"]
    assert set(data["results"][1]) == {"kv", "ppl", "delta_ppl_pct", "kl_vs_fp16", "greedy_match_pct", "kv_bytes_per_token"}
    assert "int8-dynamic" in capsys.readouterr().out
