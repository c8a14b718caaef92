"""Progress bars for long work (tqdm on stderr; SUBFIT_PROGRESS=0 turns them off, ours and those
of the libraries we drive: transformers' weight loading, datasets, lm-eval)."""

from __future__ import annotations

import contextlib
import os

from tqdm.auto import tqdm


def progress_enabled() -> bool:
    return os.environ.get("SUBFIT_PROGRESS", "1") != "0"


def progress(iterable=None, **kwargs):
    return tqdm(iterable, disable=not progress_enabled(), dynamic_ncols=True, leave=False, **kwargs)


def quiet_transformers() -> None:
    """transformers draws a bar while loading weights; silence it with ours."""
    if not progress_enabled():
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


@contextlib.contextmanager
def quiet_lm_eval():
    """lm-eval draws bars while building requests and scoring them, with no switch for all of them:
    while SUBFIT_PROGRESS=0, its modules see a tqdm that is disabled (restored on exit)."""
    if progress_enabled():
        yield
        return
    import datasets
    import lm_eval.api.model
    import lm_eval.api.task
    import lm_eval.models.huggingface

    def silenced(bar):
        def make(*args, **kwargs):
            kwargs["disable"] = True  # over lm-eval's own disable=... argument, where it passes one
            return bar(*args, **kwargs)
        return make

    datasets.disable_progress_bars()
    modules = (lm_eval.api.task, lm_eval.api.model, lm_eval.models.huggingface)
    saved = [(m, m.tqdm) for m in modules if hasattr(m, "tqdm")]
    try:
        for m, bar in saved:
            m.tqdm = silenced(bar)
        yield
    finally:
        for m, bar in saved:
            m.tqdm = bar
