"""Shared fixtures: tiny random models of each supported architecture, a real (tiny) tokenizer,
and WikiText-2 paths. Nothing is downloaded."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2"
WIKI_VALID = SHARED / "wiki.valid.tokens"
WIKI_TEST = SHARED / "wiki.test.tokens"

logging.getLogger("torchao").setLevel(logging.ERROR)

# Generated calibration text is cached per user (pipeline/calib_cache.py): tests keep theirs in a
# directory of their own, never in the user's cache (set PRUNEFIT_CACHE_DIR to share one on purpose).
if "PRUNEFIT_CACHE_DIR" not in os.environ:
    _OWN_CACHE = tempfile.mkdtemp(prefix="prunefit-test-cache-")
    os.environ["PRUNEFIT_CACHE_DIR"] = _OWN_CACHE
else:
    _OWN_CACHE = None


# Under `make test` both cores already run a test each (pytest-xdist): a pipeline's second export
# in a child process would only contend with the other worker. tests/pipeline/test_pipeline.py's
# test_prunes_exports_and_fits and tests/pipeline/test_exporting.py run the exports side by side.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("PRUNEFIT_SERIAL_EXPORT", "1")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """The session's own calibration cache goes with it (each xdist worker has one)."""
    if _OWN_CACHE is not None:
        shutil.rmtree(_OWN_CACHE, ignore_errors=True)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The slow end-to-end tests first. `make test` runs on two xdist workers, each handed the next
    test as it finishes one: started first, the longest tests (the default model end to end, ~15
    minutes on CI) overlap the many short ones instead of running alone at the end."""
    items.sort(key=lambda item: (item.get_closest_marker("slow") is None, "test_e2e" not in item.nodeid))


# Tiny configs per architecture: GQA everywhere (4 query heads / 2 KV heads).
_COMMON = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=2048,
    vocab_size=512,
)
TINY_CONFIGS: dict[str, dict] = {
    "llama": dict(model_type="llama", tie_word_embeddings=True),
    "mistral": dict(model_type="mistral", sliding_window=None),
    "qwen2": dict(model_type="qwen2", tie_word_embeddings=True),
    "qwen3": dict(model_type="qwen3", head_dim=16, tie_word_embeddings=True),
    "phi3": dict(model_type="phi3", pad_token_id=0),
    "gemma": dict(model_type="gemma", head_dim=16),
    "gemma3_text": dict(model_type="gemma3_text", head_dim=16, sliding_window=16, layer_types=None),
}


# Wider tiny shapes, one place for every test that needs room to prune (named by what they are for).
PRUNE_WIDE = dict(
    hidden_size=256, intermediate_size=768, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4
)
GQA_WIDE = dict(
    hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4
)
ENFORCE_WIDE = dict(
    hidden_size=512, intermediate_size=2048, num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=4
)
QUANT_WIDE = dict(
    hidden_size=256, intermediate_size=1024, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2
)


def default_model_shape():  # -> targets.budget.ModelShape
    """SmolLM2-135M's shape (the default model) on the meta device: no weights needed."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from targets.budget import model_shape

    cfg = LlamaConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, tie_word_embeddings=True,
    )  # fmt: skip
    with torch.device("meta"):
        return model_shape(LlamaForCausalLM(cfg))


def tiny_model(arch: str = "llama", seed: int = 0, **overrides: object) -> torch.nn.Module:
    spec = dict(TINY_CONFIGS[arch])
    model_type = spec.pop("model_type")
    kwargs = {**_COMMON, **spec, **overrides}
    if kwargs.get("layer_types", 1) is None:
        kwargs.pop("layer_types")
    config = AutoConfig.for_model(model_type, **kwargs)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    model.requires_grad_(False)
    return model


@pytest.fixture(scope="session")
def wiki_valid() -> Path:
    if not WIKI_VALID.is_file():
        pytest.skip(f"WikiText-2 not found at {WIKI_VALID} (../shared/data beside the checkout)")
    return WIKI_VALID


@pytest.fixture(scope="session")
def wiki_test() -> Path:
    if not WIKI_TEST.is_file():
        pytest.skip(f"WikiText-2 not found at {WIKI_TEST}")
    return WIKI_TEST


def make_tokenizer() -> PreTrainedTokenizerFast:
    """A real byte-level BPE (vocab 512) trained in-process on WikiText-2 valid (or a built-in text)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    text = (
        WIKI_VALID.read_text(encoding="utf-8")[:400_000]
        if WIKI_VALID.is_file()
        else ("The quick brown fox jumps over the lazy dog. " * 2000)
    )
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512, special_tokens=["<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator([text[i : i + 10_000] for i in range(0, len(text), 10_000)], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>")


@pytest.fixture(scope="session")
def tokenizer() -> PreTrainedTokenizerFast:
    return make_tokenizer()


@pytest.fixture
def make_model_dir(tmp_path: Path, tokenizer: PreTrainedTokenizerFast):
    """Save a tiny model + tokenizer as a HF directory (what users pass as MODEL=...)."""

    def _make(arch: str = "llama", name: str | None = None, **overrides: object) -> Path:
        model = tiny_model(arch, **overrides)
        d = tmp_path / (name or f"tiny-{arch}")
        model.save_pretrained(d, safe_serialization=True)
        tokenizer.save_pretrained(d)
        return d

    return _make


def run_tiny_pipeline(base: Path, profile: Path, tokenizer: PreTrainedTokenizerFast, wiki_valid: Path,
                      wiki_test: Path) -> Path:  # fmt: skip
    """The whole pipeline on the tiny Llama with ``profile``, WikiText calibration; returns the out dir."""
    from pipeline.data import DataConfig
    from pipeline.run import EvalConfig, RunConfig, run_pipeline

    model_dir = base / "tiny"
    tiny_model("llama").save_pretrained(model_dir, safe_serialization=True)
    tokenizer.save_pretrained(model_dir)
    cfg = RunConfig(
        target=str(profile),
        model=str(model_dir),
        out_dir=base / "out",
        calib=DataConfig(source=str(wiki_valid), num_samples=4, seq_len=64),
        eval=EvalConfig(source=str(wiki_test), num_samples=2, seq_len=64),
    )
    run_pipeline(cfg)
    return base / "out"
