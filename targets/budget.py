"""Run-time memory model: predict an exported model's peak memory on a device from its shapes.

peak = weights (export precision, as the runtime stores them)
     + KV cache (every layer, every KV head, at the profile's context length and batch)
     + activation working set (one prefill chunk: residual stream, attention, MLP, logits)
     + runtime overhead (the runtime's own code, arenas and bookkeeping)

Shapes are read from the live modules, not the config, so per-layer widths after pruning are
counted exactly. The pruner calls this to decide how much to remove; validation compares it with a
measured peak.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

from torch import nn

from pipeline.arch import decoder_layers, head_dim
from targets.profile import DeviceProfile, Runtime

MIB = 1024 * 1024
BYTES_PER_ELEMENT = {"fp32": 4, "fp16": 2, "bf16": 2, "int8": 1}


@dataclass(frozen=True)
class RuntimeCost:
    """What a runtime adds on top of weights, KV cache and activations.

    - ``library_mib``: resident code/data of the runtime library in the device's runner (not
      measurable here, where the host is Python; profiles override it via runtime_overhead_mib).
    - ``session_mib``: fixed allocations of a loaded session (thread pools, arenas, plans). The
      runtime's code is not in it: what the run pages in is the library's (the runner measures it
      out), so ExecuTorch, whose planned buffers are the activations and KV cache, fits at 0.
    - ``gemm_transient_ratio`` / ``head_transient_ratio``: both runtimes repack GEMM weights into
      their kernels' layout while loading (MLAS prepack, XNNPACK packing), and the peak holds part
      of the source and the packed copy at once. Two terms, because the measured share differs by
      an order of magnitude: the decoder blocks' GEMMs (many small weights, packed one after the
      other) cost a few percent of their size, the vocabulary projection (one 49152 x 576 weight
      for SmolLM2, packed or transposed whole) most of its size. One weight-proportional ratio
      could not fit both the default model and the tiny test models (three points off by 9-13%).

    Fitted by least squares (``benchmarks/memory_calibration.py``) on the model-attributable peak
    RSS of every point in ``benchmarks/results/memory_calibration.json``, each residual relative to
    its point: SmolLM2-135M pruned for android, rpi4 and android-go (fp32, 8da8w, int8w) and tiny
    Llama models with 0.7-200 MiB of weights. Every point is within +-10%
    (``tests/targets/test_budget_calibration.py``; +-4.4% when fitted).
    """

    library_mib: float
    session_mib: float
    gemm_transient_ratio: float
    head_transient_ratio: float

    def loaded_overhead_mib(self, gemm_mib: float, head_mib: float) -> float:
        """What a loaded session adds beyond weights, KV cache and activations (library excluded),
        for ``gemm_mib`` of decoder-block weights and a ``head_mib`` vocabulary projection."""
        return self.session_mib + self.gemm_transient_ratio * gemm_mib + self.head_transient_ratio * head_mib


RUNTIME_COSTS: dict[Runtime, RuntimeCost] = {
    # libonnxruntime.so for arm64 Android/Linux maps ~20 MiB; ORT Mobile minimal builds are smaller.
    "onnxruntime": RuntimeCost(20.0, session_mib=4.3, gemm_transient_ratio=0.067, head_transient_ratio=0.47),
    # The ExecuTorch runtime core + XNNPACK delegate is a few MiB of code.
    "executorch": RuntimeCost(4.0, session_mib=0.0, gemm_transient_ratio=0.033, head_transient_ratio=0.765),
}


# Kernels whose packing differs enough from the runtime's fp32 GEMMs to need their own constants
# (same meaning as RUNTIME_COSTS; library_mib is the runtime's). onnxruntime's int8w runs
# MatMulNBits with int8 compute, which packs every weight into its own layout at load while the
# mapped source pages are resident too: 0.41 of the block weights, 0.55 of the lm_head (fitted on
# SmolLM2 for android-go and three tiny models; fp32's ratios would under-predict them by 26-28%).
SCHEME_COSTS: dict[tuple[Runtime, str], RuntimeCost] = {
    ("onnxruntime", "int8w"): replace(
        RUNTIME_COSTS["onnxruntime"], session_mib=5.66, gemm_transient_ratio=0.406, head_transient_ratio=0.552
    ),
}


def runtime_cost(runtime: Runtime, scheme: str | None = None) -> RuntimeCost:
    """The overhead constants of ``runtime`` running weights quantized with ``scheme`` (None: fp32)."""
    return SCHEME_COSTS.get((runtime, scheme or "fp32"), RUNTIME_COSTS[runtime])


# Whether the runtime memory-maps its weights from the artifact, so that an embedding table that is
# only gathered from (not also read whole as the lm_head) stays on disk but for the rows looked up.
# onnxruntime maps external-data initializers (measured: an int8w model with an untied head peaked
# ~100 MiB under its stored weights); the ExecuTorch runner here loads the program's data.
MAPS_WEIGHTS: dict[Runtime, bool] = {"onnxruntime": True, "executorch": False}


def library_mib(profile: DeviceProfile, runtime: Runtime) -> float:
    """The runtime library's resident size on the device (profile override, else default)."""
    return float(profile.runtime_overhead_mib.get(runtime, RUNTIME_COSTS[runtime].library_mib))


# Whether the runtime keeps one copy of a tied embedding / lm_head: ONNX from torch.onnx's dynamo
# exporter shares the initializer; an ExecuTorch program serialises the lm_head weight separately.
STORES_TIED_ONCE: dict[Runtime, bool] = {"onnxruntime": True, "executorch": False}


# Whether the runtime's KV cache is allocated whole at load (ExecuTorch's static cache is planned
# memory of the program) or grows with the tokens seen (ONNX past/present tensors).
KV_PREALLOCATED: dict[Runtime, bool] = {"onnxruntime": False, "executorch": True}


@dataclass(frozen=True)
class LayerShape:
    """The widths of one decoder block that drive its memory."""

    params: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int


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


def _out(linear: nn.Module) -> int:
    return int(linear.weight.shape[0])  # type: ignore[union-attr,index]


def layer_shape(layer: Any, hd: int) -> LayerShape:
    attn, mlp = layer.self_attn, layer.mlp  # type: ignore[union-attr]
    if hasattr(attn, "qkv_proj"):  # Phi-3 fused
        n_q = int(attn.o_proj.weight.shape[1]) // hd
        n_kv = (_out(attn.qkv_proj) // hd - n_q) // 2
    else:
        n_q, n_kv = _out(attn.q_proj) // hd, _out(attn.k_proj) // hd
    inter = _out(mlp.gate_up_proj) // 2 if hasattr(mlp, "gate_up_proj") else _out(mlp.up_proj)
    return LayerShape(_n(layer), n_q, n_kv, hd, inter)


def model_shape(model: Any) -> ModelShape:
    cfg = model.config
    hd = head_dim(cfg)
    layers = tuple(layer_shape(layer, hd) for layer in decoder_layers(model))
    embed = model.get_input_embeddings()
    head = model.get_output_embeddings()
    tied = head is not None and head.weight is embed.weight
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
    """Predicted peak run-time memory of one runtime, term by term (MiB)."""

    runtime: str
    weights_mib: float
    kv_cache_mib: float
    activations_mib: float
    overhead_mib: float
    budget_mib: float
    # what the overhead's load transients are proportional to (part of weights_mib, not added again)
    block_weights_mib: float = 0.0
    head_weights_mib: float = 0.0
    weights_mapped_mib: float = 0.0  # stored, memory-mapped and never read whole: not in weights_mib

    @property
    def total_mib(self) -> float:
        return self.weights_mib + self.kv_cache_mib + self.activations_mib + self.overhead_mib

    @property
    def fits(self) -> bool:
        return self.total_mib <= self.budget_mib

    def to_dict(self) -> dict[str, float | str | bool]:
        return {**asdict(self), "total_mib": round(self.total_mib, 2), "fits": self.fits}


@dataclass(frozen=True)
class WeightTerms:
    """Weights as a runtime stores them, by the part of the model they belong to (bytes)."""

    embedding: float
    head: float  # a separately stored lm_head (0 when the runtime reads the embedding for it)
    blocks: float  # every decoder block's linear weights and norms
    other: float
    head_read: float  # the vocabulary projection's weight as its GEMM reads it (the tied embedding too)
    embedding_resident: bool = True  # False: memory-mapped and only gathered from (see MAPS_WEIGHTS)

    @property
    def total(self) -> int:
        return int(self.embedding + self.head + self.blocks + self.other)

    @property
    def resident(self) -> int:
        """What is in memory at run time: the stored weights but a mapped, gather-only embedding."""
        return self.total - (0 if self.embedding_resident else int(self.embedding))


def weight_terms(shape: ModelShape, runtime: Runtime, precision: str, scheme: str | None = None) -> WeightTerms:
    """Weights as the runtime stores them. Quantized (``scheme``): every block's linear weights and
    a separately stored lm_head take the scheme's bytes; embeddings, norms and a lm_head shared
    with the embedding stay in ``precision``. int4 groups must tile a weight's input width, so a
    down_proj whose (pruned) intermediate size is not a multiple of the group stays in fp32.
    Schemes in ``exporters.quantize.UNTIES_HEAD`` store a tied lm_head as its own quantized weight."""
    fp = BYTES_PER_ELEMENT[precision]
    q: float = fp
    unties = False
    group = 0
    if scheme is not None:
        from exporters.quantize import GROUP_SIZE, UNTIES_HEAD, WEIGHT_BYTES

        q, unties, group = WEIGHT_BYTES[scheme], scheme in UNTIES_HEAD, GROUP_SIZE
    separate_head = not shape.tied or not STORES_TIED_ONCE[runtime] or unties
    head = shape.lm_head_params * q if separate_head else 0.0
    blocks = 0.0
    for layer in shape.layers:
        unquantized = 0
        if scheme == "8da4w" and layer.intermediate_size % group:
            unquantized = shape.hidden_size * layer.intermediate_size
        blocks += (layer.params - unquantized) * q + unquantized * fp
    return WeightTerms(
        embedding=shape.embed_params * fp,
        head=head,
        blocks=blocks,
        other=shape.other_params * fp,
        head_read=head if separate_head else shape.lm_head_params * fp,
        embedding_resident=not (MAPS_WEIGHTS[runtime] and separate_head),
    )


def weights_bytes(shape: ModelShape, runtime: Runtime, precision: str, scheme: str | None = None) -> int:
    """Total weight bytes as the runtime stores them (see :func:`weight_terms`)."""
    return weight_terms(shape, runtime, precision, scheme).total


def kv_cache_bytes(shape: ModelShape, context: int, batch: int, precision: str) -> int:
    per_token = sum(2 * layer.num_kv_heads * layer.head_dim for layer in shape.layers)
    return per_token * context * batch * BYTES_PER_ELEMENT[precision]


def kv_cache_not_held_mib(shape: ModelShape, profile: DeviceProfile, runtime: Runtime, tokens_run: int) -> float:
    """The part of the context's KV cache a validation run of ``tokens_run`` tokens did not hold:
    none for a preallocated cache, the remaining positions for a growing one."""
    if KV_PREALLOCATED[runtime]:
        return 0.0
    rest = max(0, profile.context_length - tokens_run)
    return kv_cache_bytes(shape, rest, profile.batch_size, profile.precision) / MIB


def activation_bytes(shape: ModelShape, tokens: int, context: int, batch: int) -> int:
    """Working set of one prefill chunk of ``tokens`` attending over up to ``context`` positions.

    Activations stay fp32 on CPU runtimes. Layers run one after another, so the peak is the
    residual stream plus the widest single layer's transients plus the logits of the chunk.
    """
    bt = batch * tokens
    residual = 3 * bt * shape.hidden_size  # hidden, normed copy, residual add
    widest = 0
    for layer in shape.layers:
        qkv = bt * (layer.num_heads + 2 * layer.num_kv_heads) * layer.head_dim
        scores = 2 * batch * layer.num_heads * tokens * context  # scores + softmax output
        mlp = 3 * bt * layer.intermediate_size  # gate, up, act*up
        widest = max(widest, qkv + scores, mlp)
    logits = bt * shape.vocab_size
    return 4 * (residual + widest + logits)


def estimate(shape: ModelShape, profile: DeviceProfile, runtime: Runtime) -> MemoryEstimate:
    """Peak memory of ``runtime`` running ``shape`` on ``profile``. ``weights_mib`` is what is
    resident (a memory-mapped embedding that is only gathered from is not; ``weights_mapped_mib``
    says how much that left on disk)."""
    scheme = profile.quantize.get(runtime)
    cost = runtime_cost(runtime, scheme)
    terms = weight_terms(shape, runtime, profile.precision, scheme)
    gemm_mib, head_mib = terms.blocks / MIB, terms.head_read / MIB
    overhead = library_mib(profile, runtime) + cost.loaded_overhead_mib(gemm_mib, head_mib)
    return MemoryEstimate(
        runtime=runtime,
        weights_mib=terms.resident / MIB,
        kv_cache_mib=kv_cache_bytes(shape, profile.context_length, profile.batch_size, profile.precision) / MIB,
        activations_mib=activation_bytes(shape, profile.prefill_tokens, profile.context_length, profile.batch_size)
        / MIB,
        overhead_mib=overhead,
        budget_mib=float(profile.memory_budget_mib),
        block_weights_mib=gemm_mib,
        head_weights_mib=head_mib,
        weights_mapped_mib=(terms.total - terms.resident) / MIB,
    )


def estimate_all(shape: ModelShape, profile: DeviceProfile) -> list[MemoryEstimate]:
    """One estimate per runtime the profile exports to; the model must fit in each."""
    return [estimate(shape, profile, rt) for rt in profile.runtimes]


def worst(estimates: list[MemoryEstimate]) -> MemoryEstimate:
    return max(estimates, key=lambda e: e.total_mib)
