"""SubFit's built-in plugin: registers the built-in components through the public hooks.

References are lazy ("module:attribute") so listing plugins imports nothing heavy.
"""

from __future__ import annotations

from pathlib import Path

from subfit_core.hookspecs import hookimpl

P = "subfit_plugins"


@hookimpl
def subfit_model_adapters():
    return {
        "llama-family": f"{P}.adapters.llama:LlamaFamilyAdapter",
        "phi3": f"{P}.adapters.llama:Phi3Adapter",
        "gemma": f"{P}.adapters.gemma:GemmaAdapter",
        "olmo2": f"{P}.adapters.gemma:Olmo2Adapter",
        "moe": f"{P}.adapters.moe:MoEAdapter",
    }


@hookimpl
def subfit_scorers():
    return {
        "output": f"{P}.scorers.output:OutputScorer",
        "rotation": f"{P}.scorers.local:RotationMagnitudeScorer",
        "fit-residual": f"{P}.scorers.fit_residual:FitResidualScorer",
        "block-influence": f"{P}.scorers.block_influence:BlockInfluenceScorer",
        "angular-distance": f"{P}.scorers.angular:AngularDistanceScorer",
    }


@hookimpl
def subfit_statistics():
    return {
        "rotation": f"{P}.statistics.residual:Rotation",
        "magnitude": f"{P}.statistics.residual:Magnitude",
        "layer-cosine": f"{P}.statistics.residual:LayerCosine",
    }


@hookimpl
def subfit_metrics():
    return {
        "kl": f"{P}.metrics.distribution:KLDivergence",
        "loss": f"{P}.metrics.distribution:Loss",
        "js": f"{P}.metrics.distribution:JSDivergence",
    }


@hookimpl
def subfit_selectors():
    return {
        "greedy": f"{P}.selectors.greedy:GreedySelector",
        "whole-layer": f"{P}.selectors.whole_layer:WholeLayerSelector",
        "iterative": f"{P}.selectors.iterative:IterativeSelector",
        "contiguous": f"{P}.selectors.contiguous:ContiguousSelector",
        "laco": f"{P}.selectors.laco:LaCoSelector",
        "optuna": f"{P}.selectors.optuna_search:OptunaSearchSelector",
    }


@hookimpl
def subfit_fitters():
    return {
        "identity": f"{P}.fitters.identity:IdentityFitter",
        "linear": f"{P}.fitters.linear:LinearFitter",
        "low-rank": f"{P}.fitters.linear:LowRankFitter",
        "shared-basis": f"{P}.fitters.shared_basis:SharedBasisFitter",
        "per-type": f"{P}.fitters.per_type:PerTypeFitter",
        "replaceme": f"{P}.fitters.replaceme:ReplaceMeFitter",
        "llm-streamline": f"{P}.fitters.streamline:StreamlineFitter",
        "linear-patch": f"{P}.fitters.linear_patch:LinearPatchFitter",
    }


@hookimpl
def subfit_bypass_kinds():
    return {
        "zero": "subfit_core.engine.bypass:ZeroBypass",
        "linear": "subfit_core.engine.bypass:LinearBypass",
        "lowrank": "subfit_core.engine.bypass:LowRankBypass",
        "shared_basis": f"{P}.fitters.shared_basis:SharedBasisBypass",
        "mlp": f"{P}.fitters.streamline:MLPBypass",
        "patch": f"{P}.fitters.linear_patch:PatchBypass",
    }


@hookimpl
def subfit_factorizers():
    return {
        "svd": f"{P}.factorizers.svd:SVDFactorizer",
        "svd-llm": f"{P}.factorizers.svd:SVDLLMFactorizer",
        "aa-svd": f"{P}.factorizers.svd:AASVDFactorizer",
    }


@hookimpl
def subfit_runners():
    return {"dynamic": f"{P}.dynamic.runner:DynamicRunner"}


@hookimpl
def subfit_datasets():
    return {
        "kjv": f"{P}.datasets:kjv",
        "shakespeare": f"{P}.datasets:shakespeare",
        "pydocs": f"{P}.datasets:pydocs",
        "jargon": f"{P}.datasets:jargon",
        "wikitext2": f"{P}.datasets:wikitext2",
        "c4": f"{P}.datasets:c4",
        "local-file": f"{P}.datasets:local_file",
    }


@hookimpl
def subfit_eval_domains():
    # two early-modern and two modern domains: every run reports held-out perplexity on each
    return ["kjv", "shakespeare", "pydocs", "jargon"]


@hookimpl
def subfit_models():
    return {"smollm2-135m": f"{P}.models:smollm2_135m", "gemma3-270m": f"{P}.models:gemma3_270m"}


@hookimpl
def subfit_defaults():
    # the embedded default: a real model and real text, both offline; a recipe that names no
    # component gets SubFit's (what strategies/subfit.yaml spells out)
    return {"strategy": "subfit", "model": "smollm2-135m", "calib.dataset": "kjv",
            "scorer.name": "output", "selector.name": "greedy", "fitter.name": "per-type"}


@hookimpl
def subfit_recipe_dirs():
    import subfit_strategies

    return [Path(subfit_strategies.__file__).parent]


@hookimpl
def subfit_eval_task_dirs():
    # offline lm-eval tasks cut from held-out bundled text; rebuilt by scripts/build_eval_tasks.py
    return [Path(__file__).resolve().parent / "eval_tasks"]
