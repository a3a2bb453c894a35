"""Run-time memory model: predict an exported model's peak memory on a device from its shapes.

peak = weights (export precision, as the runtime stores them)
     + runtime overhead (the runtime's own code, arenas and bookkeeping)
     + the larger of
         loading: the transients of repacking weights into the kernels' layout (+ a KV cache the
         runtime preallocates, + a chunk's activations where they are planned memory: ExecuTorch), and
         running at full context: the KV cache as the runtime holds it (every layer, every KV head,
         at the profile's context length and batch; copies where the runtime keeps more than one)
         + the activation working set (one prefill chunk attending over the whole context; its
         logits twice where a repeated call shape makes the runtime hold them again: onnxruntime)

Shapes are read from the live modules, not the config, so per-layer widths after pruning are
counted exactly. The pruner calls this to decide how much to remove; validation compares it with a
measured peak.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from torch import nn

from core.arch import attention_heads, decoder_layers, head_dim, layer_windows, mlp_width, tied_head
from core.runtimes import RUNTIME_TABLE, Runtime, format_spec
from core.schemes import EMBEDDING_TABLE, SCHEME_TABLE, component_costs, effective_head, genai_shares_quantized_table
from targets.profile import DeviceProfile

MIB = 1024 * 1024
BYTES_PER_ELEMENT = {"fp32": 4, "fp16": 2, "bf16": 2, "int8": 1}


def library_mib(profile: DeviceProfile, runtime: Runtime) -> float:
    """The runtime library's resident size on the device (profile override, else the table's)."""
    return float(profile.runtime_overhead_mib.get(runtime, RUNTIME_TABLE[runtime].cost.library_mib))


@dataclass(frozen=True)
class LayerShape:
    """The widths of one decoder block that drive its memory."""

    params: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    # positions a sliding-window layer attends to (None: every position, a full-attention layer)
    window: int | None = None

    def positions(self, context: int, rolling_chunk: int | None = None) -> int:
        """Positions of the KV cache this layer holds at ``context``. Where the runtime's cache rolls
        (``rolling_chunk``: the longest call's tokens), a sliding-window layer holds the
        ``window - 1`` positions before a call's first token and the call's own: ExecuTorch's ring
        has that many slots; onnxruntime's past is ``window - 1``, its past + new that many."""
        if rolling_chunk is None or not self.window or self.window >= context:
            return context
        return min(context, self.window - 1 + rolling_chunk)


@dataclass(frozen=True)
class ModelShape:
    """Everything the memory model needs to know about a (possibly pruned) model."""

    vocab_size: int
    hidden_size: int
    embed_params: int
    lm_head_params: int
    tied: bool
    other_params: int  # final norm and anything outside blocks/embeddings
    layers: tuple[LayerShape, ...]

    @property
    def layer_params(self) -> int:
        return sum(layer.params for layer in self.layers)

    @property
    def total_params(self) -> int:
        head = 0 if self.tied else self.lm_head_params
        return self.embed_params + head + self.other_params + self.layer_params

    def without_layers(self, indices: set[int]) -> ModelShape:
        kept = tuple(layer for i, layer in enumerate(self.layers) if i not in indices)
        return ModelShape(
            self.vocab_size,
            self.hidden_size,
            self.embed_params,
            self.lm_head_params,
            self.tied,
            self.other_params,
            kept,
        )


def _n(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def layer_shape(layer: Any, hd: int, window: int | None = None) -> LayerShape:
    n_q, n_kv = attention_heads(layer.self_attn, hd)
    return LayerShape(_n(layer), n_q, n_kv, hd, mlp_width(layer.mlp), window)


def model_shape(model: Any) -> ModelShape:
    cfg = model.config
    hd = head_dim(cfg)
    blocks = decoder_layers(model)
    windows = layer_windows(cfg, len(blocks))
    layers = tuple(layer_shape(layer, hd, w) for layer, w in zip(blocks, windows, strict=True))
    embed = model.get_input_embeddings()
    head = model.get_output_embeddings()
    tied = tied_head(model)
    embed_n = _n(embed)
    head_n = int(head.weight.numel()) if head is not None else 0
    counted = {id(p) for layer in decoder_layers(model) for p in layer.parameters()}
    counted |= {id(p) for p in embed.parameters()}
    if head is not None:
        counted |= {id(p) for p in head.parameters()}
    other = sum(p.numel() for p in model.parameters() if id(p) not in counted)
    return ModelShape(int(cfg.vocab_size), int(cfg.hidden_size), embed_n, head_n, tied, other, layers)


@dataclass(frozen=True)
class MemoryEstimate:
    """Predicted peak run-time memory of one runtime, term by term (MiB).

    Loading and running never overlap: the load's repacking transients are freed before the first
    token, and the KV cache and activations only become resident as positions are written. So the
    peak is the weights and fixed overhead plus the larger of the two phases' own terms."""

    runtime: str
    weights_mib: float
    kv_cache_mib: float  # the KV cache as the run holds it at ``positions``: ``kv_copies`` whole caches
    activations_mib: float
    overhead_mib: float  # the runtime library + a loaded session's fixed allocations
    budget_mib: float
    load_transient_mib: float = 0.0  # repacking while loading, freed once loaded
    positions: int = 0  # the context the run terms are counted at
    kv_copies: float = 1.0
    kv_at_load: bool = False  # a preallocated cache (ExecuTorch's planned memory) is resident from load on
    activations_at_load: bool = False  # so is a chunk's planned activation memory (RuntimeSpec.activations_at_load)
    packed_mib: float = 0.0  # packed weight copies the run keeps beside the stored weights
    # what the overhead's load transients are proportional to (part of weights_mib, not added again)
    block_weights_mib: float = 0.0
    head_weights_mib: float = 0.0
    weights_mapped_mib: float = 0.0  # stored, memory-mapped and never read whole: not in weights_mib
    margin_mib: float = 0.0  # the calibrated under-prediction of the model's part (RuntimeCost.prediction_margin)
    logits_mib: float = 0.0  # one prefill chunk's logits (one copy is in activations_mib)
    logits_copies: float = 1.0  # copies of them the run holds at its peak (RuntimeCost.logits_copies)

    @property
    def load_mib(self) -> float:
        """The load phase's own terms: the transients, a preallocated KV cache and planned activations."""
        planned = (self.kv_cache_mib if self.kv_at_load else 0.0) + (
            self.activations_mib if self.activations_at_load else 0.0
        )
        return self.load_transient_mib + planned

    @property
    def repeated_logits_mib(self) -> float:
        """The chunk's logits held beyond the activations' one copy (onnxruntime's memory pattern)."""
        return (self.logits_copies - 1.0) * self.logits_mib

    @property
    def run_mib(self) -> float:
        """The run phase's own terms: KV cache as held, one prefill chunk's activations (their logits
        as often as the runtime holds them), packed copies."""
        return self.kv_cache_mib + self.activations_mib + self.repeated_logits_mib + self.packed_mib

    @property
    def phase(self) -> str:
        """Which phase sets the peak: ``load`` (repacking weights) or ``run`` (full context)."""
        return "load" if self.load_mib > self.run_mib else "run"

    @property
    def total_mib(self) -> float:
        return self.weights_mib + self.overhead_mib + max(self.load_mib, self.run_mib)

    @property
    def bound_mib(self) -> float:
        """The prediction with the calibration's worst under-prediction added: what fitting,
        pruning and the feasibility check hold to the budget (``total_mib`` is the estimate itself,
        what validation compares the measurement with)."""
        return self.total_mib + self.margin_mib

    @property
    def fits(self) -> bool:
        return self.bound_mib <= self.budget_mib

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MemoryEstimate:
        """The estimate a report's ``to_dict`` wrote (fields an older report lacks take their defaults)."""
        return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})

    def to_dict(self) -> dict[str, float | str | bool]:
        return {
            **asdict(self), "total_mib": round(self.total_mib, 2), "bound_mib": round(self.bound_mib, 2),
            "fits": self.fits, "phase": self.phase,
        }  # fmt: skip


@dataclass(frozen=True)
class WeightTerms:
    """Weights as a runtime stores them, by the part of the model they belong to (bytes)."""

    embedding: float
    head: float  # a separately stored lm_head (0 when the runtime reads the embedding for it)
    blocks: float  # every decoder block's linear weights and norms
    other: float
    head_read: float  # the vocabulary projection's weight as its GEMM reads it (the tied embedding too)
    embedding_resident: bool = True  # False: memory-mapped and only gathered from (see RuntimeSpec.maps_weights)

    @property
    def total(self) -> int:
        return int(self.embedding + self.head + self.blocks + self.other)

    @property
    def resident(self) -> int:
        """What is in memory at run time: the stored weights but a mapped, gather-only embedding."""
        return self.total - (0 if self.embedding_resident else int(self.embedding))


def weight_terms(
    shape: ModelShape,
    runtime: Runtime,
    precision: str,
    scheme: str | None = None,
    embedding: str | None = None,
    onnx_format: str = "onnx",
    head: str | None = None,
    maps_weights: bool | None = None,
) -> WeightTerms:
    """Weights as the runtime stores them. Quantized (``scheme``): every block's linear weights take
    the scheme's bytes, a separately stored lm_head its own scheme's (``head``: ``quantize_head``'s
    value, None: the blocks' scheme, ``fp32``: unquantized); norms and a lm_head shared with the
    embedding stay in ``precision``. int4 groups must tile a weight's input width, so a down_proj
    whose (pruned) intermediate size is not a multiple of the group stays in fp32. Schemes with
    ``unties_head`` (``core.schemes``) store a tied lm_head as its own quantized weight. The
    embedding table takes its own ``embedding`` scheme's bytes (codes and per-group scales), else
    ``precision``'s. A GenAI folder (``onnx_format: genai``) is laid out by onnxruntime-genai's
    builder instead (:func:`genai_weight_terms`). ``maps_weights``: whether the runtime maps the
    artifact (None: its row's ``RuntimeSpec.maps_weights``; ExecuTorch's depends on the profile's
    ``executorch_load_mode``)."""
    if runtime == "onnxruntime" and onnx_format == "genai":
        return genai_weight_terms(shape, precision, scheme)
    fp = BYTES_PER_ELEMENT[precision]
    embed_bytes = float(shape.embed_params * fp)
    if embedding is not None:
        rows = shape.embed_params // shape.hidden_size
        embed_bytes = rows * EMBEDDING_TABLE[embedding].bytes_per_row(shape.hidden_size)  # type: ignore[index]
    rt = RUNTIME_TABLE[runtime]
    spec = SCHEME_TABLE[scheme] if scheme is not None else None  # type: ignore[index]
    q: float = spec.weight_bytes if spec else fp
    head_scheme = effective_head(scheme, head)
    head_spec = SCHEME_TABLE[head_scheme] if head_scheme is not None else None  # type: ignore[index]
    unties = bool(head_spec and head_spec.unties_head)
    separate_head = not shape.tied or not rt.stores_tied_once or unties
    head_bytes = shape.lm_head_params * (head_spec.weight_bytes if head_spec else fp) if separate_head else 0.0
    blocks = 0.0
    for layer in shape.layers:
        unquantized = 0
        if spec is not None and spec.whole_groups and layer.intermediate_size % spec.group_size:
            unquantized = shape.hidden_size * layer.intermediate_size
        blocks += (layer.params - unquantized) * q + unquantized * fp
    return WeightTerms(
        embedding=embed_bytes,
        head=head_bytes,
        blocks=blocks,
        other=shape.other_params * fp,
        head_read=head_bytes if separate_head else shape.lm_head_params * fp,
        embedding_resident=not ((rt.maps_weights if maps_weights is None else maps_weights) and separate_head),
    )


def genai_weight_terms(shape: ModelShape, precision: str, scheme: str | None) -> WeightTerms:
    """Weights as onnxruntime-genai's builder lays them out and its Generator holds them (nothing
    memory-mapped: the session loads its external data). A tied table is stored once, as the
    lm_head's MatMul weight: fp32, the embedding gathers from a transposed copy of it that the
    session folds at load (both resident: SmolLM2 measured 695 MiB after load for 515 stored);
    int4 (``int4w``), one table serves both (GatherBlockQuantized on the lm_head's MatMulNBits
    codes). The builder's Gather takes 4-bit codes only, so with int8 weights (``int8w``) the
    embedding stays an fp32 table of its own beside the int8 head, as it does for an untied model."""
    fp = BYTES_PER_ELEMENT[precision]
    spec = SCHEME_TABLE[scheme] if scheme is not None else None  # type: ignore[index]
    q: float = spec.weight_bytes if spec else fp
    blocks = sum(layer.params for layer in shape.layers) * q
    head = shape.lm_head_params * q
    embedding = 0.0 if shape.tied and genai_shares_quantized_table(scheme) else shape.embed_params * fp
    return WeightTerms(embedding=embedding, head=head, blocks=blocks, other=shape.other_params * fp, head_read=head)


def weights_bytes(
    shape: ModelShape, runtime: Runtime, precision: str, scheme: str | None = None, embedding: str | None = None
) -> int:
    """Total weight bytes as the runtime stores them (see :func:`weight_terms`)."""
    return weight_terms(shape, runtime, precision, scheme, embedding).total


def kv_cache_bytes(
    shape: ModelShape, context: int, batch: int, precision: str, rolling_chunk: int | None = None
) -> int:
    """Keys and values of every layer at ``context`` positions; with ``rolling_chunk`` a
    sliding-window layer holds its window and one call's tokens (:meth:`LayerShape.positions`)."""
    per_batch = sum(
        2 * layer.num_kv_heads * layer.head_dim * layer.positions(context, rolling_chunk) for layer in shape.layers
    )
    return per_batch * batch * BYTES_PER_ELEMENT[precision]


def activation_bytes(
    shape: ModelShape, tokens: int, context: int, batch: int, rolling: bool = False, scores: bool = True
) -> int:
    """Working set of one prefill chunk of ``tokens`` attending over up to ``context`` positions
    (``scores``: the attention scores against every position are materialized, see
    ``RuntimeSpec.materializes_scores``).

    Activations stay fp32 on CPU runtimes. Layers run one after another, so the peak is the
    residual stream plus the widest single layer's transients plus the logits of the chunk.
    """
    bt = batch * tokens
    residual = 3 * bt * shape.hidden_size  # hidden, normed copy, residual add
    widest = 0
    for layer in shape.layers:
        qkv = bt * (layer.num_heads + 2 * layer.num_kv_heads) * layer.head_dim
        keys = layer.positions(context, tokens if rolling else None)
        attn = 2 * batch * layer.num_heads * tokens * keys if scores else 0  # + softmax
        mlp = 3 * bt * layer.intermediate_size  # gate, up, act*up
        widest = max(widest, qkv + attn, mlp)
    return 4 * (residual + widest) + logits_bytes(shape, tokens, batch)


def logits_bytes(shape: ModelShape, tokens: int, batch: int) -> int:
    """One prefill chunk's fp32 logits: the part of its activations (:func:`activation_bytes`) a
    large vocabulary dominates, and what onnxruntime holds again (``RuntimeCost.logits_copies``)."""
    return 4 * batch * tokens * shape.vocab_size


def estimate(
    shape: ModelShape, profile: DeviceProfile, runtime: Runtime, positions: int | None = None
) -> MemoryEstimate:
    """Peak memory of ``runtime`` running ``shape`` on ``profile`` with ``positions`` in its cache
    (default: the profile's context, the worst case it claims). ``weights_mib`` is what is resident
    (a memory-mapped embedding that is only gathered from is not; ``weights_mapped_mib`` says how
    much that left on disk).

    Each component's load-time packing is its own scheme's: the blocks' transient and packed terms
    come from the linear scheme's constants, the lm_head's from its own (``quantize_head``); the
    session's fixed cost and the KV copies from the linear scheme's (the head's where the blocks
    are fp32), since they belong to the attention and the session, not to the vocabulary projection."""
    scheme = profile.quantize.get(runtime)
    head = profile.head_scheme(runtime)
    fmt = profile.onnx_format
    program_cost, head_row = component_costs(runtime, scheme, head)
    spec = format_spec(runtime, fmt, program_cost, quantized=(scheme or head) is not None)
    cost = spec.cost
    head_cost = format_spec(runtime, fmt, head_row, quantized=(scheme or head) is not None).cost
    context = profile.context_length if positions is None else positions
    terms = weight_terms(
        shape, runtime, profile.float_dtype, scheme, profile.quantize_embedding.get(runtime), fmt,
        profile.quantize_head.get(runtime), spec.maps_weights or profile.maps_program(runtime),
    )  # fmt: skip
    gemm_mib, head_mib = terms.blocks / MIB, terms.head_read / MIB
    chunk = min(profile.prefill_tokens, context)
    rolling = chunk if spec.kv_windowed else None
    kv = kv_cache_bytes(shape, context, profile.batch_size, profile.float_dtype, rolling) / MIB
    library = library_mib(profile, runtime)
    est = MemoryEstimate(
        runtime=runtime,
        weights_mib=terms.resident / MIB,
        kv_cache_mib=cost.kv_copies * kv,
        activations_mib=activation_bytes(
            shape, chunk, context, profile.batch_size, spec.kv_windowed, spec.materializes_scores
        )
        / MIB,
        overhead_mib=library + cost.session_mib,
        budget_mib=float(profile.memory_budget_mib),
        load_transient_mib=cost.load_transient_mib(gemm_mib, 0.0) + head_cost.load_transient_mib(0.0, head_mib),
        positions=context,
        kv_copies=cost.kv_copies,
        kv_at_load=spec.kv_preallocated,
        activations_at_load=spec.activations_at_load,
        packed_mib=cost.run_resident_mib(gemm_mib, 0.0) + head_cost.run_resident_mib(0.0, head_mib),
        block_weights_mib=gemm_mib,
        head_weights_mib=head_mib,
        weights_mapped_mib=(terms.total - terms.resident) / MIB,
        logits_mib=logits_bytes(shape, chunk, profile.batch_size) / MIB,
        logits_copies=cost.logits_copies,
    )
    margin = max(cost.prediction_margin, head_cost.prediction_margin)
    return replace(est, margin_mib=margin * (est.total_mib - library))


def estimate_all(shape: ModelShape, profile: DeviceProfile) -> list[MemoryEstimate]:
    """One estimate per runtime the profile exports to; the model must fit in each."""
    return [estimate(shape, profile, rt) for rt in profile.runtimes]


def worst(estimates: list[MemoryEstimate]) -> MemoryEstimate:
    """The runtime furthest from fitting: the largest bound (prediction + margin)."""
    return max(estimates, key=lambda e: e.bound_mib)
