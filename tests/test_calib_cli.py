"""``python -m calib``: flag spellings, the kv_qparams export, and every known error as one line with exit 2."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_calib_export import C, f32, make_work_dir, stat_tensors, tiny_config
from transformers import LlamaConfig

from calib.cli import build_parser, main
from kvcache.qparams import KVQParams

REPO = Path(__file__).resolve().parent.parent


def run(capsys, *argv):
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def assert_one_line_error(err: str, *needles: str) -> None:
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for n in needles:
        assert n in lines[0], (n, lines[0])


@pytest.fixture
def work_dir(tmp_path):
    return make_work_dir(tmp_path / "quant_output")


@pytest.fixture
def llama_dir(tmp_path):
    """A tiny saved Llama (config only: enough to check stats against it)."""
    path = tmp_path / "tiny-llama"
    tiny_config().save_pretrained(path)
    return path


# --- parsing ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("style", ["-", "_"])
def test_calibrate_flags_parse_in_both_spellings(style):
    f = lambda name: "--" + name.replace("-", style)  # noqa: E731
    args = build_parser().parse_args([
        "calibrate", "default", f("calib-dataset"), "wikitext2", f("calib-samples"), "16", f("calib-seqlen"), "512",
        f("work-dir"), "./wd", "--seed", "3", "--device", "cpu", f("calib-data-dir"), "/data", f("batch-size"), "4",
        f("trust-remote-code"),
    ])
    assert (args.command, args.model, args.calib_dataset, args.calib_samples, args.calib_seqlen) == (
        "calibrate", "default", "wikitext2", 16, 512)
    assert (args.work_dir, args.seed, args.device, args.calib_data_dir, args.batch_size, args.trust_remote_code) == (
        "./wd", 3, "cpu", "/data", 4, True)


def test_calibrate_defaults_follow_lmdeploy():
    args = build_parser().parse_args(["calibrate", "default"])
    assert (args.calib_dataset, args.calib_samples, args.calib_seqlen, args.work_dir, args.seed, args.batch_size) == (
        "c4", 128, 2048, "./quant_output", 0, 1)


def test_calibrate_bad_number_is_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        main(["calibrate", "default", "--calib-samples", "0"])
    assert e.value.code == 2
    assert_one_line_error(capsys.readouterr().err, "--calib-samples", "at least 1")


def test_kv_qparams_lmdeploy_style_flags():
    args = build_parser().parse_args(["kv_qparams", "wd", "out", "--format", "turbomind", "--kv_sym", "False",
                                      "--num_tp", "2", "--kv_bits", "8"])
    assert (args.kv_sym, args.num_tp, args.kv_bits) == (False, 2, 8)
    assert build_parser().parse_args(["kv_qparams", "wd", "out", "--format", "kvq", "--kv-sym"]).kv_sym is True


def test_help_names_turbomind_versions(capsys):
    with pytest.raises(SystemExit) as e:
        main(["kv_qparams", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for needle in ("[k_scale, k_zp, v_scale, v_zp]", "[k_scale, v_scale]", "quant_policy", "0.3.x", "PR #218"):
        assert needle in out


# --- kv_qparams ------------------------------------------------------------------------------------------


def test_kv_qparams_turbomind_tp2(capsys, work_dir, tmp_path):
    out_dir = tmp_path / "weights"
    rc, out, err = run(capsys, "kv_qparams", str(work_dir), str(out_dir), "--format", "turbomind", "--num-tp", "2")
    assert rc == 0, err
    assert "wrote 5 files" in out
    # layer 1, TP shard 1 (KV heads 2-3): K -1..3, V -2..2 in base units
    assert (out_dir / "layers.1.past_kv_scale.1.weight").read_bytes() == f32(4 * C / 255, 1 * C, 4 * C / 255, 0.0)


def test_kv_qparams_kvq_checked_against_model(capsys, work_dir, tmp_path, llama_dir):
    rc, out, err = run(capsys, "kv_qparams", str(work_dir), str(tmp_path / "kvq"), "--format", "kvq",
                       "--granularity", "head", "--model", str(llama_dir))
    assert rc == 0, err
    qp = KVQParams.load(tmp_path / "kvq" / "kv_qparams.safetensors")
    assert qp.granularity == "head" and qp.metadata["model"] == "tiny-llama"
    assert "--qparams" in out


def test_kv_qparams_vllm(capsys, work_dir, tmp_path):
    rc, out, err = run(capsys, "kv_qparams", str(work_dir), str(tmp_path / "v"), "--format", "vllm")
    assert rc == 0, err
    assert (tmp_path / "v" / "kv_cache_scales.safetensors").is_file() and (tmp_path / "v" / "README_vllm.md").is_file()
    assert "rerun with --model MODEL_DIR" in out


def test_lmdeploy_work_dir_warns_on_one_line(capsys, tmp_path):
    wd = make_work_dir(tmp_path / "lmdeploy", meta=False)
    rc, out, err = run(capsys, "kv_qparams", str(wd), str(tmp_path / "o"), "--format", "turbomind")
    assert rc == 0
    assert err.startswith("warning: ") and "cannot be checked" in err and len(err.strip().splitlines()) == 1


# --- errors: one line on stderr, exit 2 ------------------------------------------------------------------


def test_missing_work_dir(capsys, tmp_path):
    rc, _, err = run(capsys, "kv_qparams", str(tmp_path / "nope"), str(tmp_path / "o"), "--format", "kvq")
    assert rc == 2
    assert_one_line_error(err, "not found", "python -m calib calibrate")


def test_corrupt_stats(capsys, work_dir, tmp_path):
    (work_dir / "key_stats.pth").write_bytes(b"PK\x03\x04 truncated")
    rc, _, err = run(capsys, "kv_qparams", str(work_dir), str(tmp_path / "o"), "--format", "kvq")
    assert rc == 2
    assert_one_line_error(err, "key_stats.pth is corrupt")


def test_nan_stats_name_the_layer(capsys, tmp_path):
    bad = stat_tensors("value", 1)["min"].clone()
    bad[0, 0] = float("inf")
    wd = make_work_dir(tmp_path / "wd", overrides={("value", 1, "min"): bad})
    rc, _, err = run(capsys, "kv_qparams", str(wd), str(tmp_path / "o"), "--format", "turbomind")
    assert rc == 2
    assert_one_line_error(err, "value stat 'min' of layer 1 (model.layers.1.self_attn)", "NaN or inf")
    assert torch.isinf(bad).any()


def test_num_tp_not_dividing_heads(capsys, work_dir, tmp_path):
    rc, _, err = run(capsys, "kv_qparams", str(work_dir), str(tmp_path / "o"), "--format", "turbomind", "--num-tp", "3")
    assert rc == 2
    assert_one_line_error(err, "--num-tp 3 does not divide the model's 4 KV heads", "1, 2, 4")
    assert not (tmp_path / "o").exists()


def test_stats_from_another_model(capsys, tmp_path, llama_dir):
    wd = make_work_dir(tmp_path / "wd", config_hash_value="0123456789abcdef")
    rc, _, err = run(capsys, "kv_qparams", str(wd), str(tmp_path / "o"), "--format", "kvq", "--model", str(llama_dir))
    assert rc == 2
    assert_one_line_error(err, "from another model", "0123456789abcdef", "python -m calib calibrate")
    assert not (tmp_path / "o").exists()


def test_stats_for_another_shape(capsys, work_dir, tmp_path):
    other = tmp_path / "other-llama"
    LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=16, num_hidden_layers=3, num_attention_heads=8,
                num_key_value_heads=2, head_dim=2).save_pretrained(other)
    rc, _, err = run(capsys, "kv_qparams", str(work_dir), str(tmp_path / "o"), "--format", "vllm", "--model", str(other))
    assert rc == 2
    assert_one_line_error(err, "from another model", "3 layers x 2 KV heads")


def test_unknown_format(capsys, work_dir, tmp_path):
    with pytest.raises(SystemExit) as e:
        main(["kv_qparams", str(work_dir), str(tmp_path / "o"), "--format", "awq"])
    assert e.value.code == 2
    assert_one_line_error(capsys.readouterr().err, "invalid choice: 'awq'", "turbomind")


def test_bad_bits_for_format(capsys, work_dir, tmp_path):
    rc, _, err = run(capsys, "kv_qparams", str(work_dir), str(tmp_path / "o"), "--format", "turbomind", "--kv-bits", "4")
    assert rc == 2
    assert_one_line_error(err, "--kv-bits must be 8")


def test_python_dash_m_reports_error_without_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "calib", "kv_qparams", str(tmp_path / "missing"), str(tmp_path / "o"), "--format", "kvq"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert_one_line_error(proc.stderr, "not found")


def test_meta_newer_than_reader(capsys, work_dir, tmp_path):
    meta = json.loads((work_dir / "calib_meta.json").read_text())
    meta["format_version"] = 99
    (work_dir / "calib_meta.json").write_text(json.dumps(meta))
    rc, _, err = run(capsys, "kv_qparams", str(work_dir), str(tmp_path / "o"), "--format", "kvq")
    assert rc == 2
    assert_one_line_error(err, "format version 99", "upgrade")


# --- calibrate: the CLI layer only (the real calibration is tested with calib.calibrate) -------------------


@pytest.fixture
def fake_calibrate(monkeypatch, tmp_path):
    """Stand-ins for the model loader and calib.calibrate, so the CLI layer is tested without a model."""
    import types

    import kvcache.model_loader as model_loader

    calls = {}
    mod = types.ModuleType("calib.calibrate")

    class CalibDataError(Exception):
        pass

    class CalibOOMError(RuntimeError):
        pass

    class CalibCancelled(Exception):
        pass

    def calibrate(loaded, **kwargs):
        calls.update(kwargs, loaded=loaded)
        if calls.get("raise"):
            raise calls["raise"]
        return Path(kwargs["work_dir"])

    mod.__dict__.update(calibrate=calibrate, CalibDataError=CalibDataError, CalibOOMError=CalibOOMError,
                        CalibCancelled=CalibCancelled)
    monkeypatch.setitem(sys.modules, "calib.calibrate", mod)
    monkeypatch.setattr(model_loader, "load_model", lambda model, **kw: calls.update(model=model, load=kw) or "LOADED")
    calls["errors"] = mod
    return calls


def test_calibrate_passes_flags_through(capsys, fake_calibrate, tmp_path):
    rc, out, err = run(capsys, "calibrate", "default", "--calib_dataset", "wikitext2", "--calib-samples", "8",
                       "--calib-seqlen", "64", "--work-dir", str(tmp_path / "wd"), "--batch-size", "2")
    assert rc == 0, err
    c = fake_calibrate
    assert (c["model"], c["loaded"], c["dataset"], c["samples"], c["seqlen"], c["batch_size"], c["seed"]) == (
        "default", "LOADED", "wikitext2", 8, 64, 2, 0)
    assert c["work_dir"] == str(tmp_path / "wd") and "kv_qparams" in out


@pytest.mark.parametrize("name", ["CalibDataError", "CalibOOMError", "CalibCancelled"])
def test_calibrate_errors_are_one_line(capsys, fake_calibrate, tmp_path, name):
    fake_calibrate["raise"] = getattr(fake_calibrate["errors"], name)(f"{name} happened: do this")
    rc, _, err = run(capsys, "calibrate", "default", "--work-dir", str(tmp_path / "wd"))
    assert rc == 2
    assert_one_line_error(err.strip().splitlines()[-1] + "\n", f"{name} happened: do this")
    assert "Traceback" not in err


def test_calibrate_model_load_error(capsys, monkeypatch, tmp_path):
    import types

    monkeypatch.setitem(sys.modules, "calib.calibrate", types.SimpleNamespace(calibrate=lambda *a, **k: None))
    rc, _, err = run(capsys, "calibrate", str(tmp_path / "no-such-model"))  # the real loader refuses it
    assert rc == 2
    assert_one_line_error(err, "does not exist")
