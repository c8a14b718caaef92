"""The standard-loading path of a per-prompt folder: transformers' own ``generate`` skipping per prompt.

The folder's ``config.json`` stays the dense model's (a loader without remote code builds the
dense model, whole and right) and gains ``auto_map`` and a ``subfit_dynamic`` entry (the
candidates, their bypass specs, savings and prior, and the skipping parameters). With
``trust_remote_code=True``, ``AutoModelForCausalLM`` builds ``SubFitDynamicForCausalLM`` from
``modeling_subfit_dynamic.py``, written next to it: the family's causal LM from transformers, the
portable sources of the layout, the probes and recovery (``sensing``) and the bypass classes, and a
subclass whose ``generate`` chooses the set for its prompt from probes (full forwards of the prompt
with a random subset bypassed), skips it for the whole call and restores the dense model after.
What it leaves to ``load_dynamic``: re-estimation while decoding (``every``) and dropping context
tokens (``tokens``; here the whole budget goes to submodules, with a warning).
"""

from __future__ import annotations

import inspect

from subfit_core.artifact.export import _portable, base_classes, bypass_lineage, layout_source
from subfit_core.engine.bypass import Bypass
from subfit_core.errors import SubFitError

from . import sensing

MODELING_FILE = "modeling_subfit_dynamic.py"
CLASS = "SubFitDynamicForCausalLM"
ENTRY = "subfit_dynamic"

HEADER = '''"""A {architecture} that skips, per prompt, the candidate submodules listed under "{entry}" in
config.json through small bypasses fitted in closed form (SubFit {version}); needs only torch and
transformers. Its generate() chooses the set from probes of the prompt; forward() alone is dense.

    AutoModelForCausalLM.from_pretrained(this_folder, trust_remote_code=True)
"""

from __future__ import annotations

import math
import warnings
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from safetensors.torch import load_model
from torch import nn
from transformers import {architecture} as BaseForCausalLM
from transformers.utils import cached_file
'''

FOOTER = '''
BYPASS_CLASSES = {{cls.kind: cls for cls in [{kinds}]}}
LAYOUT = {layout}
WEIGHTS = "{weights}"


class {cls}(BaseForCausalLM):
    """{architecture} whose ``generate`` skips, for each prompt (batch 1), the candidates the probes
    find least harmful until ``budget`` of the model is skipped; without a "{entry}" entry in its
    config it is the plain model."""

    _keys_to_ignore_on_load_missing = [r"subfit_bypasses\\."]  # loaded from their own file, next

    def __init__(self, config):
        super().__init__(config)
        spec = getattr(config, "{entry}", None) or {{}}
        self.subfit_spec = spec
        self.subfit_candidates = [(int(e["layer"]), str(e["kind"])) for e in spec.get("candidates", [])]
        shared: dict = {{}}
        self.subfit_bypasses = nn.ModuleDict({{
            f"{{l}}_{{k}}": BYPASS_CLASSES[e["bypass"]["kind"]].empty(e["bypass"], None, shared)
            for (l, k), e in zip(self.subfit_candidates, spec.get("candidates", []))}})
        self.subfit_originals = {{(l, k): (LAYOUT.submodule(self, l, k), *LAYOUT.norms(self, l, k))
                                 for l, k in self.subfit_candidates}}
        self.subfit_generator = torch.Generator().manual_seed(int(spec.get("params", {{}}).get("seed", 0)))
        self.subfit_last = []  # the set the last generate() skipped

    @classmethod
    def from_pretrained(cls, path, *args, **kwargs):
        model = super().from_pretrained(path, *args, **kwargs)
        if model.subfit_candidates:  # the bypasses are not in model.safetensors: every one from their own file
            weights = cached_file(path, WEIGHTS, **{{k: kwargs[k] for k in ("revision", "token", "cache_dir") if k in kwargs}})
            device = next(model.parameters()).device
            load_model(model.subfit_bypasses, weights, strict=True, device=str(device))
            model.subfit_bypasses.to(next(model.parameters()).dtype)
            for (l, k), (original, *_) in model.subfit_originals.items():  # device_map may spread the layers:
                where = next(original.parameters(), None)  # each bypass runs where its layer's inputs are
                if where is not None and not where.is_meta:
                    model.subfit_bypasses[f"{{l}}_{{k}}"].to(where.device)
        return model

    # --- the model under a choice
    def subfit_use(self, skip, finalize=True):
        """Bypass exactly the candidates in ``skip`` ((layer, kind) pairs); the rest run their originals."""
        for l, k in self.subfit_candidates:
            if (l, k) in skip:
                LAYOUT.install(self, l, k, self.subfit_bypasses[f"{{l}}_{{k}}"])
            else:
                LAYOUT.set_module(self, l, k, *self.subfit_originals[(l, k)])
        if finalize:
            LAYOUT.finalize(self)

    @torch.inference_mode()
    def subfit_harm(self, ids):
        """Each candidate's harm on ``ids`` (1, T), recovered from random probes around the prior."""
        p = self.subfit_spec["params"]
        prior = torch.tensor([float(e["prior"]) for e in self.subfit_spec["candidates"]], dtype=torch.float64)
        if p["probes"] == 0:
            return prior
        a = probe_design(p["probes"], len(self.subfit_candidates), p["share"], self.subfit_generator)
        dense = self(input_ids=ids, use_cache=False).logits.float().log_softmax(-1)
        y = []
        try:
            for row in a:
                subset = [c for c, on in zip(self.subfit_candidates, row) if on]
                if not subset:
                    y.append(0.0)
                    continue
                self.subfit_use(subset, finalize=False)  # no cache is used: slots need no re-indexing
                probe = self(input_ids=ids, use_cache=False).logits.float().log_softmax(-1)
                y.append(float((dense.exp() * (dense - probe)).sum(-1).mean()))
        finally:
            self.subfit_use(())
        return recover(a, torch.tensor(y, dtype=torch.float64), prior, p["solver"], p["lam"], p["sparsity"])

    def subfit_choose(self, ids):
        p = self.subfit_spec["params"]
        if p.get("tokens"):
            warnings.warn("tokens: context tokens are dropped by load_dynamic only; this generate() spends the whole "
                          "budget on skipping submodules", stacklevel=3)

        def allowed(indices):
            try:
                self.subfit_use([self.subfit_candidates[i] for i in indices])
            except ValueError:  # the layout cannot drop that set (every attention of the first type)
                return False
            return True

        savings = [float(e["saving"]) for e in self.subfit_spec["candidates"]]
        try:
            picked = choose(self.subfit_harm(ids), savings, p["budget"], allowed)
        finally:
            self.subfit_use(())
        return [self.subfit_candidates[i] for i in picked]

    def generate(self, inputs=None, **kwargs):
        ids = inputs if inputs is not None else kwargs.get("input_ids")
        if not self.subfit_candidates or ids is None:
            return super().generate(inputs, **kwargs)
        if ids.shape[0] != 1:
            raise ValueError(f"{cls}.generate: per-prompt skipping chooses for one prompt at a time; got a batch of "
                             f"{{ids.shape[0]}}")
        self.subfit_last = self.subfit_choose(ids)
        self.subfit_use(self.subfit_last)
        try:
            return super().generate(inputs, **kwargs)
        finally:
            self.subfit_use(())
'''


def modeling_source(model, layout, kinds: list[type[Bypass]], version: str, weights: str) -> str:
    """The text of ``modeling_subfit_dynamic.py`` for ``model``'s family ``layout`` and bypass classes ``kinds``."""
    if layout is None:
        raise SubFitError(f"save: the adapter for {type(model).__name__} has no portable layout module, so the "
                          "per-prompt folder could not skip in standard tools")
    _, _, architecture = base_classes(model)
    classes = bypass_lineage(kinds)
    layout_module, layout_text, layout_expr = layout_source(layout)
    parts = [
        HEADER.format(architecture=architecture, version=version, entry=ENTRY),
        f"# ---- where the model keeps its submodules ({layout_module})\n", _portable(layout_text),
        f"# ---- probes, recovery and the choice ({sensing.__name__})\n", _portable(inspect.getsource(sensing)),
        "# ---- bypasses\n", _portable(Bypass.portable_source()),
        *(_portable(cls.portable_source()) for cls in classes),
        FOOTER.format(kinds=", ".join(c.__name__ for c in classes if c in kinds), layout=layout_expr, weights=weights,
                      cls=CLASS, architecture=architecture, entry=ENTRY),
    ]
    source = "\n\n".join(p.strip("\n") + "\n" for p in parts)
    try:
        compile(source, MODELING_FILE, "exec")
    except SyntaxError as exc:
        raise SubFitError(f"save: the generated {MODELING_FILE} does not compile (line {exc.lineno}: {exc.msg})") from None
    return source


def model_class(source: str) -> type:
    """``SubFitDynamicForCausalLM`` from ``source`` (this installation's own ``modeling_source``)."""
    namespace: dict = {"__name__": "subfit_dynamic_modeling"}
    exec(compile(source, MODELING_FILE, "exec"), namespace)  # noqa: S102 - our own generated code, not the folder's
    return namespace[CLASS]


def config_entries(spec: dict, runner: str) -> dict:
    """What config.json gains: the remote class for ``AutoModelForCausalLM``, the skipping spec, and the
    runner that ``load_compressed`` hands the folder to."""
    from subfit_core.artifact.folder import RUNNER_KEY

    return {"auto_map": {"AutoModelForCausalLM": f"{MODELING_FILE[:-3]}.{CLASS}"}, ENTRY: spec, RUNNER_KEY: runner}
