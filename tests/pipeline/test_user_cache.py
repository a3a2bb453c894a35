"""What the user cache keeps across targets besides calibration text: the dense model's measurements
(pipeline/memo.py) and a GGUF's fp32 conversion (pipeline/model.py)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from pipeline import calib_cache, memo
from pipeline import model as model_mod
from pipeline.memo import Memo


@pytest.fixture
def own_cache(tmp_path: Path, monkeypatch) -> Path:
    monkeypatch.setenv("PRUNEFIT_CACHE_DIR", str(tmp_path / "cache"))
    calib_cache._warned.clear()
    return tmp_path / "cache"


def test_a_measurement_is_remembered_per_model_text_and_settings(own_cache: Path, monkeypatch, caplog) -> None:
    calls: list[float] = []

    def measure(value: float = 12.5):
        def run() -> float:
            calls.append(value)
            return value

        return run

    windows = torch.arange(24).view(3, 8)
    m = Memo("digest-a")
    assert m.value("perplexity (dense)", windows, measure(), batch_size=4) == 12.5
    assert m.value("perplexity (dense)", windows, measure(99.0), batch_size=4) == 12.5  # another target: reused
    assert len(calls) == 1
    # anything that shapes the number measures again: other text, settings, model, what is measured
    assert m.value("perplexity (dense)", windows + 1, measure(13.0), batch_size=4) == 13.0
    assert m.value("perplexity (dense)", windows, measure(14.0), batch_size=2) == 14.0
    assert Memo("digest-b").value("perplexity (dense)", windows, measure(15.0), batch_size=4) == 15.0
    assert m.value("simulated onnxruntime int8w + fp32 embedding", windows, measure(16.0), batch_size=4) == 16.0
    assert len(calls) == 5
    # --force measures again and replaces the entry
    assert Memo("digest-a", force=True).value("perplexity (dense)", windows, measure(12.75), batch_size=4) == 12.75
    assert m.value("perplexity (dense)", windows, measure(0.5), batch_size=4) == 12.75 and len(calls) == 6
    entries = list((own_cache / "measurements").iterdir())
    assert len(entries) == 5 and all(p.suffix == ".json" for p in entries)  # no temp files left
    # prunefit's measuring code is part of the key: a change to it measures again
    monkeypatch.setattr(memo, "_code", lambda: "other code")
    assert m.value("perplexity (dense)", windows, measure(17.0), batch_size=4) == 17.0 and len(calls) == 7
    monkeypatch.undo()
    monkeypatch.setenv("PRUNEFIT_CACHE_DIR", str(own_cache))
    # a corrupt or mismatched entry is measured again, with a warning
    key = m.key("perplexity (dense)", windows, {"batch_size": 4})
    (own_cache / "measurements" / f"{key}.json").write_text("{not json")
    with caplog.at_level(logging.WARNING):
        assert m.value("perplexity (dense)", windows, measure(18.0), batch_size=4) == 18.0
    assert "not valid" in caplog.text and len(calls) == 8
    (own_cache / "measurements" / f"{key}.json").write_text(json.dumps({"key": "another", "value": 3.0}))
    assert m.value("perplexity (dense)", windows, measure(19.0), batch_size=4) == 19.0 and len(calls) == 9


def test_an_unwritable_cache_measures_and_says_so_once(tmp_path: Path, monkeypatch, caplog) -> None:
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the cache directory should be")
    monkeypatch.setenv("PRUNEFIT_CACHE_DIR", str(blocked))
    calib_cache._warned.clear()
    calls = []
    with caplog.at_level(logging.WARNING):
        for _ in range(3):
            assert Memo("d").value("perplexity (dense)", torch.ones(2, 4), lambda: calls.append(1) or 7.0) == 7.0
    assert len(calls) == 3 and caplog.text.count("cannot write measurements") == 1


def test_a_gguf_is_converted_once_per_content(own_cache: Path, tmp_path: Path, tokenizer, monkeypatch, caplog) -> None:
    """transformers' GGUF loading is stood in for (a tiny model + tokenizer, counted): the second
    load reads the cached safetensors, weights and tokens identical; other content or --force
    converts again; a damaged entry is converted again with a warning."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tests.conftest import tiny_model as make_tiny

    tiny_model = make_tiny("llama")
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF stand-in, version 1")
    converted = []
    real_model, real_tok = AutoModelForCausalLM.from_pretrained, AutoTokenizer.from_pretrained

    def fake_model(path, *args, **kwargs):
        if "gguf_file" in kwargs:
            converted.append(kwargs["gguf_file"])
            return tiny_model
        return real_model(path, *args, **kwargs)

    def fake_tok(path, *args, **kwargs):
        return tokenizer if "gguf_file" in kwargs else real_tok(path, *args, **kwargs)

    monkeypatch.setattr(model_mod.AutoModelForCausalLM, "from_pretrained", fake_model)
    monkeypatch.setattr(model_mod.AutoTokenizer, "from_pretrained", fake_tok)
    monkeypatch.setattr(model_mod, "load_config", lambda *a, **k: tiny_model.config)
    first = model_mod.load_model(gguf)
    second = model_mod.load_model(gguf)
    assert converted == ["m.gguf"] and second.digest == first.digest == calib_cache.content_digest(gguf)
    sd = second.model.state_dict()
    assert all(torch.equal(v, sd[k]) for k, v in tiny_model.state_dict().items())
    text = "the cache keeps the tokenizer too"
    assert second.tokenizer(text).input_ids == tokenizer(text).input_ids
    model_mod.load_model(gguf, force=True)
    assert len(converted) == 2
    gguf.write_bytes(b"GGUF stand-in, version 2")  # other content: its own entry
    model_mod.load_model(gguf)
    assert len(converted) == 3 and len(list((own_cache / "models").iterdir())) == 2
    entry = model_mod._converted_dir(calib_cache.content_digest(gguf))
    (entry / "model.safetensors").write_bytes(b"truncated")
    with caplog.at_level(logging.WARNING):
        model_mod.load_model(gguf)
    assert len(converted) == 4 and "unreadable" in caplog.text
    model_mod.load_model(gguf, cache=False)
    assert len(converted) == 5
