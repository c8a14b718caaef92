"""Bypass kinds come from the ``subfit_bypass_kinds`` hook: a plugin's own bypass class saves and
loads back like the built-in ones, and a model saved with a kind nobody registers says so."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from test_surgery import make_model, tiny_tokenizer

from subfit_core import load_compressed
from subfit_core.artifact import folder
from subfit_core.engine.bypass import Bypass, LowRankBypass, build_bypasses
from subfit_core.engine.interfaces import Submodule
from subfit_core.engine.surgery import apply_bypasses, records
from subfit_core.errors import SubFitError
from subfit_core.hookspecs import hookimpl
from subfit_core.plugins import Plugins, get_plugins, make_plugin_manager
from subfit_plugins.adapters.llama import LlamaFamilyAdapter


class DiagonalBypass(Bypass):
    """y = x * s: a per-channel scale, a kind the built-ins do not have."""

    kind = "diagonal"

    def __init__(self, scale: torch.Tensor):
        super().__init__()
        self.scale = nn.Parameter(scale, requires_grad=False)

    def forward(self, x):
        return x * self.scale

    def spec(self):
        return {"kind": self.kind, "dim": self.scale.shape[0]}

    @classmethod
    def empty(cls, spec, dtype, shared):
        return cls(torch.zeros(spec["dim"], dtype=dtype))


class DiagonalPlugin:
    @hookimpl
    def subfit_bypass_kinds(self):
        return {"diagonal": DiagonalBypass}


def with_plugin(plugin) -> Plugins:
    return Plugins(make_plugin_manager(extra_plugins=(plugin,)))


def save_diagonal_model(tmp_path):
    model = make_model("llama")
    g = torch.Generator().manual_seed(1)
    bypasses = {Submodule(1, "ffn"): DiagonalBypass(torch.randn(32, generator=g)),
                Submodule(2, "attn"): LowRankBypass(torch.randn(4, 32, generator=g), torch.randn(32, 4, generator=g))}
    apply_bypasses(LlamaFamilyAdapter(model), bypasses)
    ids = torch.randint(0, 128, (2, 12), generator=g)
    with torch.no_grad():
        before = model(input_ids=ids).logits
    out = tmp_path / "compressed"
    folder.save_compressed(model, tiny_tokenizer(), records(bypasses), out, {"name": "test"}, {})
    return out, ids, before


def test_plugin_bypass_kind_saves_and_loads_with_identical_logits(tmp_path):
    out, ids, before = save_diagonal_model(tmp_path)
    plugins = with_plugin(DiagonalPlugin())
    assert plugins.registries["bypass kind"].entry("diagonal").origin.startswith("plugin ")
    loaded, _ = load_compressed(out, plugins=plugins)
    assert isinstance(loaded.model.layers[1].mlp, DiagonalBypass)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, before)


def test_kind_without_its_plugin_is_a_one_line_error(tmp_path):
    out, _, _ = save_diagonal_model(tmp_path)
    with pytest.raises(SubFitError) as err:
        load_compressed(out)  # only the built-in plugin is installed
    msg = str(err.value)
    assert "\n" not in msg
    assert "unknown bypass kind 'diagonal'" in msg and str(out) in msg
    assert "allowed: linear, lowrank, mlp, patch, shared_basis, zero" in msg


def test_builtin_kinds_come_through_the_hook():
    entries = get_plugins().registries["bypass kind"]
    for kind in ("zero", "linear", "lowrank", "shared_basis", "mlp"):
        cls = entries.get(kind)
        assert cls.kind == kind and entries.entry(kind).origin.startswith("plugin 'builtin'")


def test_kind_registered_under_another_name_is_refused():
    class Misnamed:
        @hookimpl
        def subfit_bypass_kinds(self):
            return {"scale": DiagonalBypass}

    with pytest.raises(SubFitError, match="bypass kind 'scale' is registered to DiagonalBypass, whose kind is 'diagonal'"):
        build_bypasses([{"kind": "scale", "dim": 4}], torch.float32, with_plugin(Misnamed()))


def test_kind_without_empty_names_itself():
    class Bare(Bypass):
        kind = "bare"

    class BarePlugin:
        @hookimpl
        def subfit_bypass_kinds(self):
            return {"bare": Bare}

    with pytest.raises(NotImplementedError, match=r"bypass kind 'bare' \(Bare\) does not define empty"):
        build_bypasses([{"kind": "bare"}], torch.float32, with_plugin(BarePlugin()))
