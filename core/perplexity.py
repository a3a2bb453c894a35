"""Perplexity of a causal LM on fixed token windows (the standard non-overlapping protocol)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import PreTrainedModel


@torch.no_grad()
def perplexity(model: PreTrainedModel, windows: torch.Tensor, batch_size: int = 4, desc: str = "perplexity") -> float:
    """exp(mean next-token NLL) over all windows; each window is scored independently."""
    nll, count = 0.0, 0
    for start in tqdm(range(0, windows.shape[0], batch_size), desc=desc, leave=False, disable=None):
        ids = windows[start : start + batch_size]
        logits = model(ids, use_cache=False).logits[:, :-1].float()
        target = ids[:, 1:]
        nll += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="sum"))
        count += target.numel()
    return math.exp(nll / count)
