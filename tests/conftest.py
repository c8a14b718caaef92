"""Shared test fixtures: tiny random causal LMs and random-token windows.

Every test runs offline and without progress bars (set here, at import, before any test module
imports transformers or subfit).

Fixtures
--------
``tiny_model``      a factory ``tiny_model(arch="llama", seed=0, **config_overrides)`` returning a
                    tiny, randomly initialised causal LM in eval mode (hidden 32, FFN 64, 4 layers,
                    4 heads / 2 KV heads of dim 8, vocab 128). ``arch`` is one of ``TINY_ARCHS``. The same
                    ``arch``/``seed``/overrides always give the same weights, and building a model does
                    not disturb the global torch RNG. Each call builds a new model (safe to modify).
``random_windows``  a factory ``random_windows(calib=8, scoring=4, heldout=2, seq_len=16, vocab=128,
                    seed=0)`` returning a ``subfit_core.engine.corpus.Windows`` of random token ids.

Both fixtures are session-scoped factories, so fixtures of any scope can use them.

``one_thread``      runs a test with ``torch.set_num_threads(1)`` (restored afterwards). Tiny models gain
                    nothing from intra-op threads, and on a busy machine OpenMP threads waiting for each
                    other make every op ~100x slower. Use as ``pytestmark = pytest.mark.usefixtures("one_thread")``.
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["SUBFIT_PROGRESS"] = "0"

import pytest  # noqa: E402
import torch  # noqa: E402

TINY_SHAPE = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=128, max_position_embeddings=128,
                  head_dim=8)  # hidden / heads, as Llama derives it; Qwen3 would otherwise default to 128
TOKENS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)  # inside the tiny vocabulary
# Gemma: a global attention first and last, sliding windows of 4 tokens between (test sequences are longer)
GEMMA = dict(layer_types=["full_attention", "sliding_attention", "sliding_attention", "full_attention"], sliding_window=4)
# Each supported family: (config class name in transformers, what its tiny config adds to TINY_SHAPE)
TINY_FAMILIES = {
    "llama": ("LlamaConfig", {}),
    "mistral": ("MistralConfig", {}),
    "qwen2": ("Qwen2Config", {}),
    "qwen3": ("Qwen3Config", {}),
    "phi3": ("Phi3Config", TOKENS),  # fused qkv_proj and gate_up_proj
    "gemma2": ("Gemma2Config", {**GEMMA, "final_logit_softcapping": 30.0, "attn_logit_softcapping": 50.0}),
    "gemma3": ("Gemma3TextConfig", GEMMA),
    "olmo2": ("Olmo2Config", TOKENS),  # norms after the submodules, none before
    "mixtral": ("MixtralConfig", dict(num_local_experts=4, num_experts_per_tok=2)),
    "qwen3_moe": ("Qwen3MoeConfig", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16)),
}
TINY_ARCHS = tuple(TINY_FAMILIES)


def tiny_config(arch: str, **overrides):
    """The tiny config of family ``arch`` (see ``TINY_FAMILIES``); ``overrides`` win."""
    import transformers

    if arch not in TINY_FAMILIES:
        raise ValueError(f"tiny_model: unknown arch {arch!r}; one of {', '.join(TINY_ARCHS)}")
    name, extra = TINY_FAMILIES[arch]
    return getattr(transformers, name)(**{**TINY_SHAPE, **extra, **overrides})


def build_tiny_model(arch: str = "llama", seed: int = 0, **overrides):
    """A tiny randomly initialised causal LM (see the module docstring); ``overrides`` go to the config."""
    from transformers import AutoModelForCausalLM

    cfg = tiny_config(arch, **overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(cfg)
    return model.eval()


@torch.no_grad()
def piecewise_logits(adapter, ids: torch.Tensor) -> torch.Tensor:
    """The logits of ``ids`` computed the engine's way: embed, then every submodule's contribution
    added to the residual stream in order, then the head (must equal the model's own forward)."""
    h = adapter.embed(ids)
    ctx = adapter.context(h)
    for sub in adapter.submodules():
        h = h + adapter.contribution(sub, h, ctx)
    return adapter.logits(h)


def build_random_windows(calib: int = 8, scoring: int = 4, heldout: int = 2, seq_len: int = 16, vocab: int = 128,
                         seed: int = 0):
    """``Windows`` of uniformly random token ids: calib, scoring and heldout of shape (n, seq_len)."""
    from subfit_core.engine.corpus import Windows

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (calib + scoring + heldout, seq_len), generator=g)
    return Windows(calib=ids[:calib], scoring=ids[calib:calib + scoring], heldout=ids[calib + scoring:],
                   source=f"random tokens (seed {seed})")


@pytest.fixture(scope="session")
def tiny_model():
    """Factory: ``tiny_model(arch="llama", seed=0, **config_overrides)`` -> a tiny causal LM in eval mode."""
    return build_tiny_model


@pytest.fixture(scope="session")
def random_windows():
    """Factory: ``random_windows(calib=8, scoring=4, heldout=2, seq_len=16, vocab=128, seed=0)`` -> Windows."""
    return build_random_windows


@pytest.fixture
def one_thread():
    """Run the test with one intra-op torch thread (restored afterwards)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def write_local_model_and_text(folder, seed: int = 1, lines: int = 1500, layers: int = 6, arch: str = "llama"):
    """A tiny model of family ``arch`` saved as a local model directory (``folder/model``, with a word-level tokenizer
    over t0..t127) and a structured text (``folder/text.txt``: each word predicts the next, so
    removals change the loss), for tests that go through ``model=<dir>`` like a user would."""
    import random

    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    overrides = {"layer_types": (TINY_FAMILIES[arch][1]["layer_types"] * layers)[:layers]} if arch.startswith("gemma") else {}
    build_tiny_model(arch, seed=seed, num_hidden_layers=layers, **overrides).save_pretrained(folder / "model")
    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(128)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0").save_pretrained(folder / "model")
    rng = random.Random(0)
    text = [" ".join(f"t{(w + 3 * k) % 120}" for k in range(8)) for w in (rng.randrange(120) for _ in range(lines))]
    (folder / "text.txt").write_text("\n".join(text))  # lines < 40 chars: kept although repeated
    return folder
