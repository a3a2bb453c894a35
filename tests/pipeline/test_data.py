"""Calibration sources: file, directory of .txt/.jsonl, model-generated; windows are seeded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from core.errors import CalibrationError, RuntimeMissingError
from pipeline.data import DataConfig, first_windows, load_windows, read_text, tokenize_windows
from tests.conftest import tiny_model


def test_file_windows_are_seeded_and_fixed_length(wiki_valid: Path, tokenizer) -> None:
    text = read_text(str(wiki_valid))
    a = tokenize_windows(text[:200_000], tokenizer, 8, 64, seed=0, where="wiki")
    b = tokenize_windows(text[:200_000], tokenizer, 8, 64, seed=0, where="wiki")
    c = tokenize_windows(text[:200_000], tokenizer, 8, 64, seed=1, where="wiki")
    assert a.shape == (8, 64) and a.dtype == torch.long
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_directory_of_txt_and_jsonl(tmp_path: Path, tokenizer) -> None:
    (tmp_path / "a.txt").write_text("alpha beta gamma. " * 200)
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps({"text": f"line {i} delta epsilon"}) for i in range(200)))
    (tmp_path / "ignored.bin").write_bytes(b"\x00\x01")
    text = read_text(str(tmp_path))
    assert "alpha" in text and "line 199 delta" in text
    assert tokenize_windows(text, tokenizer, 4, 32, seed=0, where=str(tmp_path)).shape == (4, 32)


def test_bad_jsonl_names_line(tmp_path: Path) -> None:
    p = tmp_path / "bad.jsonl"
    p.write_text('{"text": "ok"}\n{"txt": "missing"}\n')
    with pytest.raises(CalibrationError, match=r"bad.jsonl:2"):
        read_text(str(p))


def test_empty_directory(tmp_path: Path) -> None:
    with pytest.raises(CalibrationError, match=r"no \.txt or \.jsonl"):
        read_text(str(tmp_path))


def test_hf_source_without_datasets_is_a_clear_error() -> None:
    try:
        import datasets  # noqa: F401

        pytest.skip("datasets is installed; the offline error path is what this test covers")
    except ImportError:
        pass
    with pytest.raises(RuntimeMissingError, match="pip install datasets"):
        read_text("hf:wikitext:wikitext-2-raw-v1:train")


def test_generated_calibration_is_seeded(tokenizer) -> None:
    model = tiny_model("llama")
    cfg = DataConfig(source=None, num_samples=3, seq_len=12, seed=5)
    a, b = load_windows(cfg, model, tokenizer), load_windows(cfg, model, tokenizer)
    assert a.shape == (3, 12) and torch.equal(a, b)
    assert not torch.equal(a, load_windows(DataConfig(None, 3, 12, seed=6), model, tokenizer))


def test_first_windows_too_short(tokenizer) -> None:
    with pytest.raises(CalibrationError, match="fewer than one window"):
        first_windows("tiny text", tokenizer, 4, 512, where="eval")
    with pytest.raises(CalibrationError, match="num_samples"):
        DataConfig(num_samples=0)


def bos_tokenizer(tokenizer):
    """The tiny tokenizer with Gemma's convention: a <bos> token prepended to every text."""
    from tokenizers import Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    tok.add_special_tokens(["<bos>"])
    bos = tok.token_to_id("<bos>")
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", bos)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<eos>")


def test_windows_follow_the_tokenizers_bos_convention(tokenizer) -> None:
    from pipeline.data import bos_token_id, generate_samples

    text = "the quick brown fox jumps over the lazy dog. " * 300
    bos_tok = bos_tokenizer(tokenizer)
    bos = bos_token_id(bos_tok)
    assert bos is not None and bos_token_id(tokenizer) is None  # the plain tiny tokenizer adds none
    for windows in (
        tokenize_windows(text, bos_tok, 4, 32, seed=0, where="t"),
        first_windows(text, bos_tok, 4, 32, where="t"),
        generate_samples(tiny_model("gemma3_text", vocab_size=len(bos_tok)), bos_tok, 3, 16, seed=0),
    ):
        assert (windows[:, 0] == bos).all() and windows.shape[1] in (32, 16)
        assert (windows[:, 1:] != bos).all()  # one BOS per window, leading it
    # the text after the BOS is the text's own tokens, in order: the same stream without a BOS tokenizer
    plain = first_windows(text, tokenizer, 4, 32, where="t")
    assert torch.equal(first_windows(text, bos_tok, 4, 32, where="t")[0, 1:], plain.flatten()[:31])
    assert not (plain[:, 0] == bos).all()


def test_generated_text_is_cached_per_model_content(tmp_path: Path, tokenizer, monkeypatch, caplog) -> None:
    """Issue 19.2: generated calibration text is reused by every target and rerun (same model
    content and settings), regenerated with --force or when the entry is corrupt, and a cache that
    cannot be written is reported once while the run goes on."""
    import logging

    import pipeline.data as data
    from pipeline import calib_cache

    monkeypatch.setenv("PRUNEFIT_CACHE_DIR", str(tmp_path / "cache"))
    model = tiny_model("llama")
    calls: list[int] = []
    real = data.generate_samples

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(data, "generate_samples", counting)
    cfg = DataConfig(None, 3, 12, seed=5)
    a = load_windows(cfg, model, tokenizer, "digest-a")
    b = load_windows(cfg, model, tokenizer, "digest-a")  # another target, the same model: reused
    assert torch.equal(a, b) and len(calls) == 1
    load_windows(DataConfig(None, 3, 12, seed=6), model, tokenizer, "digest-a")  # other settings: generated
    load_windows(cfg, model, tokenizer, "digest-b")  # another model's content: generated
    assert len(calls) == 3
    assert torch.equal(load_windows(cfg, model, tokenizer, "digest-a", force=True), a) and len(calls) == 4
    assert len(list((tmp_path / "cache" / "calibration").glob("*.safetensors"))) == 3  # no temp files left
    for f in (tmp_path / "cache" / "calibration").glob("*.safetensors"):
        f.write_bytes(b"not safetensors")  # corrupt every entry
    with caplog.at_level(logging.WARNING):
        assert torch.equal(load_windows(cfg, model, tokenizer, "digest-a"), a)
    assert len(calls) == 5 and "unreadable" in caplog.text
    # an unwritable cache: the run goes on, and says so once
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the cache directory should be")
    monkeypatch.setenv("PRUNEFIT_CACHE_DIR", str(blocked))
    calib_cache._warned.clear()
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        load_windows(cfg, model, tokenizer, "digest-a")
        load_windows(cfg, model, tokenizer, "digest-a")
    assert caplog.text.count("cannot write the calibration cache") == 1 and len(calls) == 7
    assert calib_cache.content_digest(tmp_path / "cache") != calib_cache.content_digest(blocked)


def test_generation_batch_is_wide_unless_its_cache_is_large() -> None:
    from transformers import LlamaConfig

    from pipeline.data import GENERATION_BATCH, GENERATION_KV_BYTES, generation_batch

    smollm2 = LlamaConfig(num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, hidden_size=576)
    assert generation_batch(smollm2, 128) == GENERATION_BATCH == 128  # 46 KiB a token: 0.8 GiB at 128 rows
    # a 7B-class cache (32 layers x 32 KV heads x 128): 1 MiB a token, 144 MiB a row at 128 + 16 tokens
    big = LlamaConfig(num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32, hidden_size=4096)
    rows = generation_batch(big, 128)
    assert rows == 14 and rows * 2**20 * 144 <= GENERATION_KV_BYTES < (rows + 1) * 2**20 * 144


def test_the_whole_calibration_set_is_generated_only_when_pruning_asks(tmp_path: Path, tokenizer, monkeypatch) -> None:
    """Generated text: the precision choice scores on a few windows of their own (always those,
    cached or not); the whole set is generated, or read from the cache, only on ``full()``, and is
    the same text ``load_windows`` makes."""
    from pipeline import data
    from pipeline.data import load_calibration

    monkeypatch.setenv("PRUNEFIT_CACHE_DIR", str(tmp_path / "cache"))
    model = tiny_model("llama", vocab_size=len(tokenizer))
    made: list[tuple[int, int]] = []
    real = data.generate_samples

    def counted(m, t, n, s, seed, b=0):
        made.append((n, seed))
        return real(m, t, n, s, seed, b)

    monkeypatch.setattr(data, "generate_samples", counted)
    cfg = DataConfig(None, 6, 12, seed=3)
    whole = load_windows(cfg, model, tokenizer, None)  # no cache key: generated at once, as before
    assert made == [(6, 3)]
    calib = load_calibration(cfg, model, tokenizer, "digest-a", scoring=2)
    assert made[1:] == [(2, 3 + data.SCORING_SEED_OFFSET)] and calib.head.shape == (2, 12)
    assert torch.equal(calib.at_hand, calib.head)
    assert torch.equal(calib.full(), whole) and made[2:] == [(6, 3)] and torch.equal(calib.at_hand, whole)
    assert torch.equal(calib.full(), whole) and len(made) == 3  # once
    again = load_calibration(cfg, model, tokenizer, "digest-a", scoring=2)  # another target: all cached
    assert torch.equal(again.head, calib.head) and torch.equal(again.full(), whole) and len(made) == 3
    forced = load_calibration(cfg, model, tokenizer, "digest-a", force=True, scoring=2)
    assert torch.equal(forced.full(), whole) and len(made) == 5
    # a file's windows, no cache key, or no more windows than the scoring ones: all at once
    assert load_calibration(cfg, model, tokenizer, None, scoring=2).rest is None and len(made) == 6
    assert load_calibration(cfg, model, tokenizer, "digest-a", scoring=6).rest is None
