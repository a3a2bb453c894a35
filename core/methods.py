"""The pruning-method table: each method's typed config and the module that implements it.

A config is a frozen pydantic model that rejects unknown keys; its fields are every knob of the
method, each settable from a profile's ``pruning:`` section or from code. The table is light (no
torch): profiles validate against it before any model loads, and ``pipeline/methods/`` imports
the implementing module only when a run prunes. Adding a method is one module in
``pipeline/methods/``, one config class and one row here, and its tiny test.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from core.errors import ConfigError


class MethodConfig(BaseModel):
    """Knobs every method has. ``max_removed_layer_ratio`` bounds how many whole blocks a method
    may remove (methods that keep every block ignore it, and say so in the feasibility check)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: str
    max_removed_layer_ratio: float = Field(0.5, gt=0.0, lt=1.0)
    batch_size: int = Field(8, ge=1)
    width_multiple: int = Field(8, ge=1, le=256)  # channels leave in groups of this (kernel-friendly widths)
    # Instead of the profile's budget, remove this share of decoder-block parameters (benchmarks,
    # "prune 20%" requests). None: target the budget.
    target_decoder_ratio: float | None = Field(None, gt=0.0, lt=1.0)

    @property
    def removes_blocks(self) -> bool:
        """Whether this method, so configured, removes whole blocks (so that
        ``max_removed_layer_ratio`` moves its floor)."""
        return True


class DepthConfig(MethodConfig):
    """``depth``: whole blocks, least Block Influence first, re-scored after each removal."""

    method: Literal["depth"] = "depth"


class WidthConfig(MethodConfig):
    """``width``: MLP channel groups and KV groups scored by their share of the residual stream's
    energy, one-shot least-squares re-fit of the output projections on the dense statistics."""

    method: Literal["width"] = "width"
    compensate: bool = True  # least-squares re-fit of o_proj / down_proj after slicing
    ridge: float = Field(1e-3, ge=0.0)  # relative to the mean diagonal of the Gram matrix
    # unit importance; "wanda" and "magnitude" are the published baselines' scores
    score: Literal["energy", "wanda", "magnitude"] = "energy"
    min_keep_ratio: float = Field(0.5, gt=0.0, le=1.0)  # each block keeps this share of its MLP channels

    @property
    def removes_blocks(self) -> bool:
        return False


class DepthWidthConfig(WidthConfig):
    """``depth+width``: whole blocks while more than one is still needed, then ``width`` units."""

    method: Literal["depth+width"] = "depth+width"  # type: ignore[assignment]

    @property
    def removes_blocks(self) -> bool:
        return True


class CompConfig(MethodConfig):
    """``comp``: COMP-style, layer-wise, condition-aware costs and least-squares compensation."""

    method: Literal["comp"] = "comp"
    compensate: bool = True
    # Ridge of the re-fit, relative to the mean diagonal of the Gram matrix: applies up to 4096
    # calibration tokens and shrinks as sqrt(4096 / tokens) above, as the Gram matrices' sampling
    # noise does (SmolLM2-135M, 20%, WikiText-2 test PPL: at 4096 tokens 46.7 with 1e-3, 45.2 with
    # 0.05; at 32768 tokens 39.2 with 0.05, 38.9 with 0.02)
    ridge: float = Field(0.05, ge=0.0)
    # each block keeps this share of its MLP channels: comp's compensated costs can tell a block that
    # tolerates deep MLP cuts (SmolLM2-135M, 20%, 256 x 128 calibration tokens: 38.1 at 0.3, 38.9 at 0.5)
    min_keep_ratio: float = Field(0.3, gt=0.0, le=1.0)
    # whole blocks compete with channels and heads in one plan. Off by default: on SmolLM2-135M at
    # 20% it measured worse (test PPL 48.2 vs 46.7, benchmarks/results/pruning.md)
    blocks: bool = False
    # what the re-fit reproduces: the dense sub-layer's output, or that plus the residual stream's
    # drift from the dense model (Llama-layout blocks; 46.7 vs 51.4 at 20%)
    target: Literal["sublayer", "residual"] = "residual"
    # how the removal is spread: globally cheapest-first by compensated cost per parameter, or the
    # same number of MLP channels from every block (units still chosen by cost inside each block)
    allocation: Literal["global", "uniform"] = "global"

    @property
    def removes_blocks(self) -> bool:
        return self.blocks


class MultiPrunerConfig(MethodConfig):
    """``multipruner``: MultiPruner-style, blocks : MLP channels : KV groups in a fixed mix, each step
    scored by calibration perplexity."""

    method: Literal["multipruner"] = "multipruner"
    # shares of the removed parameters taken as blocks : MLP channels : KV groups (MultiPruner's example)
    shares: tuple[float, float, float] = (0.44, 0.52, 0.04)
    group: int = Field(64, ge=1)  # MLP channels one candidate removes
    # candidates per step given the perplexity forward, picked by how little they change their own
    # block's output (MultiPruner scores every candidate; on 2 CPU cores that is ~40 min for
    # SmolLM2-135M at 20%)
    shortlist: int = Field(6, ge=1)
    min_keep_ratio: float = Field(0.5, gt=0.0, le=1.0)

    @field_validator("shares")
    @classmethod
    def _shares(cls, v: tuple[float, float, float]) -> tuple[float, float, float]:
        if min(v) < 0 or sum(v) <= 0:
            raise ValueError(f"shares must be three non-negative numbers with a positive sum, got {v}")
        return v


@dataclass(frozen=True)
class MethodSpec:
    """One row: the config type and the ``module:Class`` that implements the method."""

    config: type[MethodConfig]
    pruner: str


METHOD_TABLE: dict[str, MethodSpec] = {
    "depth": MethodSpec(DepthConfig, "pipeline.methods.depth:DepthPruner"),
    "width": MethodSpec(WidthConfig, "pipeline.methods.width:WidthPruner"),
    "comp": MethodSpec(CompConfig, "pipeline.methods.comp:CompPruner"),
    "multipruner": MethodSpec(MultiPrunerConfig, "pipeline.methods.multipruner:MultiPruner"),
    "depth+width": MethodSpec(DepthWidthConfig, "pipeline.methods.depth_width:DepthThenWidth"),
}
METHODS: tuple[str, ...] = tuple(METHOD_TABLE)
# The default: best measured at the android budget on the default model with the default 256 x 128
# self-generated calibration (WikiText-2 test PPL 38.9; depth+width 44.2, depth 50.3;
# benchmarks/results/default_method.md)
DEFAULT_METHOD = "comp"


def method_spec(method: str) -> MethodSpec:
    try:
        return METHOD_TABLE[method]
    except KeyError:
        raise ConfigError(f"Unknown pruning method '{method}'. Available: {', '.join(METHODS)}.") from None


def method_keys(method: str) -> list[str]:
    """Every knob ``method`` takes (``method`` itself excluded)."""
    return [k for k in method_spec(method).config.model_fields if k != "method"]


def method_config(method: str, **knobs: Any) -> MethodConfig:
    """The typed config of ``method`` with ``knobs``; a ConfigError names an unknown knob or a bad
    value and lists the method's keys."""
    spec = method_spec(method)
    try:
        return spec.config.model_validate({**knobs, "method": method})
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            loc = ".".join(str(p) for p in err["loc"])
            if err["type"] == "extra_forbidden":
                problems.append(f"unknown key '{loc}' for method '{method}'")
            else:
                problems.append(f"{loc}: {err['msg']} (got {err.get('input')!r})")
        raise ConfigError(
            f"Invalid pruning settings: {'; '.join(problems)}. "
            f"Method '{method}' takes: {', '.join(method_keys(method))}."
        ) from None
