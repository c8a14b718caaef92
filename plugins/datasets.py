"""Text sources for calibration and evaluation.

Every source returns a :class:`CorpusText`: ``train`` (calibration and scoring windows
are drawn from it) and ``heldout`` (used only for reported perplexity).

* ``kjv()``, ``shakespeare()`` (early-modern English), ``pydocs()`` and ``jargon()`` (modern
  English: technical documentation, and a hacker-culture lexicon) read text bundled, xz-compressed, in
  ``corpora/`` (provenance in ``corpora/SOURCES.md``); they work offline.
* ``local_file(path)`` reads a user's ``.txt`` (units are lines) or ``.json``/``.jsonl``
  (units are the ``text_field`` of each record, read through the ``datasets`` library).
* ``wikitext2()`` and ``c4()`` download from the dataset hub and use its own splits.

For bundled and local text the held-out split is deterministic: the units are grouped
into chunks of 100, chunk ``i`` with ``i % 10 == 9`` is held out and the rest is train.
Files with fewer than 1,000 units use smaller chunks (``units // 10``) so that about a
tenth is still held out. A held-out unit longer than 40 characters that also occurs
verbatim in train (a repeated verse, a duplicated document) is dropped from held-out, so
no held-out text was seen during calibration.

The engine resolves ``calib.dataset``: a registered name, else a path given to ``local_file``.
User errors are ``ValueError`` with a one-line ``calib.dataset: ...`` message.
"""

from __future__ import annotations

import functools
import lzma
import os
from pathlib import Path

from subfit_core.engine.corpus import DEDUP_MIN_CHARS, HELDOUT_CHUNK, HELDOUT_EVERY, CorpusText, split_heldout  # noqa: F401

CORPORA_DIR = Path(__file__).resolve().parent / "corpora"
FILE_SUFFIXES = (".txt", ".json", ".jsonl")
C4_TRAIN_DOCS = 20000
C4_HELDOUT_DOCS = 2000
_USE_INSTEAD = "use a bundled corpus (kjv, shakespeare, pydocs, jargon) or a local .txt/.jsonl file"


def _bundled(name: str, source: str) -> CorpusText:
    text = lzma.decompress((CORPORA_DIR / f"{name}.txt.xz").read_bytes()).decode("utf-8")
    train, heldout = split_heldout(text.splitlines(), "\n")
    return CorpusText(name=name, train=train, heldout=heldout, source=source)


@functools.cache
def kjv() -> CorpusText:
    """King James Bible, one verse per line (31,102 verses)."""
    return _bundled("kjv", "King James Bible (public domain), bundled")


@functools.cache
def shakespeare() -> CorpusText:
    """42 Shakespeare plays and poems (Project Gutenberg editions)."""
    return _bundled("shakespeare", "Shakespeare, 42 works from Project Gutenberg (public domain), bundled")


@functools.cache
def pydocs() -> CorpusText:
    """Modern technical English: prose paragraphs of the Python 3.11 documentation (6,103)."""
    return _bundled("pydocs", "Python 3.11 documentation prose (PSF License), bundled")


@functools.cache
def jargon() -> CorpusText:
    """Modern informal English: paragraphs of the Jargon File 4.4.7 (3,573)."""
    return _bundled("jargon", "The Jargon File 4.4.7 (public domain), bundled")


def local_file(path: str, text_field: str = "text") -> CorpusText:
    """A user's .txt (split by lines) or .json/.jsonl (split by records' ``text_field``)."""
    file = Path(path).expanduser()
    suffix = file.suffix.lower()
    if suffix not in FILE_SUFFIXES:
        has = f"extension '{file.suffix}'" if file.suffix else "no extension"
        raise ValueError(f"calib.dataset: file '{path}' has {has}; allowed: {', '.join(FILE_SUFFIXES)}")
    if not file.is_file():
        raise ValueError(f"calib.dataset: file '{path}' not found (expected an existing "
                         f"{', '.join(FILE_SUFFIXES)} file, or a registered name: see subfit-plugins)")
    if suffix == ".txt":
        units, sep = _txt_lines(file, path), "\n"
    else:
        units, sep = _json_documents(file, path, text_field), "\n\n"
    if len(units) < HELDOUT_EVERY:
        raise ValueError(f"calib.dataset: file '{path}' has {len(units)} text units (lines or "
                         f"records); at least {HELDOUT_EVERY} are needed to hold out text")
    train, heldout = split_heldout(units, sep)
    return CorpusText(name=path, train=train, heldout=heldout, source=f"local file {path}")


def _txt_lines(file: Path, path: str) -> list[str]:
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"calib.dataset: file '{path}' is not UTF-8 text ({exc.reason} "
                         f"at byte {exc.start})") from None
    if not text.strip():
        raise ValueError(f"calib.dataset: file '{path}' is empty")
    return text.splitlines()


def _json_documents(file: Path, path: str, text_field: str) -> list[str]:
    import datasets

    if not file.read_bytes().strip():  # the json builder fails obscurely on empty files
        raise ValueError(f"calib.dataset: file '{path}' is empty")
    try:
        records = datasets.load_dataset("json", data_files=str(file), split="train")
    except datasets.exceptions.DatasetsError as exc:
        raise ValueError(f"calib.dataset: file '{path}' could not be read as JSON or JSON "
                         f"Lines ({type(exc).__name__}); expected one object per line with a "
                         f"'{text_field}' string field") from exc
    if text_field not in records.column_names:
        raise ValueError(f"calib.dataset: file '{path}' has no field '{text_field}'; "
                         f"available: {', '.join(records.column_names)}")
    values = list(records[text_field])
    if any(v is not None and not isinstance(v, str) for v in values):
        raise ValueError(f"calib.dataset: field '{text_field}' of file '{path}' holds "
                         f"non-string values; it must be text")
    return [v for v in values if v and v.strip()]


def _hub_offline() -> bool:
    import datasets

    flags = (os.environ.get("HF_HUB_OFFLINE", ""), os.environ.get("HF_DATASETS_OFFLINE", ""))
    return bool(datasets.config.HF_HUB_OFFLINE) or any(f.upper() in ("1", "ON", "YES", "TRUE") for f in flags)


def _from_hub(name: str, *args, **kwargs):
    """``datasets.load_dataset(*args, **kwargs)``; an unreachable hub becomes a ValueError."""
    import datasets

    try:
        return datasets.load_dataset(*args, **kwargs)
    except ConnectionError as exc:
        reason = "offline" if _hub_offline() else "no connection"
        raise ValueError(f"calib.dataset: '{name}' needs the dataset hub, which is "
                         f"unreachable ({reason}); {_USE_INSTEAD}") from exc


def wikitext2() -> CorpusText:
    """WikiText-2 (raw): train split -> train, test split -> held-out, joined by blank lines."""
    splits = _from_hub("wikitext2", "wikitext", "wikitext-2-raw-v1")
    return CorpusText(
        name="wikitext2",
        train="\n\n".join(splits["train"][:]["text"]),
        heldout="\n\n".join(splits["test"][:]["text"]),
        source="WikiText-2 raw v1 (CC BY-SA), dataset hub 'wikitext'",
    )


def c4() -> CorpusText:
    """C4 English: first 20,000 documents of train shard 0, first 2,000 of validation shard 0."""
    splits = _from_hub("c4", "allenai/c4", data_files={
        "train": "en/c4-train.00000-of-01024.json.gz",
        "validation": "en/c4-validation.00000-of-00008.json.gz",
    })
    return CorpusText(
        name="c4",
        train="\n\n".join(splits["train"][:C4_TRAIN_DOCS]["text"]),
        heldout="\n\n".join(splits["validation"][:C4_HELDOUT_DOCS]["text"]),
        source=f"C4 en (ODC-BY), dataset hub 'allenai/c4': first {C4_TRAIN_DOCS} train "
               f"and {C4_HELDOUT_DOCS} validation documents of shard 0",
    )
