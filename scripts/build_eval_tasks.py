"""Rebuild the bundled offline evaluation tasks in plugins/eval_tasks/ from the bundled corpora.

Usage (from the repository root, with the package installed)::

    python scripts/build_eval_tasks.py            # all tasks, seed 1234
    python scripts/build_eval_tasks.py --check    # rebuild in memory, compare with the files

Every item is cut from the *held-out* part of a corpus (``subfit_plugins.datasets.split_heldout``:
every 10th chunk of 100 lines), the part calibration and scoring windows are never drawn from, so
no evaluation item was seen while compressing with ``calib.dataset=kjv`` or ``shakespeare``.

Tasks (JSON Lines, one item per line; the task YAMLs next to them are written too):

* ``subfit_kjv_cloze`` (multiple choice, 4 options): the first half of a King James verse
  (at least 12 words, cut at a word boundary near the middle); the choices are its own second
  half and the second halves of 3 other held-out verses drawn at random. 500 items.
* ``subfit_shakespeare_nextline`` (multiple choice, 4 options): three consecutive lines of one
  Shakespeare speech; the choices are the line that follows and 3 other held-out verse lines of
  similar length drawn at random. 500 items.
* ``subfit_pydocs_cloze`` and ``subfit_jargon_cloze`` (multiple choice, 4 options; modern English):
  the first half of a sentence (12 to 40 words) of a held-out paragraph of the Python
  documentation or the Jargon File; the choices are its own second half and 3 others. Up to 500 items.
* ``subfit_heldout_ppl`` (rolling log-likelihood): 20 held-out KJV passages (12 consecutive
  verses) and 20 held-out Shakespeare passages (24 consecutive lines of dialogue), interleaved.

The output is deterministic for a given seed and corpus (``random.Random(seed)``; sorted JSON keys).
"""

from __future__ import annotations

import argparse
import json
import lzma
import random
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CORPORA = ROOT / "plugins" / "corpora"
OUT_DIR = ROOT / "plugins" / "eval_tasks"
SEED = 1234
MC_ITEMS = 500
PPL_DOCS_PER_CORPUS = 20

sys.path.insert(0, str(ROOT))  # split_heldout lives in plugins/datasets.py (no heavy imports)


def heldout_units(name: str) -> list[str]:
    """Held-out lines of a bundled corpus, in order (same rule the text sources use)."""
    from plugins.datasets import DEDUP_MIN_CHARS, HELDOUT_CHUNK, HELDOUT_EVERY

    lines = lzma.decompress((CORPORA / f"{name}.txt.xz").read_bytes()).decode("utf-8").splitlines()
    # the split of plugins/datasets.py, keeping line order and marking chunk boundaries with ""
    chunk = max(1, min(HELDOUT_CHUNK, len(lines) // HELDOUT_EVERY))
    starts = range(0, len(lines), chunk)
    held = [(start // chunk) % HELDOUT_EVERY == HELDOUT_EVERY - 1 for start in starts]
    train = {line for start, h in zip(starts, held) if not h for line in lines[start:start + chunk]}
    # like split_heldout: a longer line that also occurs in train text was seen in calibration
    return [line if len(line) <= DEDUP_MIN_CHARS or line not in train else ""
            for start, h in zip(starts, held) if h for line in lines[start:start + chunk] + [""]]


def split_verse(verse: str) -> tuple[str, str]:
    words = verse.split()
    cut = len(words) // 2
    return " ".join(words[:cut]), " ".join(words[cut:])


def cloze(texts: list[str], rng: random.Random) -> list[dict]:
    """First half of a text; choices: its own second half and those of 3 other texts."""
    rng.shuffle(texts)
    halves = [split_verse(v) for v in texts]
    items = []
    for i, (first, second) in enumerate(halves[:MC_ITEMS]):
        others = rng.sample([h[1] for j, h in enumerate(halves) if j != i and h[1] != second], 3)
        label = rng.randrange(4)
        choices = others[:label] + [second] + others[label:]
        items.append({"context": first, "choices": choices, "label": label})
    return items


def kjv_cloze(rng: random.Random) -> list[dict]:
    return cloze(sorted({v for v in heldout_units("kjv") if len(v.split()) >= 12}), rng)


def sentences(paragraph: str) -> list[str]:
    """The paragraph cut after each sentence end (". ", "? ", "! ", optionally closing a quote)."""
    return [s.strip() for s in re.split(r"(?<=[.?!])[\"')]? (?=[A-Z])", paragraph) if s.strip()]


def sentence_cloze(name: str):
    """Cloze over the sentences (12 to 40 words) of a modern corpus's held-out paragraphs."""
    def make(rng: random.Random) -> list[dict]:
        sentences_ = {s for p in heldout_units(name) if p for s in sentences(p)}
        return cloze(sorted(s for s in sentences_ if 12 <= len(s.split()) <= 40), rng)
    return make


def is_verse_line(line: str) -> bool:
    """A line of dialogue: not blank, not a speaker tag ("HELENA."), not a stage direction."""
    s = line.strip()
    return (len(s) >= 20 and not s.isupper() and not s.startswith(("[", "Enter", "Exit", "Exeunt", "ACT", "SCENE"))
            and not s.endswith("]"))


def shakespeare_nextline(rng: random.Random) -> list[dict]:
    lines = heldout_units("shakespeare")
    candidates = [i for i in range(3, len(lines)) if all(is_verse_line(lines[j]) for j in range(i - 3, i + 1))]
    pool = sorted({lines[i].strip() for i in range(len(lines)) if is_verse_line(lines[i])})
    rng.shuffle(candidates)
    items = []
    for i in candidates[:MC_ITEMS]:
        target = lines[i].strip()
        similar = [p for p in pool if abs(len(p) - len(target)) <= 12 and p != target]
        others = rng.sample(similar, 3)
        label = rng.randrange(4)
        items.append({"context": "\n".join(l.strip() for l in lines[i - 3:i]),
                      "choices": others[:label] + [target] + others[label:], "label": label})
    return items


def passages(units: list[str], size: int, keep, count: int, rng: random.Random, sep: str) -> list[str]:
    """``count`` passages of ``size`` consecutive kept units, none crossing a chunk boundary."""
    runs, current = [], []
    for u in units:
        if u == "":
            current = []
            continue
        if keep(u):
            current.append(u.strip())
            if len(current) == size:
                runs.append(sep.join(current))
                current = []
    return rng.sample(runs, count)


def heldout_ppl(rng: random.Random) -> list[dict]:
    kjv = passages(heldout_units("kjv"), 12, lambda u: bool(u.strip()), PPL_DOCS_PER_CORPUS, rng, " ")
    shk = passages(heldout_units("shakespeare"), 24, is_verse_line, PPL_DOCS_PER_CORPUS, rng, "\n")
    docs = [d for pair in zip(kjv, shk) for d in pair]
    return [{"text": d, "source": "kjv" if i % 2 == 0 else "shakespeare"} for i, d in enumerate(docs)]


TASK_HEAD = """\
# Generated by scripts/build_eval_tasks.py (seed {seed}); {what}
task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {task}.jsonl        # relative to this file
# lm_eval CLI: reads the data next to this file from any working directory (SubFit itself does not
# run this function; it resolves data_files)
custom_dataset: !function subfit_data.load
test_split: test
"""

MC_YAML = TASK_HEAD + """\
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
target_delimiter: "{delim}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""

PPL_YAML = TASK_HEAD + """\
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
should_decontaminate: false
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
metadata:
  version: 1.0
"""

TASKS = {
    "subfit_kjv_cloze": (kjv_cloze, MC_YAML, " ", "KJV verse cloze, 4 choices, held-out verses"),
    "subfit_shakespeare_nextline": (shakespeare_nextline, MC_YAML, "\\n",
                                    "Shakespeare next line, 4 choices, held-out speeches"),
    "subfit_heldout_ppl": (heldout_ppl, PPL_YAML, "", "rolling perplexity, 20 KJV + 20 Shakespeare held-out passages"),
    "subfit_pydocs_cloze": (sentence_cloze("pydocs"), MC_YAML, " ",
                            "Python documentation sentence cloze, 4 choices, held-out paragraphs"),
    "subfit_jargon_cloze": (sentence_cloze("jargon"), MC_YAML, " ", "Jargon File sentence cloze, 4 choices, held-out paragraphs"),
}


def build(seed: int) -> dict[str, str]:
    files = {}
    for offset, (task, (make, template, delim, what)) in enumerate(TASKS.items()):
        items = make(random.Random(seed + offset))
        files[f"{task}.jsonl"] = "".join(json.dumps(it, sort_keys=True) + "\n" for it in items)
        files[f"{task}.yaml"] = template.format(seed=seed, task=task, what=what, delim=delim)
    return files


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--check", action="store_true", help="compare with the files instead of writing")
    args = parser.parse_args()
    files = build(args.seed)
    if args.check:
        stale = [n for n, text in files.items() if not (OUT_DIR / n).exists() or (OUT_DIR / n).read_text() != text]
        print("up to date" if not stale else f"differ: {', '.join(stale)}")
        raise SystemExit(1 if stale else 0)
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (OUT_DIR / name).write_text(text)
        print(f"{OUT_DIR / name}: {len(text.encode()):,} bytes")


if __name__ == "__main__":
    main()
