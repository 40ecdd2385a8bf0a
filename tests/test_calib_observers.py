"""Observers against direct computation: on plain tensors, and inside a calibration run of a tiny GQA Llama
(K after RoPE equals what a DynamicCache stores; K before RoPE equals k_proj's output)."""

from types import SimpleNamespace

import pytest
import torch
from conftest import make_tiny_llama
from torch import nn
from transformers import DynamicCache

from calib.calibrate import calibrate
from calib.observers import ActivationObserver, KVObserver
from kvcache.hf.compat import cache_kwargs, output_cache

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# --- plain tensors ---------------------------------------------------------------------------------


def test_kv_observer_matches_direct_over_uneven_batches():
    torch.manual_seed(0)
    x = torch.randn(3, 37, 2, 8) * 5
    obs = KVObserver(2, 8)
    for part in (x[:1], x[1:, :10], x[1:, 10:]):
        obs.update(part)
    s = obs.stats()
    flat = x.reshape(-1, 2, 8)
    assert torch.equal(s["max"], flat.amax(0))
    assert torch.equal(s["min"], flat.amin(0))
    assert torch.equal(s["absmax"], flat.abs().amax(0))
    assert obs.num_tokens == 3 * 37
    assert all(t.dtype == torch.float32 and t.shape == (2, 8) for t in s.values())


def test_kv_observer_half_precision_is_exact():
    x = (torch.randn(4, 16, 1, 4) * 100).half()
    obs = KVObserver(1, 4)
    obs.update(x)
    assert torch.equal(obs.stats()["absmax"], x.float().abs().reshape(-1, 1, 4).amax(0))


def test_activation_observer_means_are_token_weighted():
    torch.manual_seed(1)
    x = torch.randn(1000, 6, dtype=torch.float64) + 3
    obs = ActivationObserver(6)
    for part in (x[:1], x[1:700], x[700:]):  # very uneven batches: a mean of means would be wrong
        obs.update(part.float().view(1, -1, 6))
    s = obs.stats()
    xf = x.float().double()
    torch.testing.assert_close(s["mean"], xf.mean(0).float(), rtol=0, atol=1e-6)
    torch.testing.assert_close(s["absmean"], xf.abs().mean(0).float(), rtol=0, atol=1e-6)
    assert torch.equal(s["max"], x.float().amax(0)) and torch.equal(s["min"], x.float().amin(0))
    assert torch.equal(s["absmax"], x.float().abs().amax(0))
    assert set(s) == {"max", "min", "mean", "absmax", "absmean"}


def test_observers_reject_wrong_shapes_and_empty_stats():
    with pytest.raises(ValueError, match=r"\(num_kv_heads, head_dim\)"):
        KVObserver(2, 8).update(torch.zeros(4, 8, 2))
    with pytest.raises(ValueError, match="last dim must be 5"):
        ActivationObserver(5).update(torch.zeros(3, 4))
    with pytest.raises(RuntimeError, match="no tokens"):
        KVObserver(2, 8).stats()


# --- inside calibrate() on a tiny GQA Llama --------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """Calibrate a tiny Llama (4 heads, 2 KV heads) with batch_size 2 over 5 windows; and the reference:
    one full forward of all windows with a DynamicCache and hooks on every nn.Linear."""
    model = make_tiny_llama(num_layers=3, num_heads=4, num_kv_heads=2, head_dim=16, vocab=96)
    windows = torch.randint(0, 96, (5, 24), generator=torch.Generator().manual_seed(0))
    work_dir = calibrate(SimpleNamespace(model=model, tokenizer=None, name="tiny"), windows=windows,
                         work_dir=tmp_path_factory.mktemp("obs") / "wd", batch_size=2)
    ref_in, ref_out, handles = {}, {}, []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and ".layers." in name:
            def hook(m, args, out, name=name):
                ref_in.setdefault(name, []).append(args[0].reshape(-1, args[0].shape[-1]))
                ref_out.setdefault(name, []).append(out.reshape(-1, out.shape[-1]))
            handles.append(mod.register_forward_hook(hook))
    with torch.no_grad():
        out = model(input_ids=windows, **cache_kwargs(DynamicCache(config=model.config)), use_cache=True)
    for h in handles:
        h.remove()
    cache = output_cache(out)
    return SimpleNamespace(
        work_dir=work_dir, model=model, cache=cache,
        ref_in={k: torch.cat(v) for k, v in ref_in.items()}, ref_out={k: torch.cat(v) for k, v in ref_out.items()},
    )


def _load(run, name):
    return torch.load(run.work_dir / name, weights_only=True)


def _close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_key_stats_are_k_as_stored_in_the_cache_after_rope(tiny_run):
    key, value = _load(tiny_run, "key_stats.pth"), _load(tiny_run, "value_stats.pth")
    for i, layer in enumerate(tiny_run.cache.layers):
        name = f"model.layers.{i}.self_attn"
        k = layer.keys.transpose(1, 2).reshape(-1, 2, 16)  # [batch, kv_heads, seq, dim] as the cache stores it
        v = layer.values.transpose(1, 2).reshape(-1, 2, 16)
        assert k.shape[0] == 5 * 24
        _close(key["max"][name], k.amax(0))
        _close(key["min"][name], k.amin(0))
        _close(key["absmax"][name], k.abs().amax(0))
        _close(value["max"][name], v.amax(0))
        _close(value["min"][name], v.amin(0))
        _close(value["absmax"][name], v.abs().amax(0))


def test_pre_rope_key_stats_are_k_proj_output(tiny_run):
    pre, post = _load(tiny_run, "key_stats_pre_rope.pth"), _load(tiny_run, "key_stats.pth")
    for i in range(3):
        name = f"model.layers.{i}.self_attn"
        k = tiny_run.ref_out[f"{name}.k_proj"].reshape(-1, 2, 16)
        _close(pre["max"][name], k.amax(0))
        _close(pre["min"][name], k.amin(0))
        _close(pre["absmax"][name], k.abs().amax(0))
        assert not torch.allclose(pre["max"][name], post["max"][name])  # RoPE does change K


def test_linear_inputs_and_outputs_match_hooks_on_a_full_forward(tiny_run):
    inputs, outputs = _load(tiny_run, "inputs_stats.pth"), _load(tiny_run, "outputs_stats.pth")
    assert set(inputs["max"]) == set(tiny_run.ref_in) and len(tiny_run.ref_in) == 3 * 7
    for stats, ref in ((inputs, tiny_run.ref_in), (outputs, tiny_run.ref_out)):
        for name, x in ref.items():
            x = x.double()
            _close(stats["max"][name], x.amax(0).float())
            _close(stats["min"][name], x.amin(0).float())
            _close(stats["mean"][name], x.mean(0).float())
            _close(stats["absmax"][name], x.abs().amax(0).float())
            _close(stats["absmean"][name], x.abs().mean(0).float())


def test_batch_size_does_not_change_the_stats(tiny_run, tmp_path):
    other = calibrate(SimpleNamespace(model=tiny_run.model, tokenizer=None, name="tiny"),
                      windows=torch.randint(0, 96, (5, 24), generator=torch.Generator().manual_seed(0)),
                      work_dir=tmp_path / "wd", batch_size=5)
    for f in ("key_stats.pth", "value_stats.pth", "inputs_stats.pth"):
        a, b = _load(tiny_run, f), torch.load(other / f, weights_only=True)
        for s in a:
            for name in a[s]:
                _close(a[s][name], b[s][name])


def test_a_query_observer_sees_only_its_own_attention_module():
    from kvcache.hf.attention import QUERY_OBSERVER, observing_queries

    model = make_tiny_llama(num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, vocab=64)
    attn0, attn1 = (layer.self_attn for layer in model.model.layers)
    seen = []
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0))
    with observing_queries(attn1, seen.append), torch.no_grad():
        with pytest.raises(RuntimeError, match="already has a query observer"):
            with observing_queries(attn1, print):
                pass
        model(ids, use_cache=False)
    # layer 1's queries only, one call per forward: [batch, heads, tokens, head_dim]
    assert len(seen) == 1 and seen[0].shape == (2, 4, 7, 16)
    assert not hasattr(attn0, QUERY_OBSERVER) and not hasattr(attn1, QUERY_OBSERVER)
    model(ids, use_cache=False)  # no observer left behind
    assert len(seen) == 1
