"""Progress bars for long work (tqdm on stderr; SUBFIT_PROGRESS=0 turns them off)."""

from __future__ import annotations

import os

from tqdm.auto import tqdm


def progress(iterable=None, **kwargs):
    disable = os.environ.get("SUBFIT_PROGRESS", "1") == "0"
    return tqdm(iterable, disable=disable, dynamic_ncols=True, leave=False, **kwargs)
