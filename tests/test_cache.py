"""The paged cache: block tables, equivalence with transformers' cache, exact byte accounting."""

import pytest
import torch
from conftest import INT4_HEAD_MODE, make_tiny_llama, random_qparams, static_qparams
from transformers import DynamicCache

from kvcache import (
    BlockPool,
    KVCacheFull,
    KVQParams,
    KVShape,
    ModeError,
    PagedKVCache,
    QParamsError,
    get_mode,
)
from kvcache.hf.compat import cache_kwargs
from kvcache.kernels.reference import gather_kv_reference
from kvcache.quant import dequantize, quantize


def _tables(cache: PagedKVCache) -> torch.Tensor:
    return torch.tensor(cache.block_tables, dtype=torch.int32)


def test_block_tables_across_block_boundaries():
    m = make_tiny_llama()
    cache = PagedKVCache.for_model(m, "fp16", block_size=4, fp_dtype=torch.float32)
    k = torch.randn(1, 2, 10, 16)
    cache.update(k, k, 0)  # 10 tokens: blocks of 4 -> 3 blocks
    assert [len(t) for t in cache.block_tables] == [3]
    more = torch.randn(1, 2, 3, 16)
    cache.update(more, more, 0)  # positions 10..12 cross into a 4th block
    assert len(cache.block_tables[0]) == 4
    got, _ = gather_kv_reference(cache.pool.layers[0], _tables(cache), 13, torch.float32)
    assert torch.equal(got, torch.cat([k, more], dim=2))


def test_generate_matches_transformers_cache_when_storing_compute_dtype(tiny_llama):
    ids = torch.randint(0, 128, (2, 37))
    ref = tiny_llama.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False,
                              pad_token_id=0, **cache_kwargs(DynamicCache(config=tiny_llama.config)))
    cache = PagedKVCache.for_model(tiny_llama, "fp16", block_size=8, fp_dtype=torch.float32)
    out = tiny_llama.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False,
                              pad_token_id=0, **cache_kwargs(cache))
    assert torch.equal(out, ref)
    assert cache.num_tokens == 37 + 24 - 1  # the last token is returned, never fed back


def test_fp16_storage_agrees_within_fp16_rounding(tiny_llama):
    ids = torch.randint(0, 128, (1, 50))
    ref = tiny_llama(ids, **cache_kwargs(DynamicCache(config=tiny_llama.config))).logits
    got = tiny_llama(ids, **cache_kwargs(PagedKVCache.for_model(tiny_llama, "fp16"))).logits
    assert not torch.equal(got, ref)  # fp16 storage really rounds ...
    torch.testing.assert_close(got, ref, rtol=2e-3, atol=2e-3)  # ... by no more than fp16 does


@pytest.mark.parametrize("kv", ["int8", "int8-dynamic"])
def test_quantized_modes_generate(tiny_llama, kv):
    shape = KVShape.from_config(tiny_llama.config)
    ids = torch.randint(0, 128, (1, 20))
    cache = PagedKVCache.for_model(tiny_llama, kv, qparams=static_qparams(shape), block_size=8)
    out = tiny_llama.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0, **cache_kwargs(cache))
    assert out.shape == (1, 28)
    assert cache.pool.layers[0].k.dtype == torch.int8  # stored only quantized


def test_static_int8_stores_codes_of_the_qparams():
    m = make_tiny_llama()
    shape = KVShape.from_config(m.config)
    qp = static_qparams(shape, granularity="head", lim=3.0)
    cache = PagedKVCache.for_model(m, "int8", qparams=qp, block_size=4)
    k = torch.randn(1, 2, 6, 16)
    v = torch.randn(1, 2, 6, 16).clamp(-2.9, 2.9)  # inside the calibrated range
    for layer_idx in (0, 1):  # a forward visits the layers in order; layer 0 opens the step
        cache.update(k, v, layer_idx)
    layer = cache.pool.layers[1]
    ks, kz, vs, vz = qp.layer(1, 2, 16)
    got_k, got_v = gather_kv_reference(layer, _tables(cache), 6, torch.float32)
    want_k = dequantize(quantize(k, ks[None, :, None], kz[None, :, None]), ks[None, :, None], kz[None, :, None])
    torch.testing.assert_close(got_k, want_k)
    assert ((got_v - v).abs() <= vs[0, 0] / 2 + 1e-6).all()


def test_bytes_accounting_is_exact():
    # The default model's shape: 30 layers, 3 KV heads, head_dim 64.
    shape = KVShape(num_layers=30, num_kv_heads=3, head_dim=64, num_heads=9)
    fp16 = BlockPool(get_mode("fp16"), shape)
    dyn = BlockPool(get_mode("int8-dynamic"), shape)
    static = BlockPool(get_mode("int8"), shape, qparams=static_qparams(shape))
    assert fp16.bytes_per_token == 2 * 30 * 3 * 64 * 2 == 23040
    assert static.bytes_per_token == 11520
    assert dyn.bytes_per_token == 11520 + 30 * 3 * 2 * 2 * 2 == 12240  # + fp16 scale and zp for K and V
    assert dyn.bytes_per_token / fp16.bytes_per_token <= 0.535
    assert static.bytes_per_token / fp16.bytes_per_token <= 0.501
    assert static.param_bytes == 30 * 4 * 3 * 64 * 4
    for pool in (fp16, dyn, static):
        pool.allocate(5)
        tensors = [t for layer in pool.layers for t in vars(layer).values() if isinstance(t, torch.Tensor)]
        assert pool.capacity_bytes == sum(t.nbytes for t in tensors)


def test_cache_memory_report(tiny_llama):
    cache = PagedKVCache.for_model(tiny_llama, "int8-dynamic", block_size=8)
    tiny_llama(torch.randint(0, 128, (1, 21)), **cache_kwargs(cache))
    mem = cache.memory()
    assert (mem.tokens_stored, mem.blocks_used) == (21, 3)
    assert mem.bytes_per_token == 2 * 2 * (2 * 16 + 4 * 2)  # layers x kv heads x (int8 K+V + fp16 params)
    assert mem.bytes_used == 3 * 8 * mem.bytes_per_token
    assert mem.bytes_held >= mem.bytes_used


def test_truncate_and_reset_free_blocks(tiny_llama):
    cache = PagedKVCache.for_model(tiny_llama, "fp16", block_size=4)
    tiny_llama(torch.randint(0, 128, (1, 10)), **cache_kwargs(cache))
    cache.truncate(5)
    assert cache.num_tokens == 5 and len(cache.block_tables[0]) == 2
    assert cache.pool.num_used == 2
    cache.reset()
    assert cache.pool.num_used == 0 and cache.get_seq_length() == 0
    with pytest.raises(ValueError, match="cannot truncate"):
        cache.truncate(3)


def test_fixed_pool_full_is_a_clear_error_and_keeps_data():
    shape = KVShape(1, 1, 16, 1)
    pool = BlockPool(get_mode("fp16"), shape, block_size=4, num_blocks=2, growable=False)
    pool.allocate(2)
    with pytest.raises(KVCacheFull, match="KV cache full: 8 tokens in use of 8"):
        pool.allocate(1)
    assert pool.num_used == 2


def test_int8_needs_qparams_and_they_must_match(tiny_llama):
    with pytest.raises(ModeError, match="needs calibrated parameters: pass --qparams"):
        PagedKVCache.for_model(tiny_llama, "int8")
    wrong = static_qparams(KVShape(num_layers=2, num_kv_heads=3, head_dim=16, num_heads=3))
    with pytest.raises(QParamsError, match=r"qparams have 2 layers x \(3, 16\).*model needs 2 layers x \(2, 16\)"):
        PagedKVCache.for_model(tiny_llama, "int8", qparams=wrong)
    with pytest.raises(ModeError, match="our modes: fp16, int8, int8-dynamic"):
        PagedKVCache.for_model(tiny_llama, "int5")


def test_qparams_file_round_trip(tmp_path):
    shape = KVShape(3, 2, 8, 4)
    qp = static_qparams(shape, granularity="tensor", symmetric=True)
    qp.metadata["model"] = "tiny"
    path = qp.save(tmp_path / "kv_qparams.safetensors")
    back = KVQParams.load(path)
    assert (back.granularity, back.symmetric, back.bits, back.metadata["model"]) == ("tensor", True, 8, "tiny")
    assert torch.equal(back.k_scale[2], qp.k_scale[2]) and back.k_scale[0].dtype == torch.float32
    with pytest.raises(QParamsError, match="not found"):
        KVQParams.load(tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(QParamsError, match="not a readable safetensors"):
        KVQParams.load(tmp_path / "junk.safetensors")


def test_beam_search_is_refused_clearly(tiny_llama):
    cache = PagedKVCache.for_model(tiny_llama, "fp16")
    with pytest.raises(NotImplementedError, match="beam search"):
        cache.reorder_cache(torch.tensor([0]))


@pytest.mark.parametrize("kv", ["fp16", "int8", "int8-dynamic", INT4_HEAD_MODE, "int8-rot", "k8v4"],
                         ids=lambda x: getattr(x, "name", x))
def test_kernel_path_through_a_model_matches_the_references(monkeypatch, kv):
    """The GPU path end to end, in Triton's interpreter: an fp16 model's prompt, two decode steps and a new
    turn (prefilled over the cached history, with the mask transformers passes) through the store, decode and
    prefill kernels give the logits of the reference path."""
    pytest.importorskip("triton")
    from kvcache.hf.forward import forward_tokens

    import kvcache.kernels as kernels
    from kvcache.kernels import paged_decode, paged_prefill
    from kvcache.kernels import paged_store as store

    four_bit = get_mode(kv).k_bits < 8 or get_mode(kv).v_bits < 8
    model = make_tiny_llama(head_dim=32 if four_bit else 16).half()  # the kernels take 4-bit codes from head_dim 32
    shape = KVShape.from_config(model.config)
    qparams = {"int8": static_qparams(shape, center=0.5), "k8v4": random_qparams(model.config)}.get(kv)  # int8: zp != 0
    g = torch.Generator().manual_seed(0)
    turns = [torch.randint(0, 128, (1, n), generator=g) for n in (21, 1, 1, 9)]
    calls = []
    for mod, name in ((store, "store_kv_triton"), (paged_decode, "decode_attention_triton"),
                      (paged_prefill, "prefill_attention_triton")):
        def spy(*args, _fn=getattr(mod, name), _name=name, **kwargs):
            masked = _name.startswith("prefill") and len(args) > 5 and args[5] is not None
            calls.append(_name + (" (masked)" if masked else ""))
            return _fn(*args, **kwargs)
        monkeypatch.setattr(mod, name, spy)

    def run(on_kernels: bool) -> list[torch.Tensor]:
        monkeypatch.setattr(kernels, "use_triton", lambda t: on_kernels)
        cache = PagedKVCache.for_model(model, kv, qparams=qparams, block_size=4)
        with torch.inference_mode():
            return [forward_tokens(model, cache, ids, last_only=False) for ids in turns]

    want = run(False)
    assert calls == []
    got = run(True)
    layers = model.config.num_hidden_layers
    assert calls.count("store_kv_triton") == 4 * layers
    assert calls.count("decode_attention_triton") == 2 * layers
    assert calls.count("prefill_attention_triton") == layers  # the prompt: causal, no mask
    assert calls.count("prefill_attention_triton (masked)") == layers  # the new turn: transformers' mask
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=2e-2, rtol=2e-2)
