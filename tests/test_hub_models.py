"""Models by their Hub id: taken from a Hugging Face cache the test lays out as huggingface_hub does
(``models--ORG--NAME/{refs,snapshots,blobs}``), a local folder of that name first, ``--revision``, the one-line
refusals, the download path (its Hub calls faked), and the app's rule beyond localhost. Nothing reaches the network:
any connection attempt fails the test."""

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub
import pytest
import torch
from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError
from huggingface_hub.hf_api import RepoSibling
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from calib.cli import main as calib_main
from kvcache.cli import main as kvcache_main
from kvcache.models import hub
from kvcache.models import loader as model_loader
from kvcache.models.loader import ModelLoadError, load_model
from ui.access import hub_ids_allowed, model_roots
from ui.handlers import check_model_path
from ui.state import AppState, UserError

ROOT = Path(__file__).resolve().parent.parent
REPO = "kvq-test/tiny-llama"
MAIN, V2 = "a" * 40, "b" * 40  # commit hashes of the two snapshots
VOCAB, IDS = 64, torch.tensor([[1, 5, 9, 3, 60, 2]])

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Every way out of this process fails, and is reported even when a library swallows the error."""
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args[:2])
        raise OSError("network access in a test")

    for owner, name in ((socket.socket, "connect"), (socket.socket, "connect_ex"), (socket, "create_connection"),
                        (socket, "getaddrinfo")):
        monkeypatch.setattr(owner, name, refuse)
    yield
    assert not attempts, f"the test tried to reach the network: {attempts}"


@pytest.fixture
def hub_cache(tmp_path, monkeypatch) -> Path:
    """An empty hub cache, offline: HF_HUB_CACHE and HF_HUB_OFFLINE=1 as a user sets them (huggingface_hub reads
    them at import, so its constants are set too)."""
    cache = tmp_path / "hub-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return cache


def tiny_checkpoint(folder: Path, *, layers: int = 2, seed: int = 0) -> LlamaForCausalLM:
    """A random Llama and a word-level tokenizer, saved by transformers as a Hub repo holds them."""
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=128)
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(folder)
    words = Tokenizer(models.WordLevel({"<unk>": 0, "</s>": 1, **{f"w{i}": i for i in range(2, VOCAB)}},
                                       unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=words, unk_token="<unk>", eos_token="</s>").save_pretrained(folder)
    return model


def cache_snapshot(cache: Path, repo_id: str, files: Path, commit: str, refs: tuple[str, ...] = ()) -> Path:
    """Put ``files`` into the cache as huggingface_hub does: content in blobs/, snapshots/<commit>/ of relative
    symlinks to them, refs/<name> holding the commit."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True)
    for f in sorted(files.iterdir()):
        blob = repo / "blobs" / hashlib.sha256(f.read_bytes()).hexdigest()
        shutil.copyfile(f, blob)
        (snapshot / f.name).symlink_to(os.path.relpath(blob, snapshot))
    for ref in refs:
        (repo / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)  # no newline, as huggingface_hub writes it
    return snapshot


@pytest.fixture
def cached_repo(hub_cache, tmp_path) -> dict:
    """REPO in the cache: main (2 layers, seed 0) and a second snapshot, tag v2 (3 layers, seed 1)."""
    out = {}
    for commit, refs, layers, seed in ((MAIN, ("main",), 2, 0), (V2, ("v2",), 3, 1)):
        model = tiny_checkpoint(tmp_path / f"files-{seed}", layers=layers, seed=seed)
        out[commit] = (cache_snapshot(hub_cache, REPO, tmp_path / f"files-{seed}", commit, refs), logits(model))
    return out


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def one_line(err: pytest.ExceptionInfo, *needles: str) -> str:
    msg = str(err.value)
    assert "\n" not in msg, msg
    for needle in needles:
        assert needle in msg, msg
    return msg


# --- from the cache ------------------------------------------------------------------------------------------


def test_a_hub_id_loads_from_the_cache_offline(cached_repo):
    folder, expected = cached_repo[MAIN]
    lm = load_model(REPO, device="cpu")
    assert lm.name == REPO and lm.source == str(folder)
    assert lm.model.config._attn_implementation == "kvq" and lm.num_layers == 2
    torch.testing.assert_close(logits(lm.model), expected)
    assert lm.tokenizer("w5 w9", add_special_tokens=False).input_ids == [5, 9]


@pytest.mark.parametrize("revision", [V2, "v2"])
def test_revision_picks_the_second_snapshot(cached_repo, revision):
    folder, expected = cached_repo[V2]
    lm = load_model(REPO, device="cpu", revision=revision)
    assert lm.source == str(folder) and lm.num_layers == 3
    torch.testing.assert_close(logits(lm.model), expected)


def test_the_cli_takes_a_hub_id_and_revision_from_the_environment(cached_repo, tmp_path):
    """The real entry point, HF_HUB_CACHE and HF_HUB_OFFLINE=1 in its environment and every proxy a dead port."""
    dead = "http://127.0.0.1:9"
    env = {**os.environ, "HTTP_PROXY": dead, "HTTPS_PROXY": dead, "ALL_PROXY": dead, "KVQ_CACHE_DIR": str(tmp_path)}
    out = subprocess.run([sys.executable, "-m", "kvcache", "modes", "--model", REPO, "--revision", "v2", "--kv", "fp16",
                          "--json", "--device", "cpu"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    [row] = json.loads(out.stdout)
    assert row["bytes_per_token"] == 2 * 3 * 2 * 8 * 2  # K and V, 3 layers (v2's), 2 KV heads, head_dim 8, fp16


def test_a_local_folder_of_the_same_name_wins(cached_repo, tmp_path, monkeypatch):
    work = tmp_path / "work"
    expected = logits(tiny_checkpoint(work / REPO, layers=1, seed=2))
    monkeypatch.chdir(work)
    lm = load_model(REPO, device="cpu")
    assert lm.source == str(work / REPO) and lm.num_layers == 1
    torch.testing.assert_close(logits(lm.model), expected)
    with pytest.raises(ModelLoadError) as err:
        load_model(REPO, device="cpu", revision="v2")
    one_line(err, "--revision v2", "local path", "drop --revision")


def test_internlm_ids_go_through_the_llama_mapping(hub_cache, tmp_path, monkeypatch):
    files = tmp_path / "internlm2"
    files.mkdir()
    config = {"model_type": "internlm2", "architectures": ["InternLM2ForCausalLM"]}
    (files / "config.json").write_text(json.dumps(config))
    (files / "model.safetensors").write_bytes(b"")
    folder = cache_snapshot(hub_cache, "internlm/internlm2-chat-1_8b", files, MAIN, ("main",))
    seen = []
    monkeypatch.setattr(model_loader, "_load_internlm", lambda path, raw, name, *a: seen.append((path, name)) or "ok")
    assert load_model("internlm/internlm2-chat-1_8b", device="cpu") == "ok"
    assert seen == [(folder, "internlm/internlm2-chat-1_8b")]


# --- refusals: one line that says what to do ------------------------------------------------------------------


@pytest.mark.parametrize("allow_download", [False, True])
def test_a_missing_id_offline_is_one_line(hub_cache, allow_download):
    with pytest.raises(ModelLoadError) as err:
        load_model("kvq-test/absent", device="cpu", allow_download=allow_download)
    one_line(err, "kvq-test/absent is not a local folder and not in the Hugging Face cache",
             f"HF_HUB_CACHE={hub_cache}", "HF_HUB_OFFLINE is set", "`hf download kvq-test/absent`",
             "unset HF_HUB_OFFLINE")


def test_a_missing_revision_offline_is_one_line(cached_repo):
    with pytest.raises(ModelLoadError) as err:
        load_model(REPO, device="cpu", revision="v3")
    one_line(err, "revision v3", f"`hf download {REPO} --revision v3`")


def test_a_partial_snapshot_says_what_it_lacks(hub_cache, tmp_path):
    files = tmp_path / "config-only"
    files.mkdir()
    LlamaConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=2).save_pretrained(files)
    folder = cache_snapshot(hub_cache, REPO, files, MAIN, ("main",))
    with pytest.raises(ModelLoadError) as err:
        load_model(REPO, device="cpu")
    one_line(err, f"only partly in the Hugging Face cache ({folder}: no complete weights)", f"hf download {REPO}")


@pytest.mark.parametrize("argv", [["calibrate", "kvq-test/absent", "--calib-dataset", "builtin"],
                                  ["plan", "kvq-test/absent"]])
def test_calibration_refuses_a_missing_id_in_one_line(hub_cache, capsys, tmp_path, argv):
    assert calib_main([*argv, "--device", "cpu"] + (["--work-dir", str(tmp_path / "wd")] if argv[0] == "calibrate"
                                                    else ["--out", str(tmp_path / "plan.json")])) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("error: model kvq-test/absent is not a local folder") and "hf download" in line


def test_the_kvcache_cli_refuses_a_missing_id_in_one_line(hub_cache, capsys):
    assert kvcache_main(["modes", "--model", "kvq-test/absent", "--device", "cpu"]) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("error: model kvq-test/absent is not a local folder") and "HF_HUB_OFFLINE is set" in line


# --- downloads (online; the Hub's two calls faked) ---------------------------------------------------------------


@pytest.fixture
def online_hub(hub_cache, tmp_path, monkeypatch) -> dict:
    """HF_HUB_OFFLINE unset; the Hub lists REPO's files (weights in two formats and a GGUF), and a download lays
    out the snapshot of what was asked for."""
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    files = tmp_path / "on-the-hub"
    expected = logits(tiny_checkpoint(files))
    others = ("pytorch_model.bin", "tiny.Q4_0.gguf", "onnx/model.onnx", "consolidated.safetensors")  # never fetched
    sizes = {f.name: f.stat().st_size for f in files.iterdir()} | dict.fromkeys(others, 10**6)
    calls = {"expected": expected, "downloads": [], "size": sum(f.stat().st_size for f in files.iterdir()),
             "fail": {}, "sizes": sizes}  # fail: "model_info" / "snapshot_download" -> the error that call raises

    def model_info(self, repo_id, *, revision=None, files_metadata=False, **kwargs):
        if "model_info" in calls["fail"]:
            raise calls["fail"]["model_info"]
        assert (repo_id, revision, files_metadata) == (REPO, None, True)
        return SimpleNamespace(sha=MAIN, siblings=[RepoSibling(name, size) for name, size in sizes.items()])

    def snapshot_download(repo_id, *, revision=None, allow_patterns=None, **kwargs):
        if "snapshot_download" in calls["fail"]:
            raise calls["fail"]["snapshot_download"]
        calls["downloads"].append((repo_id, revision, sorted(allow_patterns)))
        picked = tmp_path / "picked"
        picked.mkdir()
        for name in allow_patterns:
            shutil.copy(files / name, picked / name)
        return str(cache_snapshot(hub_cache, repo_id, picked, revision, ("main",)))

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", model_info)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    calls["files"] = sorted(f.name for f in files.iterdir())
    return calls


def test_a_missing_id_is_downloaded_when_allowed_and_online(online_hub):
    lm = load_model(REPO, device="cpu", allow_download=True)
    # pinned to the commit the sizes were read for; safetensors only: no .bin, GGUF, consolidated copy or subfolder
    assert online_hub["downloads"] == [(REPO, MAIN, online_hub["files"])]
    torch.testing.assert_close(logits(lm.model), online_hub["expected"])
    assert load_model(REPO, device="cpu", allow_download=True).source == lm.source  # now from the cache
    assert len(online_hub["downloads"]) == 1


def test_a_library_call_never_downloads_unasked(online_hub):
    with pytest.raises(ModelLoadError) as err:
        load_model(REPO, device="cpu")
    one_line(err, "this call does not download (allow_download=False)", f"`hf download {REPO}`")
    assert online_hub["downloads"] == []


def test_a_download_the_disk_cannot_hold_is_refused_first(online_hub, hub_cache, monkeypatch):
    free = online_hub["size"] - 1
    monkeypatch.setattr(hub.shutil, "disk_usage", lambda path: SimpleNamespace(total=2 * free, used=free, free=free))
    with pytest.raises(ModelLoadError) as err:
        load_model(REPO, device="cpu", allow_download=True)
    one_line(err, f"{REPO} needs 0.0 GB", f"HF_HUB_CACHE={hub_cache}", "GB free", "HF_HUB_CACHE at a bigger disk")
    assert online_hub["downloads"] == []


def test_a_gguf_only_repo_is_refused_before_downloading(online_hub):
    for name in [n for n in online_hub["sizes"] if n.endswith((".safetensors", ".bin"))]:
        del online_hub["sizes"][name]
    with pytest.raises(ModelLoadError) as err:
        load_model(REPO, device="cpu", allow_download=True)
    one_line(err, "no transformers weights", f"`hf download {REPO} FILE.gguf`")
    assert online_hub["downloads"] == []


def _http_error(kind: type, status: int) -> Exception:
    return kind("the Hub said no", response=SimpleNamespace(headers={}, status_code=status, request=None))


@pytest.mark.parametrize(("call", "error", "needles"), [
    ("model_info", lambda: _http_error(RepositoryNotFoundError, 404),
     ("neither a local folder nor a model on the Hugging Face Hub (or it is private)", "hf auth login")),
    ("snapshot_download", lambda: _http_error(GatedRepoError, 401),
     ("is gated", f"https://huggingface.co/{REPO}", "hf auth login")),
    ("model_info", lambda: _http_error(RevisionNotFoundError, 404), ("has no revision 'main'", "--revision")),
    ("model_info", lambda: hub._TRANSPORT_ERRORS[-1]("[Errno 111] Connection refused"),
     ("could not download", "Connection refused", "check the connection", f"`hf download {REPO}`")),
])
def test_what_the_hub_refuses_is_one_line(online_hub, call, error, needles):
    online_hub["fail"][call] = error()
    with pytest.raises(ModelLoadError) as err:
        load_model(REPO, device="cpu", allow_download=True)
    one_line(err, *needles)


# --- the app beyond localhost -----------------------------------------------------------------------------------


def test_beyond_localhost_the_model_box_takes_hub_ids_only_with_allow_hub(tmp_path, monkeypatch):
    root = tmp_path / "models"
    root.mkdir()
    monkeypatch.chdir(tmp_path)
    roots = model_roots("0.0.0.0", [str(root)])
    closed = AppState(work_root=tmp_path / "w1", model_roots=roots, allow_hub=hub_ids_allowed("0.0.0.0", False))
    with pytest.raises(UserError, match="does not load models from the Hugging Face Hub.*--allow-hub"):
        check_model_path(closed, "Qwen/Qwen2.5-7B-Instruct")
    check_model_path(closed, "default")
    check_model_path(closed, str(root))
    opened = AppState(work_root=tmp_path / "w2", model_roots=roots, allow_hub=hub_ids_allowed("0.0.0.0", True))
    check_model_path(opened, "Qwen/Qwen2.5-7B-Instruct")
    # A folder of that name here is what the loader would open (a local folder wins): the roots rule applies.
    (tmp_path / "Qwen" / "Qwen2.5-7B-Instruct").mkdir(parents=True)
    with pytest.raises(UserError, match="only under the folders its operator allowed"):
        check_model_path(opened, "Qwen/Qwen2.5-7B-Instruct")
    # On loopback Hub ids are allowed, --model-root or not.
    assert hub_ids_allowed("127.0.0.1", False) and not hub_ids_allowed("0.0.0.0", False)
    check_model_path(AppState(work_root=tmp_path / "w3", model_roots=None), "Qwen/Qwen2.5-7B-Instruct")
