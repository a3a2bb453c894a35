"""Calibration and evaluation token windows.

Sources, in the order they are tried:
- a text file (``.txt``, ``.tokens``, ...) or a ``.jsonl`` file with a ``text`` field per line;
- a directory of such files (sorted, concatenated);
- ``hf:NAME[:CONFIG[:SPLIT]]``: a Hugging Face ``datasets`` dataset (needs network and ``datasets``);
- nothing: seeded text sampled from the model itself, so the default run needs no download.

Samples are fixed-length, non-overlapping token windows; which windows are used is seeded.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from core.arch import head_dim
from core.errors import CalibrationError, RuntimeMissingError

log = logging.getLogger(__name__)

TEXT_SUFFIXES = {".txt", ".tokens", ".text", ".md", ".raw"}

# Diverse, neutral openers for self-generated calibration text.
_GENERATION_PROMPTS = (
    "The history of the city begins",
    "In mathematics, a function",
    "Here is a short story about",
    "The recipe calls for",
    "Scientists have discovered that",
    "def main():",
    "The football season ended with",
    "Dear customer, thank you for",
    "The theory of evolution explains",
    "Q: What is the capital of",
    "Climate change affects",
    "The museum's collection includes",
)


@dataclass(frozen=True)
class DataConfig:
    """What text to use and how to cut it."""

    source: str | None = None  # path, hf:..., or None for model-generated text
    # 256 x 128 tokens: comp's least-squares statistics (1536 x 1536 Gram matrices on SmolLM2) are
    # rank-limited at 32 x 128; on the default model at the android budget 256 generated windows
    # gave WikiText-2 test PPL 38.9 against 46.6 with 32 (generation: ~4 minutes on 2 cores)
    num_samples: int = 256
    seq_len: int = 128
    seed: int = 0

    def __post_init__(self) -> None:
        if self.num_samples < 1 or self.seq_len < 8:
            raise CalibrationError(f"Need num_samples >= 1 and seq_len >= 8 (got {self.num_samples}, {self.seq_len}).")


def _read_text_file(path: Path) -> str:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise CalibrationError(f"Cannot read text file {path}: {exc.strerror}.") from exc
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CalibrationError(
            f"{path} is not UTF-8 text (bad byte at offset {exc.start}). Re-encode it as UTF-8."
        ) from exc
    if path.suffix == ".jsonl":
        parts = []
        for i, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise CalibrationError(f"{path}:{i} is not valid JSON: {exc.msg}.") from exc
            if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
                raise CalibrationError(f'{path}:{i} must be an object with a string "text" field.')
            parts.append(rec["text"])
        return "\n\n".join(parts)
    return text


def read_text(source: str) -> str:
    """Read all text of a file, a directory of .txt/.jsonl files, or an ``hf:`` dataset."""
    if source.startswith("hf:"):
        return _read_hf_dataset(source[3:])
    path = Path(source).expanduser()
    if path.is_dir():
        files = sorted(
            p for p in path.rglob("*") if p.is_file() and (p.suffix in TEXT_SUFFIXES or p.suffix == ".jsonl")
        )
        if not files:
            raise CalibrationError(f"Directory {path} has no .txt or .jsonl files.")
        return "\n\n".join(_read_text_file(p) for p in files)
    if path.is_file():
        return _read_text_file(path)
    raise CalibrationError(
        f"Text source {source} does not exist. Pass a text file, a directory of .txt/.jsonl files, "
        "hf:NAME[:CONFIG[:SPLIT]] for a datasets dataset, or nothing for model-generated text."
    )


def _read_hf_dataset(spec: str) -> str:
    parts = spec.split(":")
    name, config, split = (
        parts[0],
        (parts[1] or None) if len(parts) > 1 else None,
        parts[2] if len(parts) > 2 else "train",
    )
    try:
        import datasets  # type: ignore[import-not-found]
    except ImportError as exc:
        raise RuntimeMissingError("hf: calibration sources need the `datasets` package: pip install datasets.") from exc
    try:
        ds = datasets.load_dataset(name, config, split=split)
    except Exception as exc:  # network, missing dataset, ...
        raise CalibrationError(f"Could not load dataset {spec!r}: {exc}. Offline? Pass a local text file.") from exc
    return "\n\n".join(t for t in ds["text"] if t)


def bos_token_id(tokenizer: PreTrainedTokenizerBase) -> int | None:
    """The BOS id when the tokenizer's own convention starts every text with one (Gemma, Llama 2/3
    tokenizers do; SmolLM2's does not), else None. Models trained that way score text without it
    far worse (Gemma 3 270M: WikiText-2 perplexity 134.8 without, 54.1 with, on 4 windows)."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return None
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return int(bos) if ids and ids[0] == bos else None


def _lead_with(bos: int, body: torch.Tensor) -> torch.Tensor:
    """Each row of ``body`` [n, len] with ``bos`` prepended: [n, len + 1]."""
    return torch.cat([torch.full((body.shape[0], 1), bos, dtype=body.dtype), body], dim=1)


def _windows(ids: torch.Tensor, n: int, seq_len: int, bos: int | None) -> torch.Tensor:
    """``n`` consecutive windows of ``seq_len`` tokens from ``ids``, each led by ``bos`` when given
    (then ``seq_len - 1`` text tokens each)."""
    if bos is None:
        return ids[: n * seq_len].view(n, seq_len)
    return _lead_with(bos, ids[: n * (seq_len - 1)].view(n, seq_len - 1))


def _text_ids(
    text: str, tokenizer: PreTrainedTokenizerBase, seq_len: int, where: str
) -> tuple[torch.Tensor, int | None, int]:
    """The text's token ids (no special tokens), the BOS to lead each window with, and the text
    tokens a window holds."""
    if not text.strip():
        raise CalibrationError(f"{where} is empty.")
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"][0]
    bos = bos_token_id(tokenizer)
    return ids, bos, seq_len - (bos is not None)


def tokenize_windows(
    text: str, tokenizer: PreTrainedTokenizerBase, num_samples: int, seq_len: int, seed: int, *, where: str
) -> torch.Tensor:
    """Cut ``text`` into non-overlapping ``seq_len`` windows and pick ``num_samples`` of them (seeded);
    each window starts with BOS where the tokenizer's convention has one."""
    ids, bos, body = _text_ids(text, tokenizer, seq_len, where)
    n_windows = ids.numel() // body
    if n_windows < num_samples:
        raise CalibrationError(
            f"{where} has {ids.numel()} tokens: {n_windows} windows of {seq_len}, need {num_samples}. "
            "Give more text or lower --num-samples / --seq-len."
        )
    windows = _windows(ids, n_windows, seq_len, bos)
    g = torch.Generator().manual_seed(seed)
    pick = torch.randperm(n_windows, generator=g)[:num_samples].sort().values
    return windows[pick].clone()


def first_windows(
    text: str, tokenizer: PreTrainedTokenizerBase, num_samples: int, seq_len: int, *, where: str
) -> torch.Tensor:
    """The first ``num_samples`` consecutive windows: the usual perplexity protocol, comparable across
    runs; each starts with BOS where the tokenizer's convention has one."""
    ids, bos, body = _text_ids(text, tokenizer, seq_len, where)
    n = min(num_samples, ids.numel() // body)
    if n < 1:
        raise CalibrationError(f"{where} has {ids.numel()} tokens, fewer than one window of {seq_len}.")
    return _windows(ids, n, seq_len, bos).clone()


class GenerationProgress:
    """Counts generated tokens as ``generate`` produces them (a logits processor that leaves the
    scores as they are, so sampling is unchanged): a tqdm bar, and every ``log_every_s`` a log line
    with tokens done out of the total, the rate and the time left. On a busy machine generation can
    take far longer than on an idle one; a run that says nothing for that long reads as a hang."""

    def __init__(self, total_tokens: int, log_every_s: float = 10.0) -> None:
        from tqdm.auto import tqdm

        self.total, self.log_every_s = total_tokens, log_every_s
        self.done = 0
        self.bar = tqdm(total=total_tokens, desc="calibration text", unit="tok", disable=None)
        self.start = self.last_log = time.monotonic()

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        n = int(input_ids.shape[0])
        self.done += n
        self.bar.update(n)
        now = time.monotonic()
        if now - self.last_log >= self.log_every_s:
            self.last_log = now
            rate = self.done / max(now - self.start, 1e-9)
            left = (self.total - self.done) / rate if rate > 0 else float("inf")
            log.info(
                "calibration text: %d/%d tokens, %.0f tok/s, about %d min %02d s left",
                self.done, self.total, rate, int(left // 60), int(left % 60),
            )  # fmt: skip
        return scores

    def __enter__(self) -> GenerationProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.bar.close()


# Sequences generated side by side. Decode steps are GEMMs of batch rows: on 2 CPU cores SmolLM2-135M
# made 113.5 tokens/s at 32 rows, 131.8 at 64 and 150.2 at 128 (128 x 64 tokens). Capped so the
# KV cache of one batch stays under GENERATION_KV_BYTES on models with large caches.
GENERATION_BATCH = 128
GENERATION_KV_BYTES = 2 * 2**30


def generation_batch(config: Any, seq_len: int) -> int:
    """Rows per ``generate`` call: :data:`GENERATION_BATCH`, fewer where their fp32 KV cache at
    ``seq_len`` plus the prompt (~16 tokens) would pass :data:`GENERATION_KV_BYTES`."""
    kv_heads = int(getattr(config, "num_key_value_heads", None) or getattr(config, "num_attention_heads", 1) or 1)
    per_token = 2 * int(config.num_hidden_layers) * kv_heads * head_dim(config) * 4
    return max(1, min(GENERATION_BATCH, GENERATION_KV_BYTES // (per_token * (seq_len + 16))))


@torch.no_grad()
def generate_samples(
    model: Any, tokenizer: PreTrainedTokenizerBase, num_samples: int, seq_len: int, seed: int, batch: int = 0
) -> torch.Tensor:
    """Seeded text sampled from the model itself (no download needed).

    Sampling (temperature 1, nucleus 0.95) rather than greedy keeps the text diverse, so the
    activations it produces cover the model's typical operating range.
    """
    from transformers import LogitsProcessorList

    torch.manual_seed(seed)
    prompts = [_GENERATION_PROMPTS[i % len(_GENERATION_PROMPTS)] for i in range(num_samples)]
    rows: list[torch.Tensor] = []
    batch = batch or generation_batch(model.config, seq_len)  # the rows change the text: a cache key names them
    with GenerationProgress(num_samples * seq_len) as progress:
        for start in range(0, num_samples, batch):
            chunk = prompts[start : start + batch]
            enc = tokenizer(chunk, return_tensors="pt", padding=True, padding_side="left")
            out = model.generate(
                **enc,
                do_sample=True,
                temperature=1.0,
                top_p=0.95,
                max_new_tokens=seq_len,
                min_new_tokens=seq_len,
                pad_token_id=tokenizer.pad_token_id,
                logits_processor=LogitsProcessorList([progress]),
            )
            rows.extend(out[:, -seq_len:])
    windows = torch.stack(rows)
    bos = bos_token_id(tokenizer)
    if bos is not None:  # the tokenizer's convention: each window starts with BOS
        windows = _lead_with(bos, windows[:, 1:])
    return windows


def generated_windows(
    model: Any,
    tokenizer: PreTrainedTokenizerBase,
    num_samples: int,
    seq_len: int,
    seed: int,
    model_digest: str | None = None,
    force: bool = False,
    what: str = "calibration text",
) -> torch.Tensor:
    """Model-generated windows, from the user cache when ``model_digest`` (the model's content hash)
    is given and an entry for these settings exists (``pipeline/calib_cache.py``)."""

    batch = generation_batch(model.config, seq_len)

    def generate() -> torch.Tensor:
        log.info("Generating %s: %d seeded samples of %d tokens from the model", what, num_samples, seq_len)
        return generate_samples(model, tokenizer, num_samples, seq_len, seed, batch)

    if model_digest is None:
        return generate()
    from pipeline.calib_cache import cache_key, cached_windows

    key = cache_key(
        model_digest, num_samples=num_samples, seq_len=seq_len, seed=seed, prompts=_GENERATION_PROMPTS,
        sampling={"temperature": 1.0, "top_p": 0.95, "batch": batch}, bos=bos_token_id(tokenizer),
    )  # fmt: skip
    vocab = int(getattr(model.config, "vocab_size", 0)) or len(tokenizer)
    return cached_windows(generate, key, (num_samples, seq_len), vocab, force=force, what=what)


SCORING_SEED_OFFSET = 2_000  # the scoring windows' own seed (evaluation text: +1_000)


@dataclass
class Calibration:
    """The calibration windows, generated as far as the run needs them.

    ``precision: auto`` scores its candidates on a few windows (``PPL_WINDOWS``, 8); only pruning
    reads all 256, and the default android run prunes nothing. Generating the 256 was 200 of its
    ~620 s on 2 cores. So with generated text ``head`` is a small generation of its own (8 windows,
    its own seed, cached like the rest; ~20 s) and :meth:`full` generates the 256 only when called
    (the same text as before: pruning calibrates on what it always did). With a text file, or
    nothing to cache by, ``head`` is all the windows and :meth:`full` returns them."""

    head: torch.Tensor
    rest: Callable[[], torch.Tensor] | None = None
    _full: torch.Tensor | None = None
    generated: bool = False  # the model's own text (no calibration file): its estimates run optimistic

    def full(self) -> torch.Tensor:
        if self.rest is None:
            return self.head
        if self._full is None:
            self._full = self.rest()
        return self._full

    @property
    def at_hand(self) -> torch.Tensor:
        """The calibration windows the run read (what it saves beside its outputs): all of them
        once :meth:`full` was called, else ``head``."""
        return self.head if self._full is None else self._full


def load_calibration(
    cfg: DataConfig,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    model_digest: str | None = None,
    force: bool = False,
    scoring: int = 8,
) -> Calibration:
    """:func:`load_windows`, and with generated text first only ``scoring`` windows of their own
    (:class:`Calibration`: always those, so the choice does not depend on what is cached); the
    whole set when :meth:`Calibration.full` is called, from the cache if an earlier run made it."""
    generated = cfg.source is None
    if not generated or model_digest is None or cfg.num_samples <= scoring:
        return Calibration(load_windows(cfg, model, tokenizer, model_digest, force), generated=generated)
    head = generated_windows(
        model, tokenizer, scoring, cfg.seq_len, cfg.seed + SCORING_SEED_OFFSET, model_digest, force,
        "calibration text for scoring precisions",
    )  # fmt: skip
    return Calibration(head, lambda: load_windows(cfg, model, tokenizer, model_digest, force), generated=True)


def load_windows(
    cfg: DataConfig,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    model_digest: str | None = None,
    force: bool = False,
) -> torch.Tensor:
    """Token windows [num_samples, seq_len] for calibration (model-generated ones cached per model
    content when ``model_digest`` is given; ``force`` generates them again)."""
    if cfg.source is None:
        return generated_windows(model, tokenizer, cfg.num_samples, cfg.seq_len, cfg.seed, model_digest, force)
    return tokenize_windows(read_text(cfg.source), tokenizer, cfg.num_samples, cfg.seq_len, cfg.seed, where=cfg.source)
