"""Perplexity of a causal LM on fixed token windows (the standard non-overlapping protocol)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import PreTrainedModel


@torch.no_grad()
def scored(
    model: PreTrainedModel, windows: torch.Tensor, batch_size: int = 4, desc: str = "perplexity"
) -> tuple[float, torch.Tensor]:
    """exp(mean next-token NLL) over all windows (each scored independently), and the model's top-1
    token at every scored position ([n, length - 1]): what a quantized copy's agreement is counted on."""
    nll, count = 0.0, 0
    top1 = []
    for start in tqdm(range(0, windows.shape[0], batch_size), desc=desc, leave=False, disable=None):
        ids = windows[start : start + batch_size]
        logits = model(ids, use_cache=False).logits[:, :-1].float()
        target = ids[:, 1:]
        nll += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="sum"))
        count += target.numel()
        top1.append(logits.argmax(-1))
    return math.exp(nll / count), torch.cat(top1)


def perplexity(model: PreTrainedModel, windows: torch.Tensor, batch_size: int = 4, desc: str = "perplexity") -> float:
    """exp(mean next-token NLL) over all windows; each window is scored independently."""
    return scored(model, windows, batch_size, desc)[0]
