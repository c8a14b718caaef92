"""Downstream evaluation through lm-evaluation-harness, on the in-memory model (no re-export).

Task names come from two places:

* task folders that plugins register (hook ``subfit_eval_task_dirs``): lm-eval task YAMLs, one task
  each, named by their ``task`` key. SubFit's built-in plugin ships offline tasks cut from held-out
  bundled text (``subfit_kjv_cloze``, ``subfit_shakespeare_nextline``, ``subfit_heldout_ppl``);
* lm-eval's own task index (``arc_easy``, ``hellaswag``, ...), which needs the dataset hub.

Every task runs zero-shot. Metrics follow the evaluation protocol: for a multiple-choice task the
retained accuracy ``acc_compressed / acc_dense``; for a rolling log-likelihood task the perplexity
degradation ``word_perplexity_compressed / word_perplexity_dense``; averaged over tasks (accuracy:
arithmetic mean; perplexity ratios: geometric mean).
"""

from __future__ import annotations

import copy
import logging
import math
import random
from pathlib import Path
from typing import Any

import yaml

from subfit_core.errors import ConfigError, SubFitError, did_you_mean
from subfit_core.progress import quiet_lm_eval

# Zero-shot multiple-choice set for users with hub access (the usual structural-pruning evaluation protocol).
STANDARD_TASKS = ("arc_easy", "arc_challenge", "boolq", "hellaswag", "piqa", "winogrande", "openbookqa")
ACCURACY = "acc"               # the accuracy that retained accuracy is computed from (acc_norm is reported too)
PERPLEXITY = "word_perplexity"  # the perplexity of rolling log-likelihood tasks that degradation uses
KEPT_METRICS = ("acc", "acc_norm", "word_perplexity", "byte_perplexity", "bits_per_byte")


class FunctionTag(str):
    """An lm-eval ``!function`` reference, kept as text: SubFit reads task files without running their code."""


class TaskLoader(yaml.SafeLoader):
    pass


TaskLoader.add_constructor("!function", lambda loader, node: FunctionTag(loader.construct_scalar(node)))


def local_tasks(plugins) -> dict[str, dict]:
    """Task configs from the registered task folders: name -> lm-eval config dict with absolute data paths."""
    found: dict[str, dict] = {}
    origins: dict[str, str] = {}
    for folder, origin in plugins.eval_task_dirs:
        for path in sorted(Path(folder).glob("*.yaml")):
            config = yaml.load(path.read_text(), Loader=TaskLoader)  # noqa: S506 (a SafeLoader)
            if not isinstance(config, dict) or not isinstance(config.get("task"), str):
                raise SubFitError(f"eval task file {path} ({origin}) has no 'task' name")
            name = config["task"]
            if name in found:
                raise SubFitError(f"eval task '{name}' is registered twice: in {origins[name]} and in {path} ({origin})")
            found[name], origins[name] = resolve_data_files(config, path.parent), f"{path} ({origin})"
            code = [k for k, v in found[name].items() if isinstance(v, FunctionTag)]
            if code:
                raise SubFitError(f"eval task file {path} ({origin}): {code[0]} is an lm-eval !function; SubFit runs "
                                  "tasks whose data and prompts are plain data (dataset_kwargs.data_files, templates)")
    return found


def resolve_data_files(config: dict, folder: Path) -> dict:
    """The config with relative ``dataset_kwargs.data_files`` paths made absolute (relative to
    ``folder``). A ``custom_dataset`` function, there for the lm_eval CLI to find the same files,
    is dropped: the absolute paths do its job."""
    config = copy.deepcopy(config)
    files = (config.get("dataset_kwargs") or {}).get("data_files")
    if isinstance(files, dict):
        config["dataset_kwargs"]["data_files"] = {split: str(folder / f) for split, f in files.items()}
    elif isinstance(files, str):
        config["dataset_kwargs"]["data_files"] = str(folder / files)
    if files and isinstance(config.get("custom_dataset"), FunctionTag):
        del config["custom_dataset"]
    return config


def _lm_eval_index() -> set[str]:
    """Every task, group and tag name lm-eval knows (indexing its YAMLs takes a few seconds)."""
    from lm_eval.tasks import TaskManager

    return set(TaskManager().all_tasks)


def check_tasks(names: list[str], plugins) -> None:
    """Fail before any work on a task name that neither a task folder nor lm-eval knows."""
    if not names:
        return
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise SubFitError("eval.tasks needs lm-evaluation-harness; install the eval extra: pip install 'subfit[eval]'") from None
    local = local_tasks(plugins)
    unknown = [n for n in names if n not in local and n not in STANDARD_TASKS]
    if unknown:
        index = _lm_eval_index()
        unknown = [n for n in unknown if n not in index]
    if unknown:
        allowed = sorted(local) + list(STANDARD_TASKS)
        raise ConfigError(f"eval.tasks: unknown task '{unknown[0]}'; {did_you_mean(unknown[0], allowed)} "
                          "(or any other lm-eval task name)")


def run_tasks(model, tokenizer, names: list[str], limit: int | None, batch_size: int, plugins,
              device=None) -> dict[str, dict]:
    """Zero-shot lm-eval scores of ``model`` on ``names``: task -> {metric: value, "items": n}.
    ``device``: where its inputs go (default: the model's, which a streamed model's meta weights lack)."""
    import numpy
    import torch
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    for noisy in ("lm_eval", "lm-eval"):  # its INFO/WARNING lines would bury the run's own output
        logging.getLogger(noisy).setLevel(logging.ERROR)
    local = local_tasks(plugins)
    specs = [local.get(n, n) for n in names]
    manager = TaskManager(include_defaults=any(isinstance(s, str) for s in specs))
    was_training = model.training
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    if device is not None:  # HFLM takes a given model's device from its first weight: meta when streamed
        lm._device = torch.device(device)
    # simple_evaluate seeds the global RNGs; keep the run's own random state as it was
    py_state, np_state = random.getstate(), numpy.random.get_state()
    try:
        # only the compute device's generator: with none named, fork_rng touches (and warns about) every GPU
        cuda = [lm.device] if lm.device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda), quiet_lm_eval():
            out = simple_evaluate(model=lm, tasks=specs, num_fewshot=0, limit=limit, task_manager=manager,
                                  log_samples=False, bootstrap_iters=0, verbosity="ERROR")
    finally:
        model.train(was_training)
        random.setstate(py_state)
        numpy.random.set_state(np_state)
    scores = {}
    for name in names:
        raw = out["results"].get(name)
        if raw is None:
            raise SubFitError(f"eval.tasks: lm-eval returned no result for '{name}' (is it a group? give its tasks)")
        task = {m: float(raw[f"{m},none"]) for m in KEPT_METRICS if f"{m},none" in raw}
        task["items"] = int(out.get("n-samples", {}).get(name, {}).get("effective", 0))
        scores[name] = task
    return scores


def geometric_mean(values: list[float]) -> float | None:
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else None


def compare_tasks(dense: dict[str, dict], compressed: dict[str, dict]) -> dict:
    """Per-task dense/compressed numbers and ratios, and the averages across tasks."""
    per_task: dict[str, dict] = {}
    retained: list[float] = []
    degradation: list[float] = []
    for name, d in dense.items():
        c = compressed[name]
        row: dict[str, Any] = {"dense": d, "compressed": c}
        if ACCURACY in d:
            row["metric"] = ACCURACY
            row["retained"] = c[ACCURACY] / d[ACCURACY] if d[ACCURACY] > 0 else None
            if row["retained"] is not None:
                retained.append(row["retained"])
        elif PERPLEXITY in d:
            row["metric"] = PERPLEXITY
            row["degradation"] = c[PERPLEXITY] / d[PERPLEXITY]
            degradation.append(row["degradation"])
        per_task[name] = row
    return {
        "tasks": per_task,
        "retained_accuracy": sum(retained) / len(retained) if retained else None,
        "perplexity_degradation": geometric_mean(degradation),
        "note": f"zero-shot; retained = {ACCURACY} compressed / dense, averaged over multiple-choice tasks; "
                f"degradation = {PERPLEXITY} compressed / dense, geometric mean over perplexity tasks",
    }
