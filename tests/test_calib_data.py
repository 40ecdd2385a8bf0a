"""Calibration windows: local files, the named datasets offline (data dir and HF hub cache), LMDeploy's
sampling, the built-in corpus, data-free 'self', and every error users can hit."""

import gzip
import json
import random
import warnings

import datasets
import huggingface_hub
import pandas as pd
import pytest
import torch
from conftest import make_tiny_llama
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from calib import data
from calib.data import BUILTIN_CORPUS, VALID_DATASETS, check_dataset, load_calib_windows
from calib.errors import CalibCancelled, CalibDataError

VOCAB = 200


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tok():
    """One token per whitespace word: "w5" is id 6, anything else is [UNK] (0)."""
    vocab = {"[UNK]": 0, **{f"w{i}": i + 1 for i in range(VOCAB - 1)}}
    t = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    t.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=t, unk_token="[UNK]")


@pytest.fixture(autouse=True)
def offline_caches(tmp_path, monkeypatch):
    """Empty HF hub cache and a private datasets cache: nothing outside tmp_path is read or written."""
    hub = tmp_path / "hub"
    hub.mkdir()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets-cache")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    return hub


def words(n, start=0):
    return " ".join(f"w{(start + i) % (VOCAB - 1)}" for i in range(n))


def ids_of(n, start=0):
    return torch.tensor([(start + i) % (VOCAB - 1) + 1 for i in range(n)])


def is_slice_of(window, stream):
    s = stream.tolist()
    w = window.tolist()
    return any(s[i : i + len(w)] == w for i in range(len(s) - len(w) + 1))


def one_line(err, *needles):
    msg = str(err.value)
    assert "\n" not in msg, msg
    for n in needles:
        assert n in msg, msg


# --- local files ----------------------------------------------------------------------------------


@pytest.mark.parametrize("ext", [".txt", ".jsonl", ".json", ".parquet"])
def test_local_file_gives_seeded_random_windows(tmp_path, tok, ext):
    path = tmp_path / f"corpus{ext}"
    docs = [words(50, 0), words(50, 50), words(50, 100)]
    if ext == ".txt":
        path.write_text("\n\n".join(docs))
    elif ext in (".jsonl", ".json"):
        path.write_text("\n".join(json.dumps({"text": d, "id": i}) for i, d in enumerate(docs)))
    else:
        pd.DataFrame({"text": docs}).to_parquet(path)
    w = load_calib_windows(str(path), tok, samples=6, seqlen=20, seed=3)
    assert w.shape == (6, 20) and w.dtype == torch.long
    stream = ids_of(150)
    assert all(is_slice_of(row, stream) for row in w)
    assert torch.equal(w, load_calib_windows(str(path), tok, samples=6, seqlen=20, seed=3))
    assert not torch.equal(w, load_calib_windows(str(path), tok, samples=6, seqlen=20, seed=4))


def test_local_windows_follow_lmdeploy_randint(tmp_path, tok):
    path = tmp_path / "c.txt"
    path.write_text(words(100))
    w = load_calib_windows(str(path), tok, samples=4, seqlen=10, seed=7)
    random.seed(7)
    starts = [random.randint(0, 100 - 10) for _ in range(4)]
    assert torch.equal(w, torch.stack([ids_of(100)[s : s + 10] for s in starts]))


def test_empty_file(tmp_path, tok):
    (tmp_path / "e.txt").write_text("")
    with pytest.raises(CalibDataError) as err:
        load_calib_windows(str(tmp_path / "e.txt"), tok, 1, 8)
    one_line(err, "e.txt", "empty")


def test_too_few_tokens_says_how_many(tmp_path, tok):
    (tmp_path / "short.txt").write_text(words(10))
    with pytest.raises(CalibDataError) as err:
        load_calib_windows(str(tmp_path / "short.txt"), tok, 2, 16)
    one_line(err, "only 10 tokens", "needs 16", "--calib-seqlen 10")


def test_seqlen_beyond_model_max_positions(tmp_path, tok):
    (tmp_path / "c.txt").write_text(words(10))
    model = make_tiny_llama(vocab=VOCAB)  # max_position_embeddings 1024
    with pytest.raises(CalibDataError) as err:
        load_calib_windows(str(tmp_path / "c.txt"), tok, 1, 2048, model=model)
    one_line(err, "2048", "max positions (1024)")


def test_unknown_dataset_lists_the_valid_ones(tok):
    with pytest.raises(CalibDataError) as err:
        load_calib_windows("wikitext103", tok, 1, 8)
    one_line(err, "wikitext103", *VALID_DATASETS)


def test_unsupported_extension(tmp_path, tok):
    (tmp_path / "data.csv").write_text("text\nhello\n")
    with pytest.raises(CalibDataError) as err:
        load_calib_windows(str(tmp_path / "data.csv"), tok, 1, 8)
    one_line(err, ".csv", ".txt", ".jsonl", ".parquet")


def test_missing_file_and_missing_text_field(tmp_path, tok):
    with pytest.raises(CalibDataError, match="not found"):
        load_calib_windows(str(tmp_path / "nope.jsonl"), tok, 1, 8)
    (tmp_path / "notext.jsonl").write_text(json.dumps({"content": "w1 w2"}) + "\n")
    with pytest.raises(CalibDataError) as err:
        load_calib_windows(str(tmp_path / "notext.jsonl"), tok, 1, 1)
    one_line(err, "no 'text' field", "content")
    (tmp_path / "numbers.jsonl").write_text(json.dumps({"text": 5}) + "\n" + json.dumps({"text": 7}) + "\n")
    with pytest.raises(CalibDataError) as err:
        load_calib_windows(str(tmp_path / "numbers.jsonl"), tok, 1, 1)
    one_line(err, "numbers.jsonl", "the 'text' field holds int64, not text")


# --- named datasets, offline ----------------------------------------------------------------------


def test_missing_c4_says_which_file_goes_where(tok, offline_caches):
    with pytest.raises(CalibDataError) as err:
        load_calib_windows("c4", tok, 4, 16)
    one_line(err, "c4-train.00000-of-01024.json.gz", "--calib-data-dir DIR", str(offline_caches),
             "hf download allenai/c4 en/c4-train.00000-of-01024.json.gz --repo-type dataset")


def test_missing_c4_in_the_given_data_dir(tmp_path, tok):
    d = tmp_path / "calib-data"
    d.mkdir()
    with pytest.raises(CalibDataError) as err:
        load_calib_windows("c4", tok, 4, 16, data_dir=d)
    one_line(err, str(d / "c4-train.00000-of-01024.json.gz"))


def test_datasets_own_cache_is_asked_only_when_offline(tok, monkeypatch):
    calls = []

    def fake_load_dataset(path, name=None, split=None, **kwargs):
        calls.append((path, name, split, kwargs))
        if path == "allenai/c4":
            return datasets.Dataset.from_dict({"text": [words(40)] * 3})
        raise FileNotFoundError(path)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    with pytest.raises(CalibDataError):
        load_calib_windows("c4", tok, 1, 8)
    assert calls == []  # online, load_dataset could reach the network: never asked
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # as HF_DATASETS_OFFLINE=1 sets it
    assert load_calib_windows("c4", tok, 2, 8).shape == (2, 8)
    assert calls == [("allenai/c4", None, "train", {"data_files": {"train": "en/c4-train.00000-of-01024.json.gz"}})]


def test_data_dir_that_is_not_a_folder(tmp_path, tok):
    with pytest.raises(CalibDataError) as err:
        load_calib_windows("ptb", tok, 1, 8, data_dir=tmp_path / "missing")
    one_line(err, "is not a folder", "ptb.train.txt")


def _c4_docs():
    rng = random.Random(0)
    return [words(rng.choice([5, 8, 40, 60]), start=10 * i) for i in range(30)]


def _write_c4(path, docs):
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt") as f:
        for d in docs:
            f.write(json.dumps({"text": d, "timestamp": "2019", "url": "x"}) + "\n")


def _lmdeploy_c4(docs, tok, samples, seqlen, seed):
    """LMDeploy's get_c4 sampling loop, verbatim in substance."""
    random.seed(seed)
    out = []
    for _ in range(samples):
        while True:
            i = random.randint(0, len(docs) - 1)
            enc = tok(docs[i], return_tensors="pt").input_ids
            if enc.shape[1] >= seqlen:
                break
        i = random.randint(0, enc.shape[1] - seqlen)
        out.append(enc[0, i : i + seqlen])
    return torch.stack(out)


def test_c4_from_data_dir_samples_like_lmdeploy(tmp_path, tok):
    docs = _c4_docs()
    _write_c4(tmp_path / "d" / "c4-train.00000-of-01024.json.gz", docs)
    w = load_calib_windows("c4", tok, 6, 32, seed=5, data_dir=tmp_path / "d")
    assert torch.equal(w, _lmdeploy_c4(docs, tok, 6, 32, 5))


def test_c4_from_the_hf_hub_cache(tok, offline_caches):
    docs = _c4_docs()
    repo = offline_caches / "datasets--allenai--c4"
    sha = "a" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(sha)
    _write_c4(repo / "snapshots" / sha / "en" / "c4-train.00000-of-01024.json.gz", docs)
    w = load_calib_windows("c4", tok, 3, 32, seed=0)
    assert torch.equal(w, _lmdeploy_c4(docs, tok, 3, 32, 0))


def test_c4_with_no_long_document_stops(tmp_path, tok):
    _write_c4(tmp_path / "c4-train.00000-of-01024.json.gz", [words(5)] * 4)
    with pytest.raises(CalibDataError) as err:
        load_calib_windows("c4", tok, 1, 32, data_dir=tmp_path)
    one_line(err, "no c4 document has 32 tokens")


def test_wikitext2_parquet_and_ptb_txt_from_data_dir(tmp_path, tok):
    lines = [words(7, 7 * i) for i in range(20)]
    (tmp_path / "wikitext-2-raw-v1").mkdir()
    pd.DataFrame({"text": lines}).to_parquet(tmp_path / "wikitext-2-raw-v1" / "train-00000-of-00001.parquet")
    (tmp_path / "ptb.train.txt").write_text("\n".join(" " + line for line in lines) + "\n")
    stream = ids_of(140)
    for name in ("wikitext2", "ptb"):
        w = load_calib_windows(name, tok, 5, 30, seed=1, data_dir=tmp_path)
        assert w.shape == (5, 30) and all(is_slice_of(row, stream) for row in w), name
        random.seed(1)
        starts = [random.randint(0, 140 - 30) for _ in range(5)]
        assert torch.equal(w, torch.stack([stream[s : s + 30] for s in starts])), name


def test_pileval_concatenates_short_documents(tmp_path, tok):
    docs = [words(6, 6 * i) for i in range(20)] + [words(600)]  # the long one is skipped, as in LMDeploy
    (tmp_path / "val.jsonl").write_text("\n".join(json.dumps({"text": d, "meta": {}}) for d in docs))
    w = load_calib_windows("pileval", tok, 3, 10, data_dir=tmp_path)
    assert w.shape == (3, 10)
    assert torch.equal(w, load_calib_windows("pileval", tok, 3, 10, data_dir=tmp_path))
    with pytest.raises(CalibDataError) as err:
        load_calib_windows("pileval", tok, 100, 10, data_dir=tmp_path)
    one_line(err, "120 tokens", "1000 are needed")


def test_pileval_reads_the_hubs_compressed_file(tmp_path, tok):
    """mit-han-lab/pile-val-backup ships val.jsonl.zst: it is read as it is, no decompressing by hand."""
    import zstandard

    docs = [words(6, 6 * i) for i in range(20)]
    plain = "\n".join(json.dumps({"text": d, "meta": {}}) for d in docs).encode()
    (tmp_path / "zst").mkdir()
    (tmp_path / "zst" / "val.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(plain))
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "val.jsonl").write_bytes(plain)
    got = load_calib_windows("pileval", tok, 3, 10, data_dir=tmp_path / "zst")
    assert torch.equal(got, load_calib_windows("pileval", tok, 3, 10, data_dir=tmp_path / "plain"))


def test_named_datasets_all_say_where_their_file_goes(tok):
    for name in ("wikitext2", "ptb", "pileval"):
        with pytest.raises(CalibDataError) as err:
            load_calib_windows(name, tok, 1, 8)
        one_line(err, data.SOURCES[name].local_names[0], "--calib-data-dir", "hf download")


# --- builtin, self --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def default_tokenizer(loaded_default):
    return loaded_default.tokenizer


def test_builtin_has_64_windows_of_512_with_the_default_tokenizer(default_tokenizer):
    assert BUILTIN_CORPUS.is_file(), BUILTIN_CORPUS
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no reuse warning: the corpus holds 64 disjoint windows
        w = load_calib_windows("builtin", default_tokenizer, 64, 512)
    assert w.shape == (64, 512)
    assert len({tuple(row.tolist()) for row in w}) == 64


def test_builtin_reuses_windows_with_a_warning(tok, monkeypatch, tmp_path):
    corpus = tmp_path / "builtin_corpus.jsonl"
    corpus.write_text("\n".join(json.dumps({"text": words(25, 25 * i)}) for i in range(4)))  # 100 tokens
    monkeypatch.setattr(data, "BUILTIN_CORPUS", corpus)
    with pytest.warns(UserWarning, match="enough for 5 windows of 20 without overlap; 8 were asked"):
        w = load_calib_windows("builtin", tok, 8, 20)
    assert w.shape == (8, 20) and len({tuple(r.tolist()) for r in w}) == 5


@pytest.fixture
def chat_tok():
    """The word tokenizer plus an end-of-sequence token and a minimal chat template."""
    vocab = {"[UNK]": 0, **{f"w{i}": i + 1 for i in range(VOCAB - 1)}, "</s>": VOCAB}
    t = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    t.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    hf = PreTrainedTokenizerFast(tokenizer_object=t, unk_token="[UNK]", eos_token="</s>")
    hf.chat_template = "{% for m in messages %}user: {{ m['content'] }} assistant:{% endfor %}"
    return hf


def test_self_generates_seeded_text(chat_tok):
    model = make_tiny_llama(num_layers=1, num_heads=2, num_kv_heads=1, head_dim=8, vocab=VOCAB + 1)
    seen = []
    w = load_calib_windows("self", chat_tok, 2, 16, seed=1, model=model, progress=lambda f, m: seen.append(f))
    assert w.shape == (2, 16) and seen and seen[-1] == 1.0
    assert torch.equal(w, load_calib_windows("self", chat_tok, 2, 16, seed=1, model=model))
    assert not torch.equal(w, load_calib_windows("self", chat_tok, 2, 16, seed=2, model=model))
    with pytest.raises(CalibCancelled):
        load_calib_windows("self", chat_tok, 2, 16, model=model, progress=lambda f, m: False)
    with pytest.raises(CalibDataError, match="needs the model"):
        load_calib_windows("self", chat_tok, 2, 16)


def test_self_is_written_through_the_engines_scheduler(chat_tok, monkeypatch):
    """Every answer is a request of kvcache's BatchScheduler; several are decoded together; nothing global moves."""
    from calib.data import self_written
    from kvcache.engine.scheduler import BatchScheduler

    batches = []

    class Watched(BatchScheduler):
        def step(self):
            out = super().step()
            batches.append(len(out))
            return out

    monkeypatch.setattr(self_written, "BatchScheduler", Watched)
    monkeypatch.setattr(self_written, "MAX_ANSWER_TOKENS", 16)  # several answers for 4 x 16 tokens
    model = make_tiny_llama(num_layers=1, num_heads=2, num_kv_heads=1, head_dim=8, vocab=VOCAB + 1)
    rng_before = torch.random.get_rng_state()
    w = load_calib_windows("self", chat_tok, 4, 16, seed=3, model=model)
    assert torch.equal(torch.random.get_rng_state(), rng_before)  # each answer has its own generator
    assert w.shape == (4, 16) and batches and max(batches) > 1
    assert torch.equal(w, load_calib_windows("self", chat_tok, 4, 16, seed=3, model=model))


def test_self_with_another_attention_gets_its_own_back(chat_tok):
    model = make_tiny_llama(num_layers=1, num_heads=2, num_kv_heads=1, head_dim=8, vocab=VOCAB + 1)
    model.set_attn_implementation("sdpa")
    assert load_calib_windows("self", chat_tok, 1, 16, model=model).shape == (1, 16)
    assert model.config._attn_implementation == "sdpa"


# --- one rule for data files, and the checks that need no model ------------------------------------------


@pytest.mark.parametrize("name", ["corpus.jsonl.gz", "corpus.raw", "corpus.JSON"])
def test_a_local_file_takes_every_type_a_named_dataset_file_takes(tmp_path, tok, name):
    path = tmp_path / name
    docs = [words(30, 0), words(30, 30)]
    if name.endswith(".gz"):
        with gzip.open(path, "wt") as f:
            f.write("\n".join(json.dumps({"text": d}) for d in docs))
    elif name.endswith(".raw"):
        path.write_text("\n\n".join(docs))
    else:
        path.write_text("\n".join(json.dumps({"text": d}) for d in docs))
    w = load_calib_windows(str(path), tok, samples=3, seqlen=10, seed=0)
    assert w.shape == (3, 10) and all(is_slice_of(row, ids_of(60)) for row in w)


def test_check_dataset_needs_no_model(tmp_path, offline_caches):
    for ok in ("builtin", "self", "SELF"):
        check_dataset(ok)
    (tmp_path / "c.txt").write_text("w1 w2")
    check_dataset(str(tmp_path / "c.txt"))
    (tmp_path / "c4-train.00000-of-01024.json.gz").write_bytes(b"")  # found is enough: it is read later
    check_dataset("c4", tmp_path)
    cases = [(("wikitext103",), "unknown calibration dataset"), (("c4",), "c4 is not available offline"),
             ((str(tmp_path / "nope.txt"),), "not found"), (("ptb", tmp_path / "missing"), "is not a folder"),
             ((str(tmp_path),), "is a folder")]
    (tmp_path / "data.csv").write_text("text\nhello\n")
    cases.append(((str(tmp_path / "data.csv"),), "unsupported calibration file type .csv"))
    for args, needle in cases:
        with pytest.raises(CalibDataError, match=needle):
            check_dataset(*args)
