"""The record of what pruning did: method, removed blocks, per-layer widths. The method's run
returns it, the rewrite stage writes it once, into ``config.json`` under ``prunefit``, and loading
a pruned model reads it back (``pipeline.rewrite.load_pruned``), as the report does."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class LayerWidths(BaseModel):
    """One decoder block's widths after pruning (what the config cannot say globally)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    intermediate_size: int = Field(ge=1)
    num_attention_heads: int = Field(ge=1)
    num_key_value_heads: int = Field(ge=1)


class PruneRecord(BaseModel):
    """What was removed from the dense model. ``kept_layers`` / ``removed_layers`` are indices of
    the dense model's blocks; ``layers`` are the widths of the blocks that remain, in order.
    ``uniform``: every block has the same widths, so the stock config keys say them (set when the
    model is saved)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: str | None = None
    profile: str | None = None
    original_num_hidden_layers: int = Field(ge=1)
    kept_layers: list[int]
    removed_layers: list[int] = Field(default_factory=list)
    layers: list[LayerWidths] = Field(default_factory=list)
    uniform: bool = False

    @property
    def uniform_widths(self) -> LayerWidths | None:
        """The widths every block shares, or None when they differ (or were not recorded)."""
        if not self.layers:
            return None
        first = self.layers[0]
        return first if all(w == first for w in self.layers) else None

    @classmethod
    def from_config(cls, config: Any) -> PruneRecord | None:
        """The record in a (loaded) transformers config, None for a model prunefit did not prune."""
        meta = getattr(config, "prunefit", None)
        return cls.model_validate(meta) if meta else None

    def to_config(self) -> dict[str, Any]:
        """The JSON-ready dict ``config.json`` holds under ``prunefit``."""
        return self.model_dump()
