"""Model adapters: where a model family keeps its attention and FFN, and how to run them piecewise.

An adapter turns a Hugging Face causal LM into a sequence of submodules along the residual stream
(attn_0, ffn_0, attn_1, ...) with, for each, its input to a bypass and its contribution, so the
engine can run the model block by block, swap modules, and count parameters.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from subfit_core.engine.interfaces import Submodule
from subfit_core.errors import SubFitError


class Adapter:
    name = "adapter"
    architectures: tuple[str, ...] = ()
    # An object with submodule(model, layer, kind) -> nn.Module, install(model, layer, kind, bypass)
    # and finalize(model), defined in a module that imports torch only: either that module itself or
    # an instance of a class defined there whose repr() rebuilds it. The module is copied into every
    # saved model's modeling file, so the model loads where SubFit is not installed; the adapter
    # should use it too.
    layout: Any = None
    kinds: tuple[str, ...] = ("attn", "ffn")  # the submodules of a layer, in residual-stream order
    stream_bypasses = False  # True: the layout feeds a bypass with ``reads_stream`` the residual stream, not the pre-norm's output

    def __init__(self, model: nn.Module):
        self.model = model

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return type(model).__name__ in cls.architectures

    # --- structure
    def submodules(self) -> list[Submodule]:
        """Every submodule in residual-stream order: attn_0, ffn_0, attn_1, ..."""
        return [Submodule(layer, kind) for layer in range(self.num_layers) for kind in self.kinds]

    def position(self, sub: Submodule) -> int:
        """Where ``sub`` sits along the residual stream (its index in ``submodules()``)."""
        return sub.layer * len(self.kinds) + self.kinds.index(sub.kind)

    @property
    def num_layers(self) -> int:
        raise NotImplementedError

    @property
    def hidden_size(self) -> int:
        raise NotImplementedError

    def module(self, sub: Submodule) -> nn.Module:
        """The module currently computing ``sub`` (the original, or a bypass)."""
        raise NotImplementedError

    def replace(self, sub: Submodule, module: nn.Module) -> None:
        """Swap the module computing ``sub`` (a bypass, or the original to restore it)."""
        raise NotImplementedError

    def finalize(self) -> None:
        """After surgery: fix up what depends on which attentions remain (KV-cache indices)."""

    # --- piecewise execution
    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def context(self, hidden: torch.Tensor) -> Any:
        """Whatever every submodule call needs for this batch shape (positions, causal mask)."""
        raise NotImplementedError

    def bypass_input(self, sub: Submodule, hidden: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def apply(self, sub: Submodule, module: nn.Module, x: torch.Tensor, ctx: Any) -> torch.Tensor:
        """Contribution of ``module`` standing at ``sub`` given its bypass input ``x``."""
        raise NotImplementedError

    def contribution(self, sub: Submodule, hidden: torch.Tensor, ctx: Any, module: nn.Module | None = None) -> torch.Tensor:
        """What ``module`` (default: the one standing at ``sub``) adds to the residual stream ``hidden``."""
        module = self.module(sub) if module is None else module
        x = hidden if getattr(module, "reads_stream", False) else self.bypass_input(sub, hidden)
        return self.apply(sub, module, x, ctx)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    # --- what fitters may change
    def fold_output(self, sub: Submodule, module: nn.Module, t: torch.Tensor) -> nn.Module:
        """A copy of ``module`` (the original at ``sub``) whose contribution is the original's times T
        (tokens as rows), with the same structure and shapes; a clear error where the family cannot."""
        raise SubFitError(f"{sub}: {type(self).__name__} cannot fold a linear map into a submodule's output")

    def ffn_width(self, layer: int) -> int:
        """The hidden width of a dense FFN standing for layer ``layer``'s FFN (what a token runs)."""
        raise NotImplementedError

    # --- accounting
    def param_count(self, sub: Submodule) -> int:
        """Parameters of the original submodule at ``sub``, its pre-norm included (what removing it saves)."""
        raise NotImplementedError

    def input_params(self, sub: Submodule) -> int:
        """Parameters a bypass at ``sub`` keeps to compute its input (the pre-norm); 0 if none."""
        return 0

    def layer_param_count(self, layer: int) -> int:
        raise NotImplementedError

    def active_param_count(self, sub: Submodule) -> int:
        """Parameters one token runs through at ``sub`` (fewer than ``param_count`` in a mixture of experts)."""
        return self.param_count(sub)

    def kv_bytes_per_token(self, kept: list[int]) -> int:
        """KV-cache bytes per token of context when the attentions of layers ``kept`` remain."""
        raise NotImplementedError
