"""The plugin tutorial's code is real: docs/writing-plugins.md's GPT-2 layout and adapter, written
out as files exactly as printed, replace, restore and save a GPT-2 model that transformers loads
back without SubFit."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from test_export import IDS, run_isolated  # noqa: E402
from test_surgery import tiny_tokenizer  # noqa: E402

from subfit_core import load_compressed  # noqa: E402

from subfit_core.artifact import folder  # noqa: E402
from subfit_core.engine.bypass import LinearBypass, LowRankBypass, ZeroBypass  # noqa: E402
from subfit_core.engine.interfaces import Submodule  # noqa: E402
from subfit_core.engine.surgery import apply_bypasses, records  # noqa: E402

TUTORIAL = Path(__file__).resolve().parents[1] / "docs" / "writing-plugins.md"


def tutorial_files() -> dict[str, str]:
    """``my_plugin/NAME.py`` -> the python block printed right after that name."""
    text = TUTORIAL.read_text()
    return {m.group(1): m.group(2) for m in re.finditer(r"^`my_plugin/(\w+\.py)`[^\n]*\n(?:[^\n]*\n)*?```python\n(.*?)```",
                                                          text, re.M | re.S)}


@pytest.fixture()
def gpt2_plugin(tmp_path, monkeypatch):
    files = tutorial_files()
    assert {"gpt2_layout.py", "gpt2.py"} <= set(files)
    package = tmp_path / "my_plugin"
    package.mkdir()
    (package / "__init__.py").write_text("")
    for name in ("gpt2_layout.py", "gpt2.py"):
        (package / name).write_text(files[name])
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in [m for m in sys.modules if m.startswith("my_plugin")]:
        monkeypatch.delitem(sys.modules, name)
    from my_plugin.gpt2 import GPT2Adapter

    return GPT2Adapter


def test_tutorial_gpt2_adapter_compresses_saves_and_loads_everywhere(gpt2_plugin, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    from subfit_core.hookspecs import hookimpl
    from subfit_core.plugins import Plugins, make_plugin_manager

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=4, n_head=4, vocab_size=128, n_positions=64,
                                       bos_token_id=0, eos_token_id=0)).eval()
    adapter = gpt2_plugin(model)
    with torch.no_grad():
        dense = model(input_ids=IDS).logits
    g = torch.Generator().manual_seed(1)
    bypasses = {Submodule(0, "attn"): LowRankBypass(torch.randn(4, 32, generator=g) * 0.1, torch.randn(32, 4, generator=g) * 0.1),
                Submodule(1, "ffn"): LinearBypass(torch.randn(32, 32, generator=g) * 0.1),
                Submodule(2, "attn"): ZeroBypass()}
    apply_bypasses(adapter, bypasses)
    with torch.no_grad():
        before = model(input_ids=IDS).logits
    assert not torch.allclose(before, dense)
    prompt = IDS[:1, :6]
    out = model.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
    seq = prompt
    for _ in range(6):  # the cache with layer 0's attention removed gives the uncached tokens
        seq = torch.cat([seq, model(input_ids=seq, use_cache=False).logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(out, seq)

    folder.save_compressed(model, tiny_tokenizer(), records(bypasses), tmp_path / "gpt2", {}, {},
                             layout=gpt2_plugin.layout)
    got = run_isolated([tmp_path / "gpt2"], tmp_path)
    assert torch.allclose(got["0"], before, atol=1e-5, rtol=0)

    class Plugin:
        @hookimpl
        def subfit_model_adapters(self):
            return {"gpt2": gpt2_plugin}

    loaded, _ = load_compressed(tmp_path / "gpt2", plugins=Plugins(make_plugin_manager(extra_plugins=(Plugin(),))))
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=IDS).logits, before)
    for sub in bypasses:  # restore puts every original back
        adapter.replace(sub, adapter.originals[sub])
    adapter.finalize()
    with torch.no_grad():
        assert torch.equal(model(input_ids=IDS).logits, dense)
