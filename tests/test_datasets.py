"""Calibration text sources: bundled corpora, local files, hub sources when offline."""

import os
import tempfile

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("HF_DATASETS_CACHE", tempfile.mkdtemp(prefix="subfit-hf-datasets-"))

import json  # noqa: E402
import lzma  # noqa: E402
import random  # noqa: E402
import re  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from subfit_plugins import datasets as ds  # noqa: E402

OFFLINE_MSG = ("calib.dataset: 'wikitext2' needs the dataset hub, which is unreachable (offline); "
               "use a bundled corpus (kjv, shakespeare, pydocs, jargon) or a local .txt/.jsonl file")


def assert_disjoint(corpus, sample=2000):
    train_lines = set(corpus.train.splitlines())
    long_heldout = [line for line in corpus.heldout.splitlines() if len(line) > 40]
    assert long_heldout
    for line in random.Random(0).sample(long_heldout, min(sample, len(long_heldout))):
        assert line not in train_lines, line


def test_kjv_bundled_text():
    raw = lzma.decompress((ds.CORPORA_DIR / "kjv.txt.xz").read_bytes()).decode("utf-8")
    assert len(raw.encode("utf-8")) > 4_000_000
    lines = raw.splitlines()
    assert len(lines) == 31102
    assert lines[0] == "In the beginning God created the heaven and the earth."
    assert lines[-1] == "The grace of our Lord Jesus Christ be with you all. Amen."
    assert not any(re.match(r"^\s*\d+ |^[1-3]? ?[A-Z][a-z]+ \d+$", line) for line in lines)  # no labels


def test_kjv_split():
    corpus = ds.kjv()
    assert corpus.name == "kjv" and "King James" in corpus.source
    assert "In the beginning God created the heaven and the earth" in corpus.train
    assert corpus.train and corpus.heldout
    n_train, n_heldout = len(corpus.train.splitlines()), len(corpus.heldout.splitlines())
    assert 0.09 < n_heldout / (n_train + n_heldout) < 0.11
    assert_disjoint(corpus)
    assert ds.kjv() is corpus  # cached


def test_shakespeare_split():
    corpus = ds.shakespeare()
    assert "To be, or not to be" in corpus.train + corpus.heldout
    n_train, n_heldout = len(corpus.train.splitlines()), len(corpus.heldout.splitlines())
    assert 0.09 < n_heldout / (n_train + n_heldout) < 0.11
    assert_disjoint(corpus)


@pytest.mark.parametrize("name, phrase", [
    ("pydocs", "Python"),
    ("jargon", "hacker"),
])
def test_modern_corpora_split(name, phrase):
    corpus = getattr(ds, name)()
    assert corpus.name == name and phrase in corpus.train
    lines = corpus.train.splitlines() + corpus.heldout.splitlines()
    assert len(lines) > 3000
    assert all(len(line.split()) >= 12 for line in lines)  # prose paragraphs only
    assert not any(re.search(r":[a-z]+:`|``|\{|\}", line) for line in lines)  # markup removed
    n_heldout = len(corpus.heldout.splitlines())
    assert 0.08 < n_heldout / len(lines) < 0.11  # every 10th chunk of 100: 3 of 36 chunks for jargon
    assert_disjoint(corpus)


def test_every_default_domain_is_bundled():
    from subfit_core.plugins import get_plugins

    plugins = get_plugins()
    assert plugins.default_domains() == ["kjv", "shakespeare", "pydocs", "jargon"]
    for name in plugins.default_domains():
        assert (ds.CORPORA_DIR / f"{name}.txt.xz").exists()


def test_bundled_size_budget():
    # four corpora (two early-modern, two modern) for calibration and cross-domain evaluation
    sizes = [p.stat().st_size for p in ds.CORPORA_DIR.glob("*.xz")]
    assert sum(sizes) < 4_000_000


def test_split_rule_is_chunks_of_100():
    units = [f"line {i:05d} " + "x" * 50 for i in range(2000)]
    train, heldout = ds.split_heldout(units, "\n")
    assert heldout.splitlines() == units[900:1000] + units[1900:2000]
    assert train.splitlines() == units[:900] + units[1000:1900]


def test_split_drops_long_duplicates_from_heldout():
    repeated = "a repeated line that is clearly longer than forty characters"
    units = [repeated] + [f"unit {i}" for i in range(1, 18)] + [repeated, "short"]
    train, heldout = ds.split_heldout(units, "\n")  # 20 units: chunks of 2, units 18-19 held out
    assert heldout == "short"
    assert train.splitlines() == units[:18]


def test_local_txt(tmp_path):
    path = tmp_path / "calib.txt"
    lines = [f"Sentence number {i} of the local calibration file." for i in range(1200)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    corpus = ds.local_file(str(path))
    assert corpus.name == str(path) and corpus.source == f"local file {path}"
    assert corpus.heldout.splitlines() == lines[900:1000]
    assert corpus.train.splitlines() == lines[:900] + lines[1000:]


def test_local_small_txt_still_holds_out(tmp_path):
    path = tmp_path / "small.txt"
    path.write_text("\n".join(f"line {i}" for i in range(30)), encoding="utf-8")
    corpus = ds.local_file(str(path))
    assert corpus.heldout.splitlines() == ["line 27", "line 28", "line 29"]
    assert len(corpus.train.splitlines()) == 27


def test_local_jsonl(tmp_path):
    path = tmp_path / "calib.jsonl"
    docs = [f"Document {i}.\nIt has two lines." for i in range(40)]
    path.write_text("".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(docs)))
    corpus = ds.local_file(str(path))
    assert corpus.train == "\n\n".join(docs[:36])
    assert corpus.heldout == "\n\n".join(docs[36:])


def test_local_jsonl_custom_field(tmp_path):
    path = tmp_path / "calib.json"
    path.write_text(json.dumps([{"body": f"Body text {i}"} for i in range(20)]))
    corpus = ds.local_file(str(path), text_field="body")
    assert corpus.heldout == "Body text 18\n\nBody text 19"


def test_bad_extension(tmp_path):
    path = tmp_path / "x.csv"
    path.write_text("text\nhello\n")
    with pytest.raises(ValueError) as err:
        ds.local_file(str(path))
    assert str(err.value) == (f"calib.dataset: file '{path}' has extension '.csv'; "
                              "allowed: .txt, .json, .jsonl")


def test_missing_file(tmp_path):
    with pytest.raises(ValueError, match=r"^calib\.dataset: file '.*nope\.txt' not found"):
        ds.local_file(str(tmp_path / "nope.txt"))


def test_missing_text_field(tmp_path):
    path = tmp_path / "calib.jsonl"
    path.write_text("".join(json.dumps({"content": "hi", "id": i}) + "\n" for i in range(20)))
    with pytest.raises(ValueError) as err:
        ds.local_file(str(path))
    assert str(err.value) == (f"calib.dataset: file '{path}' has no field 'text'; "
                              "available: content, id")


@pytest.mark.parametrize("content, match", [
    ("", "is empty"),
    ('{"text": "a"}\n{"text": ', "could not be read as JSON"),
    ('{"text": 1}\n' * 20, "non-string values"),
])
def test_bad_jsonl(tmp_path, content, match):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(ValueError, match=match) as err:
        ds.local_file(str(path))
    assert "\n" not in str(err.value)


def test_too_few_units(tmp_path):
    path = tmp_path / "tiny.txt"
    path.write_text("one\ntwo\n")
    with pytest.raises(ValueError, match="has 2 text units"):
        ds.local_file(str(path))


@pytest.fixture
def hub_offline(monkeypatch):
    """Force offline mode even if `datasets` was imported before this module set the env."""
    import datasets
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def test_wikitext2_offline(hub_offline):
    with pytest.raises(ValueError) as err:
        ds.wikitext2()
    assert str(err.value) == OFFLINE_MSG


def test_c4_offline(hub_offline):
    with pytest.raises(ValueError, match=r"^calib\.dataset: 'c4' needs the dataset hub"):
        ds.c4()


def _word_tokenizer(adds_bos: bool):
    """A whitespace word tokenizer; with ``adds_bos`` it puts <bos> before every text by default."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<bos>": 0, "<unk>": 1, **{w: i + 2 for i, w in enumerate("a b c d e f g h".split())}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if adds_bos:
        tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", unk_token="<unk>")


@pytest.mark.parametrize("adds_bos", [True, False])
def test_windows_begin_as_the_tokenizer_begins_a_text(adds_bos):
    # Gemma without its BOS has ~3.5x the perplexity: windows cut from a corpus must begin with the
    # token every tool puts first, or calibration and evaluation see inputs no user sends
    from subfit_core.engine.corpus import CorpusText, make_windows, prefix_token

    tokenizer = _word_tokenizer(adds_bos)
    assert prefix_token(tokenizer) == (0 if adds_bos else None)
    text = " ".join("abcdefgh"[i % 7] for i in range(400))
    corpus = CorpusText("letters", train=text, heldout=text, source="test")
    w = make_windows(corpus, tokenizer, calib_samples=4, scoring_samples=2, seq_len=8, heldout=corpus,
                     eval_windows=3, eval_seq_len=6, seed=0)
    assert w.calib.shape == (4, 8) and w.heldout.shape == (3, 6)
    for windows in (w.calib, w.scoring, w.heldout):
        assert bool((windows[:, 0] == 0).all()) == adds_bos
        assert not bool((windows[:, 1:] == 0).any())  # the prefix is never text
    body = w.heldout[:, 1:] if adds_bos else w.heldout
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids[0]
    assert torch.equal(body.flatten(), ids[: body.numel()])  # consecutive text, nothing skipped or repeated
