"""``python -m calib kv_qparams WORK_DIR OUT_DIR --format vllm --model MODEL_DIR``: a model folder vLLM serves as is.

A tiny random Llama saved with save_pretrained (one file, and sharded), calibrated with the real calibrate(),
exported through the CLI; checked on the files a user would read, with compressed-tensors' own parser and by
loading the folder back (transformers, and safetensors bit for bit). vLLM itself is not run here.
"""

import json
import os
import shutil
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from test_calib_cli import assert_one_line_error, run
from transformers import AutoConfig, LlamaConfig, LlamaForCausalLM

from calib.calibrate import calibrate
from calib.errors import ExportError
from calib.export import export, export_vllm_model
from calib.workdir import load_work_dir

LAYERS, KV_HEADS = 2, 2
SCHEME = {"num_bits": 8, "type": "float", "strategy": "tensor", "dynamic": False, "symmetric": True}
NEW_FILES = {"kv_cache_scales.safetensors", "model.safetensors.index.json", "config.json", "README_kvq_vllm.md"}

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_model(num_layers=LAYERS) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=num_layers,
                      num_attention_heads=4, num_key_value_heads=KV_HEADS, max_position_embeddings=128)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """The tiny model saved as one file and as shards, and a work dir calibrated on it."""
    root = tmp_path_factory.mktemp("vllm")
    model = tiny_model()
    model.save_pretrained(root / "single")
    model.save_pretrained(root / "sharded", max_shard_size="100KB")
    loaded = SimpleNamespace(model=model, tokenizer=None, name="tiny-llama")
    windows = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    wd = calibrate(loaded, windows=windows, work_dir=root / "wd", dataset="builtin", bar=False)
    return SimpleNamespace(root=root, model=model, work_dir=wd)


@pytest.fixture
def model_dir(made, tmp_path):
    """A private copy of the single-file model (tests that edit the model folder edit this one)."""
    return shutil.copytree(made.root / "single", tmp_path / "model")


def snapshot(folder):
    """Every file's bytes and mtime: what 'the original is untouched' means."""
    return {p.relative_to(folder): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.rglob("*")) if p.is_file()}


def tensors_of(folder):
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def export_cli(capsys, made, model, out, *extra):
    return run(capsys, "kv_qparams", str(made.work_dir), str(out), "--format", "vllm", "--model", str(model), *extra)


# --- the ready folder --------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["single", "sharded"])
def test_one_command_makes_a_servable_folder(capsys, made, tmp_path, layout):
    model, out = made.root / layout, tmp_path / "served"
    before = snapshot(model)
    rc, stdout, err = export_cli(capsys, made, model, out)
    assert rc == 0, err
    assert "vllm serve" in stdout and "--kv-cache-dtype fp8" in stdout and "not run" in stdout

    # the folder: the original's files plus ours; everything unchanged is a hard link, every changed file new
    names = {p.name for p in out.iterdir()}
    assert names == {p.name for p in model.iterdir()} | NEW_FILES
    for name in names - NEW_FILES:
        assert os.path.samefile(out / name, model / name), name
    for name in NEW_FILES:
        assert (out / name).stat().st_nlink == 1, name
    assert snapshot(model) == before  # bytes and mtimes of the original untouched

    # config.json: the original's, plus the compressed-tensors quantization_config
    config = json.loads((out / "config.json").read_text())
    original = json.loads((model / "config.json").read_text())
    assert {k: v for k, v in config.items() if k != "quantization_config"} == original
    assert config["quantization_config"] == {"quant_method": "compressed-tensors", "format": "dense",
                                             "config_groups": {}, "kv_cache_scheme": SCHEME}

    # the index lists every original tensor where it was, and the scales in their new file
    index = json.loads((out / "model.safetensors.index.json").read_text())
    scale_names = {f"model.layers.{i}.self_attn.{kv}_scale" for i in range(LAYERS) for kv in "kv"}
    assert {n for n, f in index["weight_map"].items() if f == "kv_cache_scales.safetensors"} == scale_names
    originals = {}
    for f in sorted(model.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            originals.update({k: f.name for k in h.keys()})
    assert {n: f for n, f in index["weight_map"].items() if n not in scale_names} == originals
    sizes = sum(t.numel() * t.element_size() for t in tensors_of(out).values())
    assert index["metadata"]["total_size"] == sizes
    if layout == "sharded":  # transformers' own index also counts parameters
        assert index["metadata"]["total_parameters"] == sum(t.numel() for t in tensors_of(out).values())

    # the scales: absmax / 448 per layer, from the work dir's stats
    stats = load_work_dir(made.work_dir)
    scales = load_file(out / "kv_cache_scales.safetensors")
    for i in range(LAYERS):
        for kv, st in (("k", stats.key_stats), ("v", stats.value_stats)):
            t = scales[f"model.layers.{i}.self_attn.{kv}_scale"]
            assert t.dtype == torch.float32 and t.shape == (1,)
            assert torch.equal(t, (st["absmax"][i].max() / 448.0).reshape(1))

    readme = (out / "README_kvq_vllm.md").read_text()
    assert f"vllm serve {out} --kv-cache-dtype fp8" in readme and "not checked by serving it with vLLM" in readme


def test_compressed_tensors_parses_the_config(capsys, made, tmp_path):
    ct = pytest.importorskip("compressed_tensors")
    from compressed_tensors.quantization import (
        QuantizationArgs,
        QuantizationStrategy,
        QuantizationType,
    )

    for granularity, strategy in (("tensor", QuantizationStrategy.TENSOR), ("head", QuantizationStrategy.ATTN_HEAD)):
        out = tmp_path / granularity
        rc, stdout, err = export_cli(capsys, made, made.root / "single", out, "--granularity", granularity)
        assert rc == 0, err
        assert f"compressed-tensors {ct.__version__} parses" in stdout
        qc = json.loads((out / "config.json").read_text())["quantization_config"]
        parsed = ct.QuantizationConfig.model_validate(qc)
        assert parsed.quant_method == "compressed-tensors" and parsed.format == "dense" and parsed.config_groups == {}
        args = QuantizationArgs.model_validate(qc["kv_cache_scheme"])  # extra="forbid": field names checked
        assert (args.num_bits, args.type, args.strategy, args.dynamic, args.symmetric) == (
            8, QuantizationType.FLOAT, strategy, False, True)
        shape = (1,) if granularity == "tensor" else (KV_HEADS,)
        assert load_file(out / "kv_cache_scales.safetensors")["model.layers.1.self_attn.v_scale"].shape == shape


@pytest.mark.parametrize("layout", ["single", "sharded"])
def test_folder_loads_back_bit_identical(capsys, made, tmp_path, layout):
    out = tmp_path / "served"
    assert export_cli(capsys, made, made.root / layout, out)[0] == 0
    want = made.model.state_dict()
    # safetensors directly: every original tensor, bit for bit (tied lm_head is stored once)
    got = tensors_of(out)
    assert all(torch.equal(got[k], want[k]) for k in got if not k.endswith("_scale"))
    assert set(want) - set(got) <= {"lm_head.weight"}
    # transformers reads the config ...
    assert AutoConfig.from_pretrained(out).quantization_config["kv_cache_scheme"] == SCHEME
    # ... and, with compressed-tensors installed (without it, it refuses the config), loads the model unchanged
    pytest.importorskip("compressed_tensors")
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    state = loaded.state_dict()
    assert all(torch.equal(state[k], want[k]) for k in want)
    x = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, made.model(x).logits)


def test_library_call_and_export_dispatch(made, tmp_path):
    stats = load_work_dir(made.work_dir)
    folder = export_vllm_model(stats, made.root / "sharded", tmp_path / "a", granularity="head")
    assert {p.name for p in folder.written} == NEW_FILES and folder.linked > 0 and folder.copied == 0
    files = export(stats, tmp_path / "b", "vllm", model_dir=made.root / "single")
    assert {p.name for p in files} == NEW_FILES and all(p.parent == tmp_path / "b" for p in files)
    with pytest.raises(ExportError, match="vllm format only"):
        export(stats, tmp_path / "c", "kvq", model_dir=made.root / "single")


def test_empty_existing_out_dir_is_used(capsys, made, tmp_path):
    (tmp_path / "empty").mkdir()
    assert export_cli(capsys, made, made.root / "single", tmp_path / "empty")[0] == 0
    assert (tmp_path / "empty" / "kv_cache_scales.safetensors").is_file()


def test_copies_where_hard_links_fail(capsys, made, model_dir, tmp_path, monkeypatch):
    def no_links(*a, **k):
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", no_links)
    before = snapshot(model_dir)
    rc, stdout, err = export_cli(capsys, made, model_dir, tmp_path / "out")
    assert rc == 0, err
    assert "0 files hard-linked, 2 copied" in stdout
    assert not os.path.samefile(tmp_path / "out" / "model.safetensors", model_dir / "model.safetensors")
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == (model_dir / "model.safetensors").read_bytes()
    assert snapshot(model_dir) == before


def test_symlinked_model_links_the_blobs(capsys, made, tmp_path):
    """A Hugging Face cache snapshot: the folder's files are symlinks into blobs/."""
    blobs, snap = tmp_path / "blobs", tmp_path / "snapshot"
    blobs.mkdir()
    snap.mkdir()
    for f in (made.root / "single").iterdir():
        shutil.copy2(f, blobs / f.name)
        (snap / f.name).symlink_to(blobs / f.name)
    assert export_cli(capsys, made, snap, tmp_path / "out")[0] == 0
    out = tmp_path / "out" / "model.safetensors"
    assert not out.is_symlink() and os.path.samefile(out, blobs / "model.safetensors")
    assert not (tmp_path / "out" / "config.json").is_symlink()
    assert (blobs / "config.json").read_bytes() == (made.root / "single" / "config.json").read_bytes()


def test_extends_a_compressed_tensors_config(capsys, made, model_dir, tmp_path):
    config = json.loads((model_dir / "config.json").read_text())
    existing = {"quant_method": "compressed-tensors", "format": "dense", "ignore": ["lm_head"],
                "config_groups": {}, "quantization_status": "compressed"}
    (model_dir / "config.json").write_text(json.dumps({**config, "quantization_config": existing}))
    assert export_cli(capsys, made, model_dir, tmp_path / "out")[0] == 0
    qc = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    assert qc == {**existing, "kv_cache_scheme": SCHEME}
    # the same scheme again (e.g. from llm-compressor, with its extra fields) is kept as it is
    same = {**SCHEME, "group_size": None, "observer": "minmax"}
    (model_dir / "config.json").write_text(json.dumps({**config, "quantization_config": {**existing, "kv_cache_scheme": same}}))
    assert export_cli(capsys, made, model_dir, tmp_path / "again")[0] == 0
    assert json.loads((tmp_path / "again" / "config.json").read_text())["quantization_config"]["kv_cache_scheme"] == same


def test_leaves_out_mistral_consolidated_files(capsys, made, model_dir, tmp_path):
    shutil.copy(model_dir / "model.safetensors", model_dir / "consolidated.safetensors")
    rc, _, err = export_cli(capsys, made, model_dir, tmp_path / "out")
    assert rc == 0
    assert err.startswith("warning: consolidated.safetensors left out") and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out" / "consolidated.safetensors").exists()
    assert "Left out: consolidated.safetensors" in (tmp_path / "out" / "README_kvq_vllm.md").read_text()


def test_failure_midway_leaves_nothing(made, model_dir, tmp_path, monkeypatch):
    import calib.export.vllm_folder as vf

    def disk_full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(vf, "write_scales", disk_full)
    with pytest.raises(ExportError, match=r"cannot write .*out \(No space left on device\)"):  # one line, not a bug
        export_vllm_model(load_work_dir(made.work_dir), model_dir, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no OUT_DIR, no hidden build folder


# --- bad inputs: one line on stderr, exit 2, nothing written -------------------------------------------------


def _refused(capsys, made, model, out, *needles, extra=()):
    rc, _, err = export_cli(capsys, made, model, out, *extra)
    assert rc == 2
    assert_one_line_error(err, *needles)


def test_out_dir_not_empty(capsys, made, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    _refused(capsys, made, made.root / "single", tmp_path / "out", "exists and is not empty", "nothing was written")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep.txt"]


def test_out_dir_inside_model(capsys, made, model_dir):
    before = snapshot(model_dir)
    _refused(capsys, made, model_dir, model_dir / "vllm", "inside the model folder")
    assert snapshot(model_dir) == before and not (model_dir / "vllm").exists()


def test_not_a_model_folder(capsys, made, tmp_path):
    (tmp_path / "nomodel").mkdir()
    _refused(capsys, made, tmp_path / "nomodel", tmp_path / "out", "not a Hugging Face model folder (no config.json)")
    _refused(capsys, made, tmp_path / "missing", tmp_path / "out", "does not exist", "leave out --model")
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    _refused(capsys, made, tmp_path / "m.gguf", tmp_path / "out", "is a file", "Hugging Face model folder")
    _refused(capsys, made, "default", tmp_path / "out", "--model default is a .gguf model")
    assert not (tmp_path / "out").exists()


def test_bin_only_and_no_weights(capsys, made, model_dir, tmp_path):
    weights = load_file(model_dir / "model.safetensors")
    (model_dir / "model.safetensors").unlink()
    _refused(capsys, made, model_dir, tmp_path / "out", "has no *.safetensors weights")
    torch.save(weights, model_dir / "pytorch_model.bin")
    _refused(capsys, made, model_dir, tmp_path / "out", ".bin/.pt weights only", "resave the model as safetensors")
    assert not (tmp_path / "out").exists()


def test_stats_from_another_model(capsys, made, tmp_path):
    other = tmp_path / "other"
    tiny_model(num_layers=3).save_pretrained(other)
    capsys.readouterr()  # save_pretrained's progress bar
    _refused(capsys, made, other, tmp_path / "out", "from another model", "3 layers")
    meta = json.loads((made.work_dir / "calib_meta.json").read_text())
    wd = shutil.copytree(made.work_dir, tmp_path / "wd")
    (wd / "calib_meta.json").write_text(json.dumps({**meta, "config_hash": "0123456789abcdef"}))
    rc, _, err = run(capsys, "kv_qparams", str(wd), str(tmp_path / "out"), "--format", "vllm",
                     "--model", str(made.root / "single"))
    assert rc == 2
    assert_one_line_error(err, "from another model", "0123456789abcdef", "python -m calib calibrate")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("method", ["gptq", "awq", "fp8", "bitsandbytes"])
def test_other_quantization_refused(capsys, made, model_dir, tmp_path, method):
    config = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**config, "quantization_config": {"quant_method": method, "bits": 4}}))
    _refused(capsys, made, model_dir, tmp_path / "out", f"already quantized with {method}", "unquantized")


def test_different_kv_cache_scheme_refused(capsys, made, model_dir, tmp_path):
    config = json.loads((model_dir / "config.json").read_text())
    qc = {"quant_method": "compressed-tensors", "format": "dense", "config_groups": {},
          "kv_cache_scheme": {**SCHEME, "strategy": "attn_head"}}
    (model_dir / "config.json").write_text(json.dumps({**config, "quantization_config": qc}))
    _refused(capsys, made, model_dir, tmp_path / "out", "already has a different kv_cache_scheme")


def test_model_with_scales_already_refused(capsys, made, model_dir, tmp_path):
    weights = load_file(model_dir / "model.safetensors")
    save_file({**weights, "model.layers.0.self_attn.k_scale": torch.ones(1)}, str(model_dir / "model.safetensors"))
    _refused(capsys, made, model_dir, tmp_path / "out", "already holds KV-cache scales", "model.layers.0.self_attn.k_scale")


@pytest.mark.parametrize("extra, needle", [
    (("--kv-bits", "4"), "--kv-bits must be 8"),
    (("--granularity", "channel"), "tensor or head"),
    (("--num-tp", "2"), "turbomind format only"),
])
def test_bad_options_with_model(capsys, made, tmp_path, extra, needle):
    _refused(capsys, made, made.root / "single", tmp_path / "out", needle, extra=extra)
    assert not (tmp_path / "out").exists()


# --- without compressed-tensors (the GPU machine has none) ----------------------------------------------------


def test_works_without_compressed_tensors(capsys, made, tmp_path, monkeypatch):
    import sys

    for name in [n for n in sys.modules if n == "compressed_tensors" or n.startswith("compressed_tensors.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "compressed_tensors", None)  # import compressed_tensors -> ImportError
    rc, stdout, err = export_cli(capsys, made, made.root / "single", tmp_path / "out")
    assert rc == 0, err
    assert "checked: compressed-tensors" not in stdout and "vllm serve" in stdout
    assert json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]["kv_cache_scheme"] == SCHEME


def test_importing_calib_does_not_import_compressed_tensors():
    import subprocess
    import sys

    code = ("import sys, calib.export, calib.cli, calib.lmdeploy\n"
            "assert 'compressed_tensors' not in sys.modules, 'compressed_tensors imported at import time'")
    subprocess.run([sys.executable, "-c", code], check=True)
