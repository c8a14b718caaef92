"""``subfit-run``: one compression run from a validated recipe to a saved model and results.json.

The engine knows no method: the scorer, selector and fitter named in the recipe do the choosing
and fitting; this module only moves data between them in a fixed order. A ``Session`` holds
what several runs on the same model and data can share (the model, the windows, the dense
reference and the dense calibration statistics), so comparisons and sweeps pay for them once.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from subfit_core.artifact.export import check_exportable
from subfit_core.artifact.folder import save_compressed
from subfit_core.artifact.outputs import check_output_dir, claim
from subfit_core.config import SCHEMA
from subfit_core.engine.adapter import Adapter
from subfit_core.engine.batching import resolve_batch_size
from subfit_core.engine.budget import Budget
from subfit_core.engine.bypass import Bypass
from subfit_core.engine.cache import cache_root, max_cache_bytes, stats_key
from subfit_core.engine.corpus import CorpusText, Windows, heldout_windows, make_windows
from subfit_core.engine.factorize import FactorizeResult, factorize_rest, parameter_counts
from subfit_core.engine.interfaces import Factorizer, Fitted, Fitter, Plan, Scorer, Selector, Submodule
from subfit_core.engine.models import find_adapter, load_model, load_streamed, offload_mode, resolve_device, resolve_fit_device
from subfit_core.engine.sampling import sample_windows, start_token
from subfit_core.engine.streaming import WeightStream
from subfit_core.engine.surgery import records, split_bypass_params
from subfit_core.engine.workbench import Workbench
from subfit_core.errors import ConfigError, SubFitError, did_you_mean
from subfit_core.evaluation.perplexity import forward_seconds, perplexity
from subfit_core.evaluation.speed import SpeedSettings, measure_speed, ratios
from subfit_core.evaluation.tasks import check_tasks, compare_tasks, geometric_mean, run_tasks
from subfit_core.plugins import Plugins, build_component, get_plugins

if TYPE_CHECKING:
    from transformers import PreTrainedModel

# Keys that must agree for two runs to share a Session (model, data and the dense reference).
SESSION_KEYS = ("model", "device", "dtype", "offload", "seed", "trust_remote_code", "calib", "scoring", "eval", "speed")
TIMED_BATCHES = 8  # the dense forward that compression time is reported against: timed on these, scaled
# What the dense reference (held-out perplexities, tasks, speed) depends on: sessions that calibrate
# differently but agree on these (and on the main domain) measure the same dense model on the same text.
REFERENCE_KEYS = ("model", "device", "dtype", "offload", "trust_remote_code", "eval", "speed")


@dataclass
class Components:
    scorer: Scorer
    selector: Selector
    fitter: Fitter
    factorizer: Factorizer | None = None  # None: no factorization stage


@dataclass
class Session:
    cfg: dict
    model: PreTrainedModel
    tokenizer: object
    model_source: str
    adapter: Adapter
    windows: Windows
    device: torch.device
    dtype: torch.dtype
    dense_ppl: float
    dense_forward_s: float
    bench: Workbench
    # held-out windows and dense perplexity per text domain (eval.domains), the main one included
    domains: dict[str, torch.Tensor] = field(default_factory=dict)
    dense_domain_ppl: dict[str, float] = field(default_factory=dict)
    stats_s: float = 0.0
    stats_cached: bool = False
    sampling_s: float = 0.0  # calibration windows sampled from the dense model (calib.generated)
    batch_sizes: dict[str, int] = field(default_factory=lambda: {"calib": 8, "eval": 8})  # as resolved (auto)
    # dense downstream scores and deployment measurements, computed once on first request (eval.tasks, eval.speed)
    dense_tasks: dict | None = None
    dense_speed: dict | None = None

    def compatible(self, cfg: dict) -> bool:
        """Whether a run of ``cfg`` can use this Session (same model, data and evaluation settings)."""
        return all(self.cfg[k] == cfg[k] for k in SESSION_KEYS)

    def reference(self) -> Reference:
        """The dense measurements, without the statistics, for a session that calibrates differently."""
        return Reference(self.cfg, self.dense_ppl, self.domains, self.dense_domain_ppl, self.dense_tasks, self.dense_speed)


@dataclass
class Reference:
    """The dense model's held-out perplexities, tasks and speed, as one session measured them."""
    cfg: dict
    dense_ppl: float
    domains: dict[str, torch.Tensor]
    dense_domain_ppl: dict[str, float]
    dense_tasks: dict | None
    dense_speed: dict | None

    def serves(self, cfg: dict) -> bool:
        """Whether a session of ``cfg`` would measure exactly these numbers."""
        return all(self.cfg[k] == cfg[k] for k in REFERENCE_KEYS) and main_domain(self.cfg) == main_domain(cfg)


@dataclass
class Outcome:
    bypasses: dict[Submodule, Bypass]
    plan: Plan
    results: dict
    factored: FactorizeResult | None = None

    def factored_records(self) -> list[dict]:
        return self.factored.records() if self.factored is not None else []


def build_components(plugins: Plugins, cfg: dict) -> Components:
    """Validate every component's parameters, and that they work together, before any expensive work."""
    comps = Components(
        scorer=build_component(plugins, "scorer", cfg["scorer"], "scorer"),
        selector=build_component(plugins, "selector", cfg["selector"], "selector"),
        fitter=build_component(plugins, "fitter", cfg["fitter"], "fitter"),
        factorizer=build_optional(plugins, "factorizer", cfg["factorizer"], "no factorization"),
    )
    if comps.selector.needs_group_scores() and not comps.scorer.scores_groups:
        able = [n for n in plugins.scorer.names() if getattr(plugins.scorer.get(n), "scores_groups", False)]
        raise ConfigError(f"scorer.name: {cfg['scorer']['name']} scores single submodules only, but selector "
                          f"{cfg['selector']['name']} asks for whole layers or windows; use one of: {', '.join(able)}")
    registered = plugins.registries["statistic"]
    for name in comps.scorer.statistics:
        if name not in registered:
            raise ConfigError(f"scorer.name: {cfg['scorer']['name']} reads the statistic '{name}', which no installed "
                              f"plugin registers; registered: {', '.join(registered.names()) or 'none'}")
    if cfg["anchored"] and not comps.fitter.supports_anchored:
        raise ConfigError(f"anchored: true is not supported by fitter {cfg['fitter']['name']}, which fits on the "
                          "dense model; set anchored: false")
    if comps.fitter.fits_windows and not comps.selector.selects_whole_layers():
        able = [n for n in plugins.selector.names()
                if build_component(plugins, "selector", {"name": n}, "selector").selects_whole_layers()]
        raise ConfigError(f"selector.name: {cfg['selector']['name']} can select parts of layers, but fitter "
                          f"{cfg['fitter']['name']} fits removed windows of whole layers; use one of: {', '.join(able)}")
    return comps


def build_optional(plugins: Plugins, kind: str, section: dict, none: str):
    """The ``kind`` component a recipe section names, or None when it names ``none`` (``none``:
    what the run does then); parameters given without a name are an error."""
    if section["name"] != "none":
        return build_component(plugins, kind, section, kind)
    extra = sorted(k for k in section if k != "name")
    if extra:
        raise ConfigError(f"{kind}.{extra[0]}: set {kind}.name first (it is none: {none})")
    return None


def load_text(plugins: Plugins, name: str) -> CorpusText:
    """A registered text source, or a local .txt/.json/.jsonl file."""
    try:
        if name in plugins.dataset:
            return plugins.dataset.get(name)()
        if Path(name).suffix or Path(name).exists():
            return plugins.dataset.get("local-file")(name)
    except ValueError as exc:  # loaders raise ValueError with a one-line, user-facing message
        raise SubFitError(str(exc)) from None
    plugins.dataset.get(name)  # raises the unknown-name error with a suggestion
    raise AssertionError("unreachable")


def domain_names(plugins: Plugins, cfg: dict) -> list[str]:
    """The text domains a run reports held-out perplexity on; an unknown name fails before any work."""
    names = cfg["eval"]["domains"] if cfg["eval"]["domains"] is not None else plugins.default_domains()
    for name in names:
        if name not in plugins.dataset and not Path(name).suffix:
            raise ConfigError(f"eval.domains: unknown text source '{name}'; {did_you_mean(name, plugins.dataset.names())}")
    return list(dict.fromkeys(names))


def main_domain(cfg: dict) -> str:
    """The text the headline held-out perplexity is measured on."""
    return cfg["eval"]["dataset"] or cfg["calib"]["dataset"]


def domain_perplexities(model, session: Session, cfg: dict, main_ppl: float, desc: str) -> dict[str, float]:
    """Held-out perplexity on every domain; the main domain's is ``main_ppl`` (already measured)."""
    main = main_domain(cfg)
    return {name: main_ppl if name == main else
            perplexity(model, ids, session.batch_sizes["eval"], session.device, f"{desc} ({name})")
            for name, ids in session.domains.items()}


def mix_generated(windows: Windows, cfg: dict, model, tokenizer, device: torch.device,
                  stream: WeightStream | None = None) -> None:
    """Replace the share ``calib.generated`` of the calibration and scoring windows (the last ones of
    each) with windows sampled from the dense model (``stream``: its weights, when streamed)."""
    # sampled text depends on how it is batched: auto keeps the schema's default so memory never changes it
    batch_size = cfg["calib"]["batch_size"]
    if batch_size == "auto":
        batch_size = SCHEMA["calib"]["batch_size"].default
    share = cfg["calib"]["generated"]
    n_calib, n_scoring = round(share * windows.calib.shape[0]), round(share * windows.scoring.shape[0])
    if n_calib + n_scoring == 0:
        return
    cache = cache_root() / "samples" if cfg["cache_stats"] else None
    start = start_token(tokenizer, fallback=int(windows.calib[0, 0]))
    ids = sample_windows(model, start, n_calib + n_scoring, cfg["calib"]["seq_len"], cfg["seed"],
                         batch_size * 4, device, cache, stream.fingerprint() if stream is not None else None)
    windows.calib = torch.cat([windows.calib[:windows.calib.shape[0] - n_calib], ids[:n_calib]])
    windows.scoring = torch.cat([windows.scoring[:windows.scoring.shape[0] - n_scoring], ids[n_calib:]])
    windows.source += f" + {n_calib + n_scoring} windows sampled from the dense model"


def open_session(cfg: dict, validation_windows: int = 0, loaded: tuple | None = None,
                 texts: dict[str, CorpusText] | None = None, reference: Reference | None = None) -> Session:
    """Load the model and data, measure the dense model, and stream the dense statistics.
    ``validation_windows``: also carve that many validation windows (sweeps choose on these).
    ``loaded``: (model, tokenizer, source) already in memory, used instead of loading ``cfg["model"]``;
    ``texts``: text sources by name passed in memory, found before the registered ones;
    ``reference``: dense measurements of an earlier session, taken over instead of measured again
    when they are the ones this session would measure (``Reference.serves``)."""
    if reference is not None and not reference.serves(cfg):
        reference = None
    plugins = get_plugins()
    texts = texts or {}
    torch.manual_seed(cfg["seed"])
    device = resolve_device(cfg["device"])
    dtype = getattr(torch, cfg["dtype"])

    def text(name: str) -> CorpusText:
        return texts[name] if name in texts else load_text(plugins, name)

    calib_text = text(cfg["calib"]["dataset"])  # before the model: bad data fails fast
    eval_text = text(cfg["eval"]["dataset"]) if cfg["eval"]["dataset"] else calib_text
    names = domain_names(plugins, cfg)
    stream = None
    if loaded is not None:
        model, tokenizer, source = loaded
    else:
        mode = offload_mode(plugins, cfg["model"], cfg["offload"], device, dtype)
        check_offload(cfg, mode)
        if mode == "none":
            model, tokenizer, source = load_model(plugins, cfg["model"], device, dtype, cfg["trust_remote_code"])
        else:
            model, tokenizer, source, stream = load_streamed(cfg["model"], device, dtype, mode, cfg["trust_remote_code"])
    model.eval()
    adapter = find_adapter(plugins, model)
    batch_sizes = {section: resolve_batch_size(cfg[section]["batch_size"], adapter, cfg[section]["seq_len"], dtype, device)
                   for section in ("calib", "eval")}
    windows = make_windows(
        calib_text, tokenizer, calib_samples=cfg["calib"]["samples"], scoring_samples=cfg["scoring"]["samples"],
        seq_len=cfg["calib"]["seq_len"], heldout=eval_text, eval_windows=cfg["eval"]["windows"],
        eval_seq_len=cfg["eval"]["seq_len"], seed=cfg["seed"], validation_samples=validation_windows)
    t0 = time.perf_counter()
    mix_generated(windows, cfg, model, tokenizer, device, stream)
    sampling_s = time.perf_counter() - t0
    main = main_domain(cfg)
    if reference is not None:
        domains, dense_ppl = reference.domains, reference.dense_ppl
    else:
        domains = {name: windows.heldout if name == main else
                   heldout_windows(text(name), tokenizer, cfg["eval"]["windows"], cfg["eval"]["seq_len"])
                   for name in names}
        dense_ppl = perplexity(model, windows.heldout, batch_sizes["eval"], device, "dense perplexity")
    dense_forward_s = forward_seconds(model, windows.calib, batch_sizes["calib"], device, batches=TIMED_BATCHES)
    bench = Workbench(model, adapter, windows, batch_sizes["calib"], device, cfg["scoring"]["stride"], plugins, stream)
    cache = None
    if cfg["cache_stats"]:  # streamed weights: a folder of per-submodule files, read one at a time
        key = stats_key(cfg["model"], model, cfg["dtype"], windows.calib, bench.statistics_signature(),
                        stream.fingerprint() if stream is not None else None)
        cache = cache_root() / "stats" / (key if stream is not None else f"{key}.safetensors")
        max_cache_bytes()  # a bad SUBFIT_CACHE_MAX_GB fails now, not after the pass
    t0 = time.perf_counter()
    cached = bench.collect(cache)
    if cache is not None:  # scoring evaluations too, so a run killed during selection resumes there
        scoring = hashlib.sha256(windows.scoring.numpy().tobytes()).hexdigest()[:16]
        bench.journal_evaluations(cache_root() / "evaluations" / f"{key}-{scoring}-{cfg['scoring']['stride']}.jsonl")
    session = Session(cfg, model, tokenizer, source, adapter, windows, device, dtype, dense_ppl, dense_forward_s,
                      bench, domains, stats_s=time.perf_counter() - t0, stats_cached=cached, sampling_s=sampling_s,
                      batch_sizes=batch_sizes)
    if reference is not None:
        session.dense_domain_ppl = reference.dense_domain_ppl
        session.dense_tasks, session.dense_speed = reference.dense_tasks, reference.dense_speed
    else:
        session.dense_domain_ppl = domain_perplexities(model, session, cfg, dense_ppl, "dense perplexity")
    return session


def evaluate_dense(session: Session, cfg: dict) -> None:
    """Dense downstream scores and deployment measurements, once per Session (the model must be dense)."""
    ev = cfg["eval"]
    if ev["tasks"] and session.dense_tasks is None:
        session.dense_tasks = run_tasks(session.model, session.tokenizer, ev["tasks"], ev["limit"], session.batch_sizes["eval"],
                                        get_plugins(), session.device)
    if ev["speed"] and session.dense_speed is None:
        session.dense_speed = measure_speed({"dense": session.model}, SpeedSettings.from_config(cfg["speed"]), session.device)


def evaluate_compressed(session: Session, cfg: dict, results: dict) -> None:
    """Add downstream accuracy and deployment ratios of the (compressed) session model to ``results``."""
    ev = cfg["eval"]
    t0 = time.perf_counter()
    if ev["tasks"]:
        assert session.dense_tasks is not None  # measured by evaluate_dense, which compress runs first
        compressed = run_tasks(session.model, session.tokenizer, ev["tasks"], ev["limit"], session.batch_sizes["eval"],
                               get_plugins(), session.device)
        results["downstream"] = {**compare_tasks(session.dense_tasks, compressed), "limit": ev["limit"]}
    if ev["speed"]:
        assert session.dense_speed is not None  # measured by evaluate_dense, which compress runs first
        measured = measure_speed({"compressed": session.model}, SpeedSettings.from_config(cfg["speed"]), session.device)
        both = {**session.dense_speed, "models": {**session.dense_speed["models"], **measured["models"]}}
        results["deployment"] = {**both, "ratios": ratios(both)}
    results["timings"]["evaluation_s"] = time.perf_counter() - t0


def compress(session: Session, cfg: dict, before_eval: Callable[[], None] | None = None) -> Outcome:
    """Select, fit and apply bypasses per ``cfg``, then factor the remaining linears if a factorizer
    is named; the session's model is left compressed. ``before_eval`` runs on the compressed model
    before the held-out perplexity (a sweep measures its validation split there, and may stop a
    trial that is clearly worse before that cost)."""
    if cfg["runner"]["name"] != "none":  # compare, sweeps and the API compress statically; subfit-run runs runners
        raise ConfigError(f"runner.name: {cfg['runner']['name']} delivers its own kind of model, which this command "
                          "does not compress; run the recipe with subfit-run, or set runner.name=none")
    comps = build_components(get_plugins(), cfg)
    bench, adapter, device = session.bench, session.adapter, session.device
    fz = comps.factorizer
    bench.restore()
    bench.journal.begin()  # what earlier compressions of the session evaluated counts as replayed
    bench.fit_device = resolve_fit_device(cfg["fit_device"], device, adapter.hidden_size)
    bench.drift_correction = cfg["drift_correction"]
    evaluate_dense(session, cfg)
    if fz is None:
        budget = removal = Budget(cfg["sparsity"], cfg["sparsity_unit"], adapter)
    else:  # the factorizer's total budget, part of which removal may take first
        total, removal_part = fz.budget(*parameter_counts(bench))
        budget, removal = Budget(total, "params", adapter), Budget(removal_part, "params", adapter)
    comps.fitter.attach(adapter)
    evaluations_before, replayed_before, replayed_s_before = bench.evaluations, bench.replayed, bench.replayed_seconds
    t0 = time.perf_counter()
    if removal.sparsity > 0:
        plan = comps.selector.select(bench, comps.scorer, comps.fitter, removal)
    else:
        plan = Plan(notes={"estimated_sparsity": 0.0})
    t_select = time.perf_counter() - t0
    bench.restore()
    fitted = comps.fitter.fit_selection(plan.subs, bench, anchored=cfg["anchored"]) if plan.subs else Fitted({})
    edits = {**plan.edits, **fitted.edits}
    clash = sorted(set(edits) & set(fitted.bypasses))
    if clash:
        raise SubFitError(f"fitter {cfg['fitter']['name']}: {clash[0]} is both replaced and edited")
    bench.restore()
    bench.apply({**fitted.bypasses, **edits})
    factored = factorize_rest(bench, fz, budget, fitted.bypasses) if fz is not None else None
    # Work replayed from earlier runs (a selector's own memo, the evaluation journal) counts at what
    # it took when it ran, so the time is what a standalone run would take.
    replayed_s = plan.reused_seconds + bench.replayed_seconds - replayed_s_before  # the journal's answers too
    compression_s = session.sampling_s + session.stats_s + time.perf_counter() - t0 + replayed_s

    if before_eval is not None:
        before_eval()
    ppl = perplexity(session.model, session.windows.heldout, session.batch_sizes["eval"], device, "compressed perplexity")
    results = report(session, cfg, budget, plan, fitted.bypasses, ppl, compression_s, t_select,
                     bench.evaluations - evaluations_before, factored, bench.replayed - replayed_before, replayed_s)
    results["perplexity"].update(cross_domain(session, cfg, ppl))
    results["edited"] = [s.name for s in sorted(edits)]
    results["notes"].update(fitted.notes)
    evaluate_compressed(session, cfg, results)
    return Outcome(fitted.bypasses, plan, results, factored)


def cross_domain(session: Session, cfg: dict, ppl: float) -> dict:
    """Per-domain held-out perplexity of the session's (compressed) model against the dense one, and the
    geometric mean of the ratios over the domains the run did not calibrate on."""
    compressed = domain_perplexities(session.model, session, cfg, ppl, "compressed perplexity")
    calib = cfg["calib"]["dataset"]
    domains = {name: {"dense": session.dense_domain_ppl[name], "compressed": value,
                      "ratio": value / session.dense_domain_ppl[name], "calibrated": name == calib}
               for name, value in compressed.items()}
    return {"domains": domains,
            "out_of_domain_ratio": geometric_mean([d["ratio"] for d in domains.values() if not d["calibrated"]])}


def active_params(adapter: Adapter, selected: list[Submodule], own: dict[Submodule, int], shared: int) -> dict:
    """Decoder parameters one token runs through (all of them, except in a mixture of experts):
    a replaced submodule's are its bypass's and, when the bypass reads its input, its pre-norm's."""
    before = sum(adapter.active_param_count(s) for s in adapter.submodules())
    kept_inputs = sum(adapter.input_params(s) for s in selected if own.get(s, 0) > 0)
    after = before - sum(adapter.active_param_count(s) for s in selected) + sum(own.values()) + shared + kept_inputs
    return {"before": before, "after": after}


def report(session: Session, cfg: dict, budget: Budget, plan: Plan, bypasses: dict, ppl: float,
           compression_s: float, select_s: float, evaluations: int, factored: FactorizeResult | None = None,
           replayed: int = 0, replayed_s: float = 0.0) -> dict:
    adapter, selected = session.adapter, plan.subs
    own, shared = split_bypass_params(bypasses)
    n_layers = adapter.num_layers
    kept_attn = [layer for layer in range(n_layers) if Submodule(layer, "attn") not in selected]
    before = budget.decoder_params
    sparsity = budget.report(own, shared, factored.saved_per_layer() if factored is not None else None)
    bypass_params = sum(own.values()) + shared
    specs = {s: bypasses[s].spec() for s in selected}
    return {
        "strategy": cfg["name"],
        "model": {"name": cfg["model"], "source": session.model_source, "architecture": type(session.model).__name__,
                  "layers": n_layers, "device": str(session.device), "dtype": cfg["dtype"],
                  "fit_device": str(session.bench.fit_device)},  # where the fits ran (auto resolved)
        "batch_sizes": session.batch_sizes,  # windows per batch as used (auto resolved)
        "data": {"calibration": f"{cfg['calib']['samples']} x {cfg['calib']['seq_len']} tokens",
                 "scoring": f"{cfg['scoring']['samples']} x {cfg['calib']['seq_len']} tokens",
                 "heldout": f"{cfg['eval']['windows']} x {cfg['eval']['seq_len']} tokens",
                 "source": session.windows.source, "heldout_source": session.windows.heldout_source},
        "perplexity": {"dense": session.dense_ppl, "compressed": ppl, "ratio": ppl / session.dense_ppl},
        "sparsity": sparsity,
        "decoder_params": {"before": before, "after": round(before * (1 - sparsity["achieved_params"])),
                           "bypass_params": bypass_params,
                           "note": "decoder layers only; embeddings and lm_head excluded"},
        "active_params_per_token": active_params(adapter, selected, own, shared),
        "kv_cache_bytes_per_token": {"before": adapter.kv_bytes_per_token(list(range(n_layers))),
                                     "after": adapter.kv_bytes_per_token(kept_attn)},
        "replaced": [{"layer": r.sub.layer, "type": r.sub.kind, "bypass": specs[r.sub]["kind"],
                      "rank": specs[r.sub].get("rank", specs[r.sub].get("dim")), "score": r.score}
                     for r in plan.replacements],
        "timings": {"compression_s": compression_s, "statistics_s": session.stats_s, "sampling_s": session.sampling_s,
                    "statistics_from_cache": session.stats_cached, "selection_s": select_s,
                    "dense_calibration_forward_s": session.dense_forward_s,
                    "compression_over_dense_forward": compression_s / session.dense_forward_s,
                    "scoring_evaluations": evaluations,
                    "scoring_evaluations_replayed": replayed,
                    "replayed_s": replayed_s},  # of compression_s: work replayed, counted at what it took when it ran
        "notes": plan.notes,
        **({"factorization": {"factorizer": cfg["factorizer"]["name"], **factored.summary()}} if factored is not None else {}),
    }


def check_offload(cfg: dict, mode: str) -> None:
    """What cannot run on streamed weights fails once ``offload`` is resolved, before the model loads."""
    if mode != "none" and cfg["eval"]["speed"]:
        raise ConfigError(f"eval.speed: it times the model as deployed, held in memory, and this run streams its weights "
                          f"(offload={mode}), so it would time the reads; set eval.speed=false and run subfit-speed on the "
                          "saved folder where it fits")
    runner = build_optional(get_plugins(), "runner", cfg["runner"], "one compressed model")
    if runner is not None:
        runner.check_offload(mode)


def check_before_work(cfg: dict) -> None:
    """Bad component parameters, incompatible components and unknown task names fail before the model loads."""
    build_components(get_plugins(), cfg)
    build_optional(get_plugins(), "runner", cfg["runner"], "one compressed model")
    check_tasks(cfg["eval"]["tasks"], get_plugins())
    if cfg["offload"] != "auto":  # known now: refused before a download or a conversion
        check_offload(cfg, cfg["offload"])


def run(cfg: dict) -> dict:
    t_start = time.perf_counter()
    check_before_work(cfg)
    if not cfg["save"]:
        return run_in(cfg, None, t_start)
    out_dir = check_output_dir(cfg["output_dir"], cfg["overwrite"])
    with claim(out_dir):  # a second run into the same folder fails now, not after the work
        return run_in(cfg, out_dir, t_start)


def run_in(cfg: dict, out_dir: Path | None, t_start: float) -> dict:
    runner = build_optional(get_plugins(), "runner", cfg["runner"], "one compressed model")
    session = open_session(cfg)
    if runner is not None:
        results = runner.run(session, cfg, out_dir)
        results["timings"]["total_s"] = time.perf_counter() - t_start
        return results
    if out_dir is not None:  # a model whose artifact standard tools could not load fails before the work
        check_exportable(session.model, session.adapter.layout)
    outcome = compress(session, cfg)
    results = outcome.results
    results["timings"]["total_s"] = time.perf_counter() - t_start
    if out_dir is not None:
        results["output_dir"] = str(out_dir)
        save_compressed(session.model, session.tokenizer, records(outcome.bypasses), out_dir, cfg, results,
                        outcome.factored_records(), layout=session.adapter.layout, stream=session.bench.stream)
    return results
