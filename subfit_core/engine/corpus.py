"""Token windows for calibration, scoring and held-out perplexity, cut from a text source."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from subfit_core.errors import SubFitError

# The held-out split of a text given as units (lines, documents): chunks of HELDOUT_CHUNK units,
# every HELDOUT_EVERY-th chunk held out; a longer held-out unit also found in train is dropped.
HELDOUT_CHUNK = 100
HELDOUT_EVERY = 10
DEDUP_MIN_CHARS = 40


def split_heldout(units: list[str], sep: str) -> tuple[str, str]:
    """Deterministic train/held-out split of ``units`` (lines or documents), joined by ``sep``."""
    chunk = max(1, min(HELDOUT_CHUNK, len(units) // HELDOUT_EVERY))
    train: list[str] = []
    heldout: list[str] = []
    for start in range(0, len(units), chunk):
        is_heldout = (start // chunk) % HELDOUT_EVERY == HELDOUT_EVERY - 1
        (heldout if is_heldout else train).extend(units[start:start + chunk])
    seen = set(train)
    heldout = [u for u in heldout if len(u) <= DEDUP_MIN_CHARS or u not in seen]
    return sep.join(train), sep.join(heldout)



@dataclass(frozen=True)
class CorpusText:
    name: str  # registered name or path
    train: str  # calibration and scoring windows are drawn from here
    heldout: str  # used only for reported perplexity; never overlaps train
    source: str  # one-line provenance


@dataclass
class Windows:
    calib: torch.Tensor  # (samples, seq_len) token ids
    scoring: torch.Tensor  # disjoint from calib
    heldout: torch.Tensor  # from the held-out text only
    source: str
    heldout_source: str = ""
    # Sweeps only: windows for choosing between recipes, disjoint from calib, scoring and heldout,
    # so the reported (held-out) number is never the one that was optimised.
    validation: torch.Tensor | None = None


def tokenize(tokenizer, text: str, max_tokens: int | None = None) -> torch.Tensor:
    # Tokenise in slices of lines so a multi-megabyte corpus never becomes one giant call.
    ids: list[int] = []
    lines = text.splitlines(keepends=True)
    step = 2000
    for start in range(0, len(lines), step):
        ids.extend(tokenizer("".join(lines[start:start + step]), add_special_tokens=False)["input_ids"])
        if max_tokens is not None and len(ids) >= max_tokens:
            break
    return torch.tensor(ids, dtype=torch.long)


def prefix_token(tokenizer) -> int | None:
    """The token the tokenizer puts before every text by default (a BOS), or None if it adds none.
    Some models are only in distribution after it (Gemma without its BOS has about 3.5x the
    perplexity), and every tool that runs them (generate, lm-eval, a serving stack) adds it; so each
    window begins with it, as a real input does."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a")["input_ids"]
    bos = tokenizer.bos_token_id
    if bos is not None and len(full) > len(plain) and full[0] == bos:
        return int(bos)
    return None


def cut(ids: torch.Tensor, seq_len: int, prefix: int | None = None) -> torch.Tensor:
    """Consecutive windows of ``seq_len`` tokens; with ``prefix``, each is that token and then
    ``seq_len - 1`` tokens of text (the prefix is context, never a predicted token)."""
    if prefix is None:
        n = ids.numel() // seq_len
        return ids[: n * seq_len].view(n, seq_len)
    n = ids.numel() // (seq_len - 1)
    body = ids[: n * (seq_len - 1)].view(n, seq_len - 1)
    return torch.cat([torch.full((n, 1), prefix, dtype=ids.dtype), body], dim=1)


def heldout_windows(corpus: CorpusText, tokenizer, windows: int, seq_len: int) -> torch.Tensor:
    """The first ``windows`` windows of ``corpus``'s held-out text: fixed and seed-independent, so
    every run is measured on the same reference."""
    held = cut(tokenize(tokenizer, corpus.heldout, windows * seq_len), seq_len, prefix_token(tokenizer))
    if held.shape[0] < windows:
        raise SubFitError(
            f"eval.windows: the held-out part of {corpus.name} gives {held.shape[0]} windows of "
            f"{seq_len} tokens; {windows} requested")
    return held[:windows]


def make_windows(corpus: CorpusText, tokenizer, *, calib_samples: int, scoring_samples: int, seq_len: int,
                 heldout: CorpusText, eval_windows: int, eval_seq_len: int, seed: int,
                 validation_samples: int = 0) -> Windows:
    train = cut(tokenize(tokenizer, corpus.train), seq_len, prefix_token(tokenizer))
    need = calib_samples + scoring_samples
    if train.shape[0] < need + validation_samples:
        extra = f" + sweep.validation_windows = {need + validation_samples}" if validation_samples else f" = {need}"
        raise SubFitError(
            f"calib.samples: {corpus.name} gives {train.shape[0]} windows of {seq_len} tokens; "
            f"calib.samples + scoring.samples{extra} is more than that")
    order = torch.randperm(train.shape[0], generator=torch.Generator().manual_seed(seed))
    return Windows(
        calib=train[order[:calib_samples]],
        scoring=train[order[calib_samples:need]],
        heldout=heldout_windows(heldout, tokenizer, eval_windows, eval_seq_len),
        source=corpus.source,
        heldout_source=heldout.source,
        # carved after calib and scoring from the same permutation: those two stay exactly as they
        # are without validation windows, so cached statistics and selections remain valid
        validation=train[order[need:need + validation_samples]] if validation_samples else None,
    )
