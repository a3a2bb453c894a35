"""What every exporter provides, and the wrapper module that is actually exported."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn
from transformers import PreTrainedModel


@dataclass(frozen=True)
class ExportConfig:
    """Shapes the exported graph is traced for.

    ``seq_len`` is the example (and, for static-shape runtimes, the only) prefill length;
    ``batch_size`` likewise.
    """

    seq_len: int
    batch_size: int = 1


@dataclass
class ExportArtifact:
    runtime: str
    path: Path
    size_bytes: int
    export_s: float
    static_shape: tuple[int, int] | None  # (batch, seq) when the artifact only takes that shape
    details: dict[str, Any]


def artifact_files(path: Path) -> list[Path]:
    """The file itself plus its external-data sidecar (``model.onnx.data``) when there is one."""
    sidecar = path.with_name(path.name + ".data")
    return [path, sidecar] if sidecar.is_file() else [path]


def artifact_size_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in artifact_files(path))


class Exporter(Protocol):
    name: str
    filename: str

    def export(self, model: PreTrainedModel, cfg: ExportConfig, out_dir: Path) -> ExportArtifact: ...


class LogitsOnly(nn.Module):
    """input_ids -> logits, with no cache and an all-ones mask: the prefill graph.

    Returning a bare tensor keeps both exporters' output signatures trivial.
    """

    def __init__(self, model: PreTrainedModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, use_cache=False).logits


def example_inputs(cfg: ExportConfig, vocab_size: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab_size, (cfg.batch_size, cfg.seq_len), generator=g)
