"""Reads a bundled task's data from this folder, so that ``lm_eval --include_path <this folder>``
works from any working directory (the task YAMLs name it as their ``custom_dataset``; lm-eval
calls it with the YAML's ``dataset_kwargs``)."""

from __future__ import annotations

from pathlib import Path


def load(data_files: dict, **_):
    import datasets

    here = Path(__file__).parent
    return datasets.load_dataset("json", data_files={split: str(here / name) for split, name in data_files.items()})
