"""The key transform fitted to a long context: RoPE-averaged moments (against transformers' own RoPE), the
``qk_context`` export, and the RoPE frequencies a calibration records for it."""

from types import SimpleNamespace

import pytest
import torch
from conftest import make_tiny_llama
from test_calib_cli import assert_one_line_error, run
from test_calib_export import make_work_dir
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from calib.calibrate import calibrate
from calib.errors import ExportError
from calib.export import export
from calib.workdir import load_work_dir
from kvcache.qparams import KVQParams
from kvcache.transforms import qk_transform, rope_averaged


def _inv_freq(d: int, base: float = 10000.0) -> torch.Tensor:
    return 1.0 / base ** (torch.arange(0, d, 2, dtype=torch.float64) / d)


def _spd(n: int, heads: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(heads, n, n, generator=g, dtype=torch.float64)
    return a @ a.transpose(-1, -2) + 0.1 * torch.eye(n, dtype=torch.float64)


def test_rope_averaged_equals_the_moment_of_vectors_transformers_turns():
    torch.manual_seed(0)
    d, n, offsets = 16, 50, 37
    x = torch.randn(2, n, d, dtype=torch.float64) @ torch.randn(d, d, dtype=torch.float64)  # 2 heads, correlated
    cov = x.transpose(-1, -2) @ x / n
    angles = torch.arange(offsets, dtype=torch.float64)[:, None] * _inv_freq(d)[None]
    emb = torch.cat([angles, angles], -1)  # [offsets, d], transformers' layout
    turned, _ = apply_rotary_pos_emb(x[None].expand(offsets, 2, n, d), x[None].expand(offsets, 2, n, d),
                                     emb.cos()[:, None, :].expand(offsets, n, d), emb.sin()[:, None, :].expand(offsets, n, d))
    want = torch.einsum("thna,thnb->hab", turned, turned) / (n * offsets)
    torch.testing.assert_close(rope_averaged(cov, _inv_freq(d), offsets), want, rtol=1e-10, atol=1e-10)
    assert torch.equal(rope_averaged(cov, _inv_freq(d), 1), cov)  # no further turn: unchanged
    with pytest.raises(ValueError, match="full-width RoPE"):
        rope_averaged(cov, _inv_freq(d)[:4], offsets)  # partial rotary (4 of 8 pairs)


def _with_moments(path, *, inv_freq=True):
    """The export tests' work dir (2 layers x 4 KV heads x head_dim 2, seqlen 2048) plus qk_moments.pth."""
    wd = make_work_dir(path)
    names = [f"model.layers.{i}.self_attn" for i in range(2)]
    raw = {"key": {n: _spd(2, 4, i) for i, n in enumerate(names)},
           "query": {n: _spd(2, 4, 10 + i) for i, n in enumerate(names)}, "tokens": {n: 100 for n in names}}
    if inv_freq:
        raw["rope_inv_freq"] = torch.tensor([0.01], dtype=torch.float64)
    torch.save(raw, wd / "qk_moments.pth")
    return wd


def test_export_fits_the_transform_to_the_context(tmp_path):
    stats = load_work_dir(_with_moments(tmp_path / "wd"))
    short = KVQParams.load(export(stats, tmp_path / "short", "kvq", qk_context=2048)[0])  # the calibration length
    plain = KVQParams.load(export(stats, tmp_path / "plain", "kvq")[0])
    long = KVQParams.load(export(stats, tmp_path / "long", "kvq", qk_context=8192)[0])
    for i in range(2):
        torch.testing.assert_close(short.k_transform[i], plain.k_transform[i], rtol=0, atol=0)
        k, q = (rope_averaged(m[i], stats.rope_inv_freq, 8192 - 2048 + 1) for m in (stats.key_moments, stats.query_moments))
        torch.testing.assert_close(long.k_transform[i], qk_transform(k, q))
        assert (long.k_transform[i] - plain.k_transform[i]).abs().max() > 1e-3  # the slow pair turns 61 rad: it changes
    assert long.metadata["qk_context"] == "8192" and "qk_context" not in plain.metadata


def test_measurements_longer_than_the_fit_say_how_to_fit_them(tmp_path):
    from kvcache.measure.evaluate import context_notes

    stats = load_work_dir(_with_moments(tmp_path / "wd"))
    plain = KVQParams.load(export(stats, tmp_path / "plain", "kvq")[0])
    long = KVQParams.load(export(stats, tmp_path / "long", "kvq", qk_context=8192)[0])
    assert (plain.qk_context, long.qk_context) == (2048, 8192)
    [note] = context_notes(plain, ["fp16", "int8-qk"], 4096)  # evaluate, needle and recommend report it
    assert "fitted to 2048 positions and this measures 4096" in note and "--qk-context 4096" in note
    assert context_notes(long, ["int8-qk"], 4096) == context_notes(plain, ["int8-qk"], 2048) == []
    assert context_notes(plain, ["fp16", "int8-rot"], 4096) == []  # no mode reads the transform


def test_static_key_ranges_calibrated_on_shorter_windows_are_flagged(tmp_path):
    from kvcache.measure.evaluate import context_notes

    plain = KVQParams.load(export(load_work_dir(_with_moments(tmp_path / "wd")), tmp_path / "plain", "kvq")[0])
    [note] = context_notes(plain, ["fp16", "int8"], 4096)  # static min/max of post-RoPE keys seen at 0-2047 only
    assert "calibrated on 2048-token windows and this measures 4096" in note and "--calib-seqlen 4096" in note
    assert context_notes(plain, ["int8"], 2048) == []
    assert len(context_notes(plain, ["int8", "int8-qk"], 4096)) == 2  # both causes, once each


def test_qk_context_refusals(tmp_path, capsys):
    old = load_work_dir(_with_moments(tmp_path / "old", inv_freq=False))  # calibrated before the frequencies were kept
    with pytest.raises(ExportError, match="recalibrate"):
        export(old, tmp_path / "o", "kvq", qk_context=8192)
    assert export(old, tmp_path / "o", "kvq")  # without --qk-context it exports as before
    wd = _with_moments(tmp_path / "wd")
    rc, _, err = run(capsys, "kv_qparams", str(wd), str(tmp_path / "v"), "--format", "vllm", "--qk-context", "8192")
    assert rc == 2
    assert_one_line_error(err, "--qk-context", "kvq")
    rc, out, _ = run(capsys, "kv_qparams", str(wd), str(tmp_path / "k"), "--format", "kvq", "--qk-context", "8192")
    assert rc == 0 and KVQParams.load(tmp_path / "k" / "kv_qparams.safetensors").metadata["qk_context"] == "8192"
    assert "--qk-context" not in out
    rc, out, _ = run(capsys, "kv_qparams", str(wd), str(tmp_path / "d"), "--format", "kvq")
    assert rc == 0 and "fits positions up to 2048" in out and "--qk-context N" in out  # says how to fit a longer one


def test_calibration_records_the_models_rope_frequencies(tmp_path):
    model = make_tiny_llama(num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, vocab=64)
    windows = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    wd = calibrate(SimpleNamespace(model=model, tokenizer=None, name="tiny"), windows=windows, work_dir=tmp_path / "wd")
    stats = load_work_dir(wd)
    torch.testing.assert_close(stats.rope_inv_freq, model.model.rotary_emb.inv_freq.double())
    qp = KVQParams.load(export(stats, tmp_path / "out", "kvq", qk_context=64)[0])
    assert len(qp.k_transform) == 2 and qp.metadata["qk_context"] == "64"
