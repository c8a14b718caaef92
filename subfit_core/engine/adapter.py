"""Model adapters: where a model family keeps its attention and FFN, and how to run them piecewise.

An adapter turns a Hugging Face causal LM into a sequence of submodules along the residual stream
(attn_0, ffn_0, attn_1, ...) with, for each, its input to a bypass and its contribution, so the
engine can run the model block by block, swap modules, and count parameters.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import torch
from torch import nn

from subfit_core.engine.interfaces import Submodule


class Adapter:
    name = "adapter"
    architectures: tuple[str, ...] = ()
    # A module that imports torch only and defines submodule(model, layer, kind) -> nn.Module,
    # install(model, layer, kind, bypass) and finalize(model). It is copied into every saved model's
    # modeling file, so the model loads where SubFit is not installed; the adapter should use it too.
    layout: ModuleType | None = None

    def __init__(self, model: nn.Module):
        self.model = model

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return type(model).__name__ in cls.architectures

    # --- structure
    def submodules(self) -> list[Submodule]:
        return [Submodule(layer, kind) for layer in range(self.num_layers) for kind in ("attn", "ffn")]

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
        module = self.module(sub) if module is None else module
        return self.apply(sub, module, self.bypass_input(sub, hidden), ctx)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
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

    def kv_bytes_per_token(self, kept_attention: int) -> int:
        raise NotImplementedError
