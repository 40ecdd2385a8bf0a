"""``python -m calib``: flag spellings, the kv_qparams export, every error a user can fix as one line with exit 2,
and a bug as one ``internal error`` line (exit 1) with its traceback in the log."""

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
def fake_calibrate(monkeypatch):
    """Stand-ins for the model loader and calibrate(), so the CLI layer is tested without a model."""
    import calib.calibrate
    import kvcache.models.loader as model_loader

    calls = {}

    def calibrate(loaded, **kwargs):
        calls.update(kwargs, loaded=loaded)
        if calls.get("raise"):
            raise calls["raise"]
        return Path(kwargs["work_dir"])

    monkeypatch.setattr(calib.calibrate, "calibrate", calibrate)
    monkeypatch.setattr(model_loader, "load_model", lambda model, **kw: calls.update(model=model, load=kw) or "LOADED")
    return calls


@pytest.fixture
def log_file(monkeypatch, tmp_path):
    path = tmp_path / "kvq.log"
    monkeypatch.setenv("KVQ_LOG_FILE", str(path))
    return path


def test_calibrate_passes_flags_through(capsys, fake_calibrate, tmp_path):
    rc, out, err = run(capsys, "calibrate", "default", "--calib_dataset", "builtin", "--calib-samples", "8",
                       "--calib-seqlen", "64", "--work-dir", str(tmp_path / "wd"), "--batch-size", "2")
    assert rc == 0, err
    c = fake_calibrate
    assert (c["model"], c["loaded"], c["dataset"], c["samples"], c["seqlen"], c["batch_size"], c["seed"]) == (
        "default", "LOADED", "builtin", 8, 64, 2, 0)
    assert c["work_dir"] == str(tmp_path / "wd") and "kv_qparams" in out


@pytest.mark.parametrize("name", ["CalibDataError", "CalibOOMError", "CalibCancelled", "CalibNaNError"])
def test_calibrate_errors_are_one_line(capsys, fake_calibrate, tmp_path, log_file, name):
    import calib.errors

    fake_calibrate["raise"] = getattr(calib.errors, name)(f"{name} happened: do this")
    rc, _, err = run(capsys, "calibrate", "default", "--calib-dataset", "builtin", "--work-dir", str(tmp_path / "wd"))
    assert rc == 2
    assert_one_line_error(err, f"{name} happened: do this")
    assert not log_file.exists()  # not a bug: nothing logged


@pytest.mark.parametrize("bug", [
    RuntimeError("The size of tensor a (16) must match the size of tensor b (8) at non-singleton dimension 3"),
    ValueError("not enough values to unpack (expected 3, got 2)"),
])
def test_a_bug_in_calibration_is_an_internal_error_with_its_traceback_logged(capsys, fake_calibrate, tmp_path,
                                                                             log_file, bug):
    fake_calibrate["raise"] = bug
    rc, _, err = run(capsys, "calibrate", "default", "--calib-dataset", "builtin", "--work-dir", str(tmp_path / "wd"))
    assert rc == 1
    [line] = err.strip().splitlines()
    assert line.startswith(f"internal error: {type(bug).__name__}: {bug}") and str(log_file) in line
    assert "error: " + str(bug) not in err.replace("internal error: ", "")
    log = log_file.read_text()
    assert "python -m calib calibrate" in log and "Traceback (most recent call last)" in log
    assert f"{type(bug).__name__}: {bug}" in log and "in calibrate" in log  # the frame that raised it


def test_a_shape_error_inside_the_real_calibration_is_an_internal_error(capsys, monkeypatch, tmp_path, log_file):
    """The real calibrate() on a tiny model, an observer failing as a torch shape bug would: not `error: ...`."""
    from types import SimpleNamespace

    from conftest import make_tiny_llama
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    import calib.observers
    import kvcache.models.loader as model_loader

    vocab = {"[UNK]": 0, **{f"w{i}": i + 1 for i in range(63)}}
    t = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    t.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=t, unk_token="[UNK]")
    loaded = SimpleNamespace(model=make_tiny_llama(num_layers=1, vocab=64), tokenizer=tok, name="tiny")
    monkeypatch.setattr(model_loader, "load_model", lambda model, **kw: loaded)

    def broken_update(self, x):
        x.view(-1, 7)  # RuntimeError: shape '[-1, 7]' is invalid for input of size ...

    monkeypatch.setattr(calib.observers.KVObserver, "update", broken_update)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(" ".join(f"w{i % 63}" for i in range(200)))
    rc, _, err = run(capsys, "calibrate", "tiny", "--calib-dataset", str(corpus), "--calib-samples", "2",
                     "--calib-seqlen", "16", "--work-dir", str(tmp_path / "wd"), "--device", "cpu")
    assert rc == 1, err
    [line] = err.strip().splitlines()
    assert line.startswith("internal error: RuntimeError: shape '[-1, 7]' is invalid") and "details in" in line
    log = log_file.read_text()
    assert "Traceback" in log and "broken_update" in log and "layerwise.py" in log
    assert not (tmp_path / "wd").exists()


@pytest.mark.parametrize(("argv", "needles"), [
    (["--calib-dataset", "wikitext103"], ("unknown calibration dataset 'wikitext103'", "builtin")),
    (["--calib-dataset", "c4"], ("c4 is not available offline", "--calib-data-dir")),
    (["--calib-dataset", "notes.csv"], ("calibration file notes.csv not found",)),
    (["--calib-dataset", "builtin", "--device", "tpu"], ("unknown device 'tpu'",)),
])
def test_calibrate_input_errors_come_before_the_model_loads(capsys, fake_calibrate, tmp_path, monkeypatch, argv,
                                                            needles):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    rc, _, err = run(capsys, "calibrate", "default", "--work-dir", str(tmp_path / "wd"), *argv)
    assert rc == 2
    assert_one_line_error(err, *needles)
    assert "model" not in fake_calibrate  # the loader was never called


def test_calibrate_work_dir_with_other_files_is_refused_before_the_model_loads(capsys, fake_calibrate, tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    rc, _, err = run(capsys, "calibrate", "default", "--calib-dataset", "builtin", "--work-dir", str(tmp_path / "mine"))
    assert rc == 2
    assert_one_line_error(err, "not calibration output (notes.txt)")
    assert "model" not in fake_calibrate


def test_calibrate_model_load_error(capsys, tmp_path):
    rc, _, err = run(capsys, "calibrate", str(tmp_path / "no-such-model"), "--calib-dataset", "builtin",
                     "--work-dir", str(tmp_path / "wd"))  # the real loader refuses it
    assert rc == 2
    assert_one_line_error(err, "does not exist")


def test_out_dir_that_cannot_be_written_is_one_line(capsys, work_dir, tmp_path, log_file):
    (tmp_path / "taken").write_text("a file where OUT_DIR should go")
    rc, _, err = run(capsys, "kv_qparams", str(work_dir), str(tmp_path / "taken"), "--format", "kvq")
    assert rc == 2
    assert_one_line_error(err, f"cannot write {tmp_path / 'taken'}", "choose another OUT_DIR")
    assert not log_file.exists()


def test_plan_refuses_bad_flags_before_it_runs(tmp_path, capsys):
    """The planner runs for minutes: a bad output path or budget is refused first, in one line."""
    for argv, needles in (
        (["plan", "default", "--out", str(tmp_path)], ("the plan goes into a .json file", "--out plan.json")),
        (["plan", "default", "--out", str(tmp_path / "plan.txt")], ("a .json file",)),
        (["plan", "default", "--budget-dppl", "0", "--out", str(tmp_path / "p.json")], ("must be positive",)),
        (["plan", "default", "--qparams", str(tmp_path / "none"), "--out", str(tmp_path / "p.json")], ("not found",)),
    ):
        assert main(argv) == 2
        assert_one_line_error(capsys.readouterr().err, *needles)
    assert not (tmp_path / "p.json").exists()
