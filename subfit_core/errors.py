"""Errors a user can cause and fix. The CLI prints these as one line, without a traceback."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class SubFitError(Exception):
    """A user-facing error: bad input, unknown name, missing resource. Its message is one line
    whatever the input it quotes (line breaks and other control characters are escaped)."""

    def __init__(self, message: object = ""):
        super().__init__(one_line(str(message)))


def one_line(text: str) -> str:
    return "".join(c if c.isprintable() or c == " " else repr(c)[1:-1] for c in text)


def first_line(exc: BaseException) -> str:
    """An exception's message in one line (its first), or its type's name when it has none."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class ConfigError(SubFitError):
    """A recipe key or value is not allowed."""


class NumericalError(SubFitError):
    """A statistic or a fitted bypass contains NaN/Inf; the message names the submodule."""


def nearest(name: str, options: Iterable[str]) -> str | None:
    """The closest option to ``name``, if any is reasonably close (for 'did you mean')."""
    found = difflib.get_close_matches(str(name), list(options), n=1, cutoff=0.5)
    return found[0] if found else None


def did_you_mean(name: str, options: Iterable[str]) -> str:
    options = sorted(options)
    guess = nearest(name, options)
    hint = f"; did you mean '{guess}'?" if guess else ""
    return f"allowed: {', '.join(options)}{hint}"
