"""LaCo (Yang et al., 2024, Layer Collapse): rear layers are merged into an earlier one by adding
their parameter differences, and the merged-away layers are removed.

Merging m layers behind base layer l of the current model:
    theta_l* = theta_l + sum_{k=1..m} (theta_{l+k} - theta_l)
for every parameter of the attention and FFN modules (their pre-norms stay the base layer's).
A merge is kept when the merged model's final hidden states on the scoring windows stay close to
the dense model's (mean cosine similarity above ``threshold``); the search walks down from the
top, after an accepted merge jumps ``interval`` layers lower, and stops when the budget is met.
A descent that ends short of the budget is repeated from the top; when one accepts no merge at
all the threshold is lowered by ``relax`` first (the threshold finally used is reported).
Each current layer is kept as coefficients over the original layers, so merges of merged layers
are exact parameter arithmetic too. The scorer is not used: the criterion above is LaCo's own.
"""

from __future__ import annotations

import copy
from contextlib import ExitStack
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from subfit_core.engine.bypass import ZeroBypass
from subfit_core.engine.interfaces import Plan, Replacement, Selector, Submodule

from .budget_fill import achieved

Coefs = dict[int, float]  # original layer -> coefficient


@dataclass
class LaCoParams:
    rear_layers: int = 3  # layers merged into the base per merge (the paper's C counts the base too: C = 4)
    interval: int = 2  # after a merge, the next base is this many layers lower (the paper's I)
    threshold: float = 0.65  # minimum mean cosine similarity to the dense final hidden states (the paper's T)
    lowest: int = 1  # lowest base layer (the paper's L)
    relax: float = 0.05  # threshold decrease when a full descent ends short of the budget


def merge_coefs(base: Coefs, rears: list[Coefs]) -> Coefs:
    """theta_base + sum_k (theta_k - theta_base), as coefficients over the original layers."""
    out = dict(base)
    for rear in rears:
        for layer, c in rear.items():
            out[layer] = out.get(layer, 0.0) + c
        for layer, c in base.items():
            out[layer] = out.get(layer, 0.0) - c
    return {l: c for l, c in out.items() if c != 0.0}


@torch.no_grad()
def merged_module(originals: dict[Submodule, nn.Module], kind: str, base: int, coefs: Coefs) -> nn.Module:
    """A copy of layer ``base``'s ``kind`` module whose every parameter is sum_k coefs[k] * theta_k."""
    module = copy.deepcopy(originals[Submodule(base, kind)])
    sources = {l: dict(originals[Submodule(l, kind)].named_parameters()) for l in coefs}
    for name, param in module.named_parameters():
        param.copy_(sum(c * sources[l][name].double() for l, c in coefs.items()).to(param.dtype))
    return module


def similarity(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    cos = torch.cat([F.cosine_similarity(x.float(), y.float(), dim=-1).flatten() for x, y in zip(a, b)])
    return float(cos.mean())


class LaCoSelector(Selector):
    Params = LaCoParams
    description = "merge rear layers into an earlier one by parameter differences (LaCo); scorer unused"

    def selects_whole_layers(self):
        return True

    def select(self, bench, scorer, fitter, budget):
        p, dim = self.params, bench.adapter.hidden_size
        kept = list(range(bench.adapter.num_layers))  # original indices of the current model's layers
        coefs: dict[int, Coefs] = {l: {l: 1.0} for l in kept}
        dense_final = bench.dense_boundary(len(bench.subs))
        plan, merges, threshold = Plan(), [], p.threshold
        # A merge's similarity depends only on the current layers and the merge, so a descent repeated
        # with a lower threshold (or a later run at a higher sparsity, same session) looks it up.
        seen = bench.memo.setdefault(("laco", repr(p)), {})
        whole = lambda layers: [Submodule(l, k) for l in layers for k in ("attn", "ffn")]
        need = lambda extra: budget.sparsity - achieved(budget, fitter, plan.subs + whole(extra), dim)

        while need([]) > 1e-9 and len(kept) > p.lowest + 1 and threshold >= -1.0:
            l = len(kept) - 1 - p.rear_layers
            progressed = False
            while l >= p.lowest and need([]) > 1e-9:
                rears = kept[l + 1:l + 1 + p.rear_layers]
                while len(rears) > 1 and need(rears[:-1]) <= 1e-9:  # the last merge takes only what it needs
                    rears = rears[:-1]
                base = kept[l]
                new = merge_coefs(coefs[base], [coefs[r] for r in rears])
                key = (tuple(tuple(sorted(coefs[k].items())) for k in kept), base, tuple(rears))
                if key not in seen:
                    seen[key] = similarity(bench.states_with(self._modules(bench, base, new, rears)), dense_final)
                sim = seen[key]
                if sim > threshold:
                    modules = self._modules(bench, base, new, rears)
                    for sub, module in modules.items():
                        bench.commit(sub, module)
                    plan.replacements += [Replacement(s, 1.0 - sim) for s in whole(rears)]
                    coefs[base] = new
                    kept = [k for k in kept if k not in rears]
                    merges.append({"base": base, "merged": rears, "similarity": sim, "threshold": threshold})
                    l = min(l - p.interval, len(kept) - 1 - p.rear_layers)
                    progressed = True
                else:
                    l -= 1
            if not progressed:
                threshold -= p.relax
        plan.edits = {Submodule(b, k): bench.replaced[Submodule(b, k)]  # bases merged away later are removed
                      for b in {m["base"] for m in merges} if b in kept for k in ("attn", "ffn")}
        plan.notes.update(merges=merges, final_threshold=threshold,
                          estimated_sparsity=achieved(budget, fitter, plan.subs, dim))
        if need([]) > 1e-9:
            plan.notes["warning"] = f"budget not reached: {plan.notes['estimated_sparsity']:.4f} < {budget.sparsity}"
        return plan

    @staticmethod
    def _modules(bench, base: int, coefs: Coefs, rears: list[int]) -> dict:
        with ExitStack() as stack:  # the merged layers' weights in memory, streamed or not (the copies keep them)
            for layer in {base, *coefs}:
                for k in ("attn", "ffn"):
                    stack.enter_context(bench.loaded(bench.originals[Submodule(layer, k)]))
            modules = {Submodule(base, k): merged_module(bench.originals, k, base, coefs) for k in ("attn", "ffn")}
        modules.update({Submodule(r, k): ZeroBypass() for r in rears for k in ("attn", "ffn")})
        return modules
