"""A saved model loads right in standard tools, or not at all: transformers with
trust_remote_code rebuilds it from the modeling file in the folder alone (no SubFit on the path)
with the same logits as load_compressed, for every family and every built-in bypass kind; without
trust_remote_code it is refused; save_pretrained round-trips it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from test_bypass_kinds import DiagonalBypass, DiagonalPlugin, with_plugin  # noqa: E402
from test_surgery import CONFIGS, D, make_model, tiny_tokenizer  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from subfit_core import load_compressed  # noqa: E402
from subfit_core.artifact import folder  # noqa: E402
from subfit_core.artifact.rebuild import set_child  # noqa: E402
from subfit_core.engine.bypass import LinearBypass, LowRankBypass, ZeroBypass  # noqa: E402
from subfit_core.engine.interfaces import Submodule  # noqa: E402
from subfit_core.engine.lowrank import FactoredLinear  # noqa: E402
from subfit_core.engine.models import find_adapter  # noqa: E402
from subfit_core.engine.surgery import apply_bypasses, records  # noqa: E402
from subfit_core.plugins import get_plugins  # noqa: E402
from subfit_plugins.fitters.linear_patch import PatchBypass  # noqa: E402
from subfit_plugins.fitters.shared_basis import SharedBasisBypass  # noqa: E402
from subfit_plugins.fitters.streamline import MLPBypass  # noqa: E402

IDS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(5))


def every_kind(seed: int = 2) -> dict:
    """One model's worth of bypasses using every built-in kind, a shared basis across two layers included."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g) * 0.1

    basis = torch.nn.Parameter(r(6, D), requires_grad=False)
    return {
        Submodule(0, "attn"): LowRankBypass(r(4, D), r(D, 4), r(D)),
        Submodule(0, "ffn"): LinearBypass(r(D, D), r(D)),
        Submodule(1, "attn"): MLPBypass(r(16, D), r(16, D), r(D, 16)),
        Submodule(1, "ffn"): SharedBasisBypass(basis, r(D, 6), r(D), "shared-ffn"),
        Submodule(2, "attn"): ZeroBypass(),
        Submodule(3, "ffn"): SharedBasisBypass(basis, r(D, 6), None, "shared-ffn"),
    }


def factor(model, layer: int, kind: str, path: str, rank: int, seed: int) -> dict | None:
    """Replace one kept linear (``path``, else the family's first linear there, e.g. Phi-3's fused
    ones) by random low-rank factors; returns its config record (None: no linear, as in an MoE block)."""
    g = torch.Generator().manual_seed(seed)
    parent = find_adapter(get_plugins(), model).layout.submodule(model, layer, kind)
    linears = [name for name, m in parent.named_modules() if isinstance(m, torch.nn.Linear)]
    if not linears:
        return None
    path = path if path in linears else linears[0]
    linear = parent.get_submodule(path)
    f = FactoredLinear(torch.randn(rank, linear.in_features, generator=g) * 0.1,
                       torch.randn(linear.out_features, rank, generator=g) * 0.1)
    set_child(parent, path, f)
    return {"layer": layer, "kind": kind, "linear": path, **f.spec()}


def stream_patch(seed: int = 3) -> dict:
    """A deleted layer whose cut is patched on the residual stream itself (no pre-norm in front)."""
    g = torch.Generator().manual_seed(seed)
    return {Submodule(1, "attn"): ZeroBypass(), Submodule(1, "ffn"): PatchBypass(torch.eye(D) + 0.1 * torch.randn(D, D, generator=g))}


def save_every_kind(arch: str, out, bypasses: dict | None = None):
    model = make_model(arch)
    patched = bypasses is not None
    bypasses = every_kind() if bypasses is None else bypasses
    apply_bypasses(find_adapter(get_plugins(), model), bypasses)
    factored = [] if patched else [
        r for r in (factor(model, 2, "ffn", "down_proj", 5, 7), factor(model, 3, "attn", "q_proj", 3, 8)) if r]
    folder.save_compressed(model, tiny_tokenizer(), records(bypasses), out, {"name": "test"}, {}, factored)
    with torch.no_grad():
        return model(input_ids=IDS).logits


# The start of a script run in a fresh interpreter that cannot import SubFit: only torch,
# transformers and the folder's code.
NO_SUBFIT = textwrap.dedent('''
    import importlib.abc, json, sys
    class NoSubFit(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("subfit_core", "subfit_plugins", "subfit_strategies"):
                raise ImportError(f"{name} must not be needed")
    sys.meta_path.insert(0, NoSubFit())
''')
ISOLATED = NO_SUBFIT + textwrap.dedent('''
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM
    folders, ids, out = json.loads(sys.argv[1]), torch.tensor(json.loads(sys.argv[2])), sys.argv[3]
    logits = {}
    for i, folder in enumerate(folders):
        model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
        with torch.no_grad():
            logits[str(i)] = model(input_ids=ids).logits.contiguous()
    assert not [m for m in sys.modules if m.startswith("subfit")], "SubFit was imported"
    save_file(logits, out)
''')


def run_isolated(folders, tmp_path) -> dict:
    out = tmp_path / "logits.safetensors"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-I", "-c", ISOLATED, json.dumps([str(f) for f in folders]),
                           json.dumps(IDS.tolist()), str(out)], capture_output=True, text=True, cwd=tmp_path,
                          env={**env, "HF_HUB_OFFLINE": "1"}, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return load_file(out)


def test_standard_tools_load_every_family_and_kind_without_subfit(tmp_path):
    folders, expected, names = [], [], []
    for arch in sorted(CONFIGS):
        for name, bypasses in ((arch, None), (f"{arch}-patch", stream_patch())):
            out = tmp_path / name
            before = save_every_kind(arch, out, bypasses)
            loaded, _ = load_compressed(out)
            with torch.no_grad():
                ours = loaded(input_ids=IDS).logits
            assert torch.equal(ours, before), name
            folders.append(out)
            expected.append(ours)
            names.append(name)
    got = run_isolated(folders, tmp_path)
    for i, name in enumerate(names):
        assert torch.allclose(got[str(i)], expected[i], atol=1e-5, rtol=0), name


def test_artifact_describes_itself(tmp_path):
    save_every_kind("llama", tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["model_type"] == "subfit" and config["architectures"] == ["SubFitForCausalLM"]
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_subfit.SubFitForCausalLM"
    assert config["subfit"]["base"] == {"model_type": "llama", "architecture": "LlamaForCausalLM", "config_class": "LlamaConfig"}
    code = (tmp_path / "m" / "modeling_subfit.py").read_text()
    assert not [line for line in code.splitlines() if line.lstrip().startswith(("import subfit", "from subfit"))]
    card = (tmp_path / "m" / "README.md").read_text()
    assert "trust_remote_code=True" in card
    assert "| 2 | **removed** | kept (factored: down_proj r5) |" in card
    assert "| 0 | **lowrank bypass** rank 4 | **linear bypass** |" in card


def test_loading_without_trust_remote_code_is_refused(tmp_path):
    save_every_kind("llama", tmp_path / "m")
    with pytest.raises(ValueError, match="trust_remote_code"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "m", trust_remote_code=False)


def test_save_pretrained_round_trip_keeps_logits_and_one_shared_basis(tmp_path):
    before = save_every_kind("qwen3", tmp_path / "m")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "m", trust_remote_code=True).eval()
    model.save_pretrained(tmp_path / "again")
    assert (tmp_path / "again" / "modeling_subfit.py").is_file()
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "again", trust_remote_code=True).eval()
    with torch.no_grad():
        assert torch.allclose(again(input_ids=IDS).logits, before, atol=1e-5, rtol=0)
    with safe_open(tmp_path / "again" / "model.safetensors", "pt") as f:
        assert [k for k in f.keys() if k.endswith(".basis")] == ["model.layers.1.mlp.basis"]
    # and SubFit reads what transformers wrote
    ours, _ = load_compressed(tmp_path / "again")
    with torch.no_grad():
        assert torch.allclose(ours(input_ids=IDS).logits, before, atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", CONFIGS)
def test_generation_with_dynamic_and_static_cache_and_left_padding(tmp_path, arch):
    """Standard ``generate`` on the saved folder: cached, static-cache (each kept attention keeps
    its own cache type and window; the prompt is longer than Gemma's window) and left-padded."""
    save_every_kind(arch, tmp_path / "m")
    ours, _ = load_compressed(tmp_path / "m")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "m", trust_remote_code=True).eval()
    prompt = torch.tensor([[5, 17, 42, 9, 77, 3]])
    common = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    reference = ours.generate(prompt, **common)
    assert torch.equal(model.generate(prompt, **common), reference)
    assert torch.equal(model.generate(prompt, cache_implementation="static", **common), reference)
    # a batch with the short prompt left-padded gives each row's own next-token logits
    short = torch.tensor([[11, 12, 13]])
    batch = torch.tensor([[5, 17, 42, 9, 77, 3], [0, 0, 0, 11, 12, 13]])
    mask = torch.tensor([[1] * 6, [0, 0, 0, 1, 1, 1]])
    with torch.no_grad():
        rows = model(input_ids=batch, attention_mask=mask).logits[:, -1]
        alone = [model(input_ids=p).logits[:, -1] for p in (prompt, short)]
    for row, single in zip(rows, alone):
        assert torch.allclose(row, single[0], atol=1e-5, rtol=0)


def test_plugin_bypass_kind_travels_in_the_modeling_file(tmp_path):
    model = make_model("llama")
    g = torch.Generator().manual_seed(1)
    bypasses = {Submodule(1, "ffn"): DiagonalBypass(torch.randn(D, generator=g))}
    apply_bypasses(find_adapter(get_plugins(), model), bypasses)
    folder.save_compressed(model, tiny_tokenizer(), records(bypasses), tmp_path / "m", {}, {})
    with torch.no_grad():
        before = model(input_ids=IDS).logits
    assert "class DiagonalBypass(Bypass)" in (tmp_path / "m" / "modeling_subfit.py").read_text()
    got = run_isolated([tmp_path / "m"], tmp_path)
    assert torch.allclose(got["0"], before, atol=1e-5, rtol=0)
    loaded, _ = load_compressed(tmp_path / "m", plugins=with_plugin(DiagonalPlugin()))
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=IDS).logits, before)


def test_push_to_hub_writes_what_save_pretrained_writes(tmp_path, monkeypatch):
    """push_to_hub saves through save_pretrained into a temporary folder, then uploads it; the
    upload is redirected to a local folder (no network)."""
    import shutil
    from types import SimpleNamespace

    from transformers.utils import hub

    before = save_every_kind("mistral", tmp_path / "m")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "m", trust_remote_code=True).eval()
    remote = tmp_path / "remote"
    monkeypatch.setattr(hub, "hf_api", lambda: SimpleNamespace(create_repo=lambda repo_id, **kw: SimpleNamespace(repo_id=repo_id)))
    monkeypatch.setattr(hub, "create_and_tag_model_card", lambda *a, **kw: SimpleNamespace(save=lambda path: None))
    monkeypatch.setattr(hub.PushToHubMixin, "_upload_modified_files",
                        lambda self, folder, repo_id, **kw: shutil.copytree(folder, remote))
    model.push_to_hub("someone/compressed")
    assert {"config.json", "model.safetensors", "modeling_subfit.py"} <= {p.name for p in remote.iterdir()}
    pushed = AutoModelForCausalLM.from_pretrained(remote, trust_remote_code=True).eval()
    with torch.no_grad():
        assert torch.allclose(pushed(input_ids=IDS).logits, before, atol=1e-5, rtol=0)


def test_automodel_gives_the_compressed_base_model(tmp_path):
    """AutoModel (what vLLM's Transformers backend builds) rebuilds the same structure without the head."""
    from transformers import AutoModel

    save_every_kind("qwen2", tmp_path / "m")
    causal = AutoModelForCausalLM.from_pretrained(tmp_path / "m", trust_remote_code=True).eval()
    base = AutoModel.from_pretrained(tmp_path / "m", trust_remote_code=True).eval()
    assert type(base).__name__ == "SubFitModel"
    with torch.no_grad():
        assert torch.equal(base(input_ids=IDS).last_hidden_state, causal.model(input_ids=IDS).last_hidden_state)


def test_a_bypass_class_that_cannot_travel_is_refused_at_save_time(tmp_path):
    """A class whose source needs a module-level name the modeling file lacks fails when saving,
    with nothing written, instead of in a user's forward."""
    from test_bypass_kinds import DiagonalBypass

    from subfit_core.errors import SubFitError

    class Scaled(DiagonalBypass):
        kind = "scaled"

        def forward(self, x):
            return helper_not_in_the_file(x) * self.scale  # noqa: F821

    model = make_model("llama")
    bypasses = {Submodule(1, "ffn"): Scaled(torch.ones(D))}
    apply_bypasses(find_adapter(get_plugins(), model), bypasses)
    with pytest.raises(SubFitError, match="modeling_subfit.py does not work .*NameError"):
        folder.save_compressed(model, tiny_tokenizer(), records(bypasses), tmp_path / "m", {}, {})
    assert not (tmp_path / "m").exists()
