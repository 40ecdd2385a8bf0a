"""Attention variants: sliding windows cap the served context (within a window the cache is exact, checked against
transformers' eager attention), softcapped and sink families are refused in one line, and a decode step of rows
of unequal length attends each row's own length whether or not transformers passes a mask."""

from pathlib import Path

import pytest
import torch
from conftest import make_tiny_llama
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    LlamaConfig,
    MistralConfig,
    PreTrainedConfig,
    Qwen2Config,
    Qwen3Config,
)

from kvcache import BlockPool, KVShape, PagedKVCache, get_mode
from kvcache.errors import ConfigError, ContextTooLong, ModelLoadError
from kvcache.hf.compat import cache_kwargs
from kvcache.hf.forward import forward_tokens
from kvcache.measure.evaluate import evaluate
from kvcache.measure.needle import needle
from kvcache.models.loader import LoadedModel, load_model
from kvcache.models.variants import attention_window, context_limit
from kvcache.storage.context import StepContext

WINDOW, POSITIONS, BLOCK = 32, 128, 4
SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, max_position_embeddings=POSITIONS)


def _one_line(err: pytest.ExceptionInfo, *needles: str) -> None:
    msg = str(err.value)
    assert "\n" not in msg
    for needle_text in needles:
        assert needle_text in msg, msg


# --- reading the window ------------------------------------------------------------------------


@pytest.mark.parametrize(("config", "window"), [
    (MistralConfig(sliding_window=WINDOW, **SMALL), WINDOW),
    (MistralConfig(sliding_window=None, **SMALL), None),
    (Qwen2Config(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1, **SMALL), WINDOW),
    (Qwen2Config(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=2, **SMALL), None),  # no layer slides
    (Qwen2Config(use_sliding_window=False, sliding_window=WINDOW, **SMALL), None),
    (Qwen3Config(use_sliding_window=True, sliding_window=WINDOW,
                 layer_types=["full_attention", "sliding_attention"], **SMALL), WINDOW),
    (LlamaConfig(**SMALL), None),
], ids=["mistral", "mistral-none", "qwen2", "qwen2-no-layer", "qwen2-off", "qwen3-layer-types", "llama"])
def test_attention_window_is_read(config: PreTrainedConfig, window: int | None):
    assert attention_window(config) == window
    assert context_limit(config) == (window or POSITIONS)


def test_a_window_as_long_as_the_context_caps_nothing():
    assert context_limit(MistralConfig(sliding_window=POSITIONS, **SMALL)) == POSITIONS


# --- loading ------------------------------------------------------------------------------------


def _save(config: PreTrainedConfig, folder: Path, tokenizer) -> Path:
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _refused_at_load(folder: Path) -> pytest.ExceptionInfo:
    """The ModelLoadError ``load_model`` raises for the model saved in ``folder`` (refused before it runs)."""
    with pytest.raises(ModelLoadError) as err:
        load_model(str(folder), device="cpu")
    return err


@pytest.fixture(scope="module", params=["mistral", "qwen2"])
def windowed(request, tmp_path_factory, loaded_default: LoadedModel) -> tuple[LoadedModel, torch.nn.Module]:
    """A random windowed model loaded with kvq, and the same weights under transformers' eager attention."""
    vocab = len(loaded_default.tokenizer)
    if request.param == "mistral":
        config = MistralConfig(vocab_size=vocab, sliding_window=WINDOW, **SMALL)
    else:  # the second layer slides, the first attends everything
        config = Qwen2Config(vocab_size=vocab, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1,
                             **SMALL)
    folder = _save(config, tmp_path_factory.mktemp(request.param) / "tiny", loaded_default.tokenizer)
    lm = load_model(str(folder), device="cpu")
    eager = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager", dtype=torch.float32).eval()
    return lm, eager


def test_loaded_window_caps_the_context_with_a_note(windowed):
    lm, _ = windowed
    assert lm.max_positions == WINDOW
    assert lm.notes == (f"tiny's sliding window is {WINDOW} tokens; KVQ Studio attends full windows only: "
                        f"at most {WINDOW} tokens",)


def test_context_beyond_the_window_is_refused_in_one_line(windowed):
    lm, _ = windowed
    text = "the quick brown fox jumps over the lazy dog " * 40
    with pytest.raises(ContextTooLong) as err:
        evaluate(lm, text, ["fp16"], seqlen=WINDOW + 8, samples=1, greedy_prompts=0)
    _one_line(err, f"--seqlen {WINDOW + 8}", f"sliding window is {WINDOW} tokens", f"at most {WINDOW} tokens")
    with pytest.raises(ContextTooLong) as err:
        needle(lm, ["fp16"], lengths=[WINDOW + 8], depths=[0.5], trials=1)
    _one_line(err, f"--lengths {WINDOW + 8}", f"sliding window is {WINDOW} tokens")


def test_within_the_window_the_cache_equals_eager_attention(windowed):
    """Prefill in chunks, then decode token by token up to exactly the window (where transformers starts passing
    a sliding mask): every position's logits equal transformers' own eager forward of the whole sequence."""
    lm, eager = windowed
    ids = torch.randint(0, len(lm.tokenizer), (2, WINDOW), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = eager(ids).logits.float()
    cache = PagedKVCache.for_model(lm.model, "fp16", block_size=BLOCK, fp_dtype=torch.float32)
    got = [forward_tokens(lm.model, cache, ids[:, :8], last_only=False),
           forward_tokens(lm.model, cache, ids[:, 8:20], last_only=False)]
    got += [forward_tokens(lm.model, cache, ids[:, t:t + 1], last_only=False) for t in range(20, WINDOW)]
    torch.testing.assert_close(torch.cat(got, dim=1), want, atol=1e-4, rtol=1e-4)


# --- refused families and configs --------------------------------------------------------------


@pytest.mark.parametrize(("model_type", "why"), [
    ("gemma2", "softcapped attention logits"), ("gemma3_text", "sliding-window layers"), ("gpt_oss", "learned attention sinks"),
])
def test_families_the_cache_cannot_honour_are_refused_in_one_line(model_type, why, tmp_path):
    from transformers import AutoConfig

    AutoConfig.for_model(model_type).save_pretrained(tmp_path)
    _one_line(_refused_at_load(tmp_path), f"'{model_type}'", "llama", why)


def test_softcapping_in_a_supported_family_is_refused_in_one_line(tmp_path, loaded_default: LoadedModel):
    config = MistralConfig(vocab_size=len(loaded_default.tokenizer), **SMALL)
    config.attn_logit_softcapping = Gemma2Config().attn_logit_softcapping
    _one_line(_refused_at_load(_save(config, tmp_path / "capped", loaded_default.tokenizer)), "capped",
              "attn_logit_softcapping 50")


# --- decode of rows of unequal length -----------------------------------------------------------


def _prefilled(model: torch.nn.Module, prompts: list[list[int]], kv: str = "fp16",
               fp_dtype: torch.dtype = torch.float32) -> tuple[PagedKVCache, list[list[int]]]:
    """Each prompt but its last token prefilled alone (as the scheduler does) into one shared pool."""
    pool = BlockPool(get_mode(kv), KVShape.from_config(model.config), block_size=BLOCK, num_blocks=64,
                     growable=False, fp_dtype=fp_dtype)
    cache, tables = PagedKVCache(pool), []
    for p in prompts:
        tables.append(pool.allocate(-(-len(p) // BLOCK), first=True))
        _step(model, cache, [tables[-1]], [0], [p[:-1]])
    return cache, tables


def _step(model, cache: PagedKVCache, tables, starts, ids, mask: torch.Tensor | None = None) -> torch.Tensor:
    ctx = StepContext.build(tables, starts, len(ids[0]), BLOCK, "cpu")
    cache.begin_step(ctx)
    try:
        with torch.no_grad():
            out = model(input_ids=torch.tensor(ids), position_ids=ctx.positions, attention_mask=mask, use_cache=True,
                        **cache_kwargs(cache))
    finally:
        cache.end_step()
    return out.logits[:, -1].float()


def _unequal_decode(model: torch.nn.Module, lengths: tuple[int, ...], mask: bool) -> None:
    """One batched decode step of rows of ``lengths`` tokens equals each row's full forward alone."""
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, model.config.vocab_size, (n,), generator=g).tolist() for n in lengths]
    cache, tables = _prefilled(model, prompts)
    end = max(lengths)
    extra = torch.ones(len(prompts), 1, 1, end, dtype=torch.bool) if mask else None  # a mask for the longest row
    got = _step(model, cache, tables, [n - 1 for n in lengths], [[p[-1]] for p in prompts], extra)
    for row, p in enumerate(prompts):
        with torch.no_grad():
            want = model(torch.tensor([p])).logits[:, -1].float()
        torch.testing.assert_close(got[row:row + 1], want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("mask", [False, True], ids=["no-mask", "4d-mask"])
def test_decode_of_unequal_rows_does_not_depend_on_the_mask(mask: bool):
    _unequal_decode(make_tiny_llama(), (7, 19, 12), mask)


def test_decode_of_unequal_rows_at_the_window_edge(windowed):
    """The longest row reaches the window, so transformers passes a sliding mask built at its position."""
    lm, eager = windowed
    _unequal_decode(lm.model, (9, WINDOW), mask=False)


def test_chat_beyond_the_window_is_refused_naming_it(windowed):
    from kvcache import Engine

    lm, _ = windowed
    engine = Engine(lm)
    try:
        with pytest.raises(ContextTooLong) as err:
            engine.chat("fp16").reply("Tell me a long story about a fox. " * 4)
    finally:
        engine.close()
    _one_line(err, f"reads at most {WINDOW}", f"sliding window is {WINDOW} tokens", "clear the chat")


def test_cli_evaluate_beyond_the_window_notes_it_and_refuses_in_one_line(windowed, capsys):
    from kvcache.cli import main

    lm, _ = windowed
    assert main(["evaluate", "--model", lm.source, "--device", "cpu", "--seqlen", str(WINDOW + 1)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert f"note: {lm.notes[0]}" in lines
    assert lines[-1].startswith("error: ") and f"--seqlen {WINDOW + 1} is too long" in lines[-1]


# --- past the window, through the cache directly (generate() users are not capped) ---------------


def test_past_the_window_the_cache_attends_it_as_eager_does(windowed):
    """The cache's attention honours the layer's window itself (transformers' eager slides, full attention differs)."""
    lm, eager = windowed
    n = 2 * WINDOW + 8
    ids = torch.randint(0, len(lm.tokenizer), (2, n), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want = eager(ids).logits.float()
    cache = PagedKVCache.for_model(lm.model, "fp16", block_size=BLOCK, fp_dtype=torch.float32)
    got = [forward_tokens(lm.model, cache, ids[:, :20], last_only=False),
           forward_tokens(lm.model, cache, ids[:, 20:50], last_only=False)]
    got += [forward_tokens(lm.model, cache, ids[:, t:t + 1], last_only=False) for t in range(50, n)]
    torch.testing.assert_close(torch.cat(got, dim=1), want, atol=1e-4, rtol=1e-4)


def test_decode_of_unequal_rows_past_the_window(windowed):
    """Rows shorter and longer than the window in one step: each attends its own window."""
    lm, _ = windowed
    _unequal_decode(lm.model, (9, 2 * WINDOW + 3, WINDOW + 5), mask=False)


def _random_mistral(**config) -> torch.nn.Module:
    """A seeded random Mistral with the kvq attention (sliding window 8, vocabulary 128), built without saving."""
    from kvcache.hf.attention import register_attention

    torch.manual_seed(0)
    config = MistralConfig(vocab_size=128, sliding_window=8, attn_implementation=register_attention(), **config)
    return AutoModelForCausalLM.from_config(config).eval()


def test_residual_schemes_past_the_window_are_refused_in_one_line():
    model = _random_mistral(hidden_size=128, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                            num_key_value_heads=1, head_dim=64, max_position_embeddings=64)  # the hf: schemes' groups
    cache = PagedKVCache.for_model(model, "hf:quanto-int4", block_size=BLOCK, fp_dtype=torch.float32)
    ids = torch.randint(0, 128, (1, 9), generator=torch.Generator().manual_seed(6))
    forward_tokens(model, cache, ids[:, :8])  # within the window: attended
    with pytest.raises(ConfigError) as err:
        forward_tokens(model, cache, ids[:, 8:])
    _one_line(err, "sliding window is 8 tokens", "another KV mode")


def test_the_kernels_attend_past_the_window_as_the_references_do(monkeypatch):
    """Rows past the window take the prefill kernel with each row's window as its mask (Triton's interpreter here)."""
    pytest.importorskip("triton")
    import kvcache.kernels as kernels

    model = _random_mistral(**(SMALL | {"max_position_embeddings": 64})).half()  # the prefill kernel takes 16-bit queries
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 128, (n,), generator=g).tolist() for n in (5, 19, 11)]

    def decode(triton: bool) -> torch.Tensor:
        monkeypatch.setattr(kernels, "use_triton", lambda t: triton)
        cache, tables = _prefilled(model, prompts, "int8-dynamic", torch.float16)
        return _step(model, cache, tables, [len(p) - 1 for p in prompts], [[p[-1]] for p in prompts])

    torch.testing.assert_close(decode(True), decode(False), atol=2e-3, rtol=0)
