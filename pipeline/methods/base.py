"""What a pruning method is to the budget loop (:func:`pipeline.prune.prune_to_budget`).

A method is constructed with its typed config (``core/methods.py``) and driven one unit at a time:
the loop asks the memory model whether the model fits; if not, ``step`` removes (or plans to
remove) the least important unit, and ``shape`` says what the model would be after everything
stepped so far. ``finalize`` applies what was planned. The loop knows no method by name: what it
needs to know about one is in this protocol.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import torch

from pipeline.methods.units import remove_layers
from targets.budget import ModelShape

if TYPE_CHECKING:
    from pipeline.stream import LayerStream

PPL_WINDOWS = 8  # calibration windows a perplexity check after a step scores (a cheap progress signal)


@dataclass
class PruneContext:
    """What the loop gives a method besides the model and the calibration windows.

    - ``fits``: whether a shape meets the loop's target (budget or ratio), for methods that choose
      their last step by it (``depth+width``).
    - ``stream``: the block-by-block view of the model when it is streamed from a checkpoint (only
      layer-wise methods accept one); None: the method builds its own over the in-memory model.
    - ``kept_layers``: the original index of every block still in the model; methods remove blocks
      through :meth:`remove_blocks`, which keeps it, so the record of what was removed is exact.
    """

    fits: Callable[[ModelShape], bool]
    kept_layers: list[int]
    stream: LayerStream | None = None
    removed_layers: list[int] = field(default_factory=list)

    def remove_blocks(self, model: Any, indices: list[int]) -> None:
        """Remove the model's current blocks ``indices``, recording their original indices."""
        before = list(self.kept_layers)
        self.kept_layers = remove_layers(model, indices, before)
        self.removed_layers = sorted({*self.removed_layers, *(before[i] for i in indices)})


class Pruner(Protocol):
    """A pruning method (see the module docstring)."""

    name: str
    #: Whether layer-wise streaming from a checkpoint (``prunefit prune``) is supported.
    streams: bool

    def most_pruned_shape(self, model: Any, shape: ModelShape) -> ModelShape:
        """The smallest model the method may produce under its config's limits (feasibility check)."""
        ...

    def prepare(self, model: Any, calib: torch.Tensor, ctx: PruneContext) -> None: ...

    def can_step(self, model: Any) -> bool: ...

    def step(self, model: Any, calib: torch.Tensor) -> tuple[str, float]:
        """Remove or plan the next unit; returns what it was and its score."""
        ...

    def shape(self, model: Any) -> ModelShape: ...

    @property
    def applied(self) -> bool:
        """Whether the steps so far are applied to the model (calibration perplexity after a step
        then means something), or only planned until :meth:`finalize`."""
        ...

    def finalize(self, model: Any) -> None: ...
