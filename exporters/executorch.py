"""ExecuTorch export: torch.export -> to_edge_transform_and_lower with the XNNPACK partitioner -> .pte.

The program is a decoder step over a static KV cache (:class:`exporters.kv_cache.StaticCacheDecoder`)
with ExecuTorch's LLM-runner signature ``forward(tokens [batch, seq], input_pos [seq])``: seq is
dynamic from 1 (decode) to the profile's prefill chunk, so one method serves prefill and decode,
and the cache is sized once, at the profile's context length, in the program's planned memory.
The runner's metadata methods (``get_max_seq_len``, ``get_max_context_len``, ...) are embedded.
Delegation coverage (how many ops went to XNNPACK, which did not) is recorded, since undelegated
ops run in the slow portable kernels.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import logging
import math
import time
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel

from core.errors import ExportError, RuntimeMissingError
from core.fsio import atomic_write_bytes
from exporters.base import ExportArtifact, ExportConfig, export_error
from exporters.kv_cache import StaticCacheDecoder, kv_layout
from exporters.llm_ops import LlmOpsCacheDecoder, llm_ops_attention, unsupported_reason
from exporters.quantize import left_unquantized, quantize_torch
from exporters.quantized_embedding import quantize_embedding
from exporters.rounding import rounded_for_export

log = logging.getLogger(__name__)


def _delegation(edge: Any) -> dict[str, Any]:
    """Count delegate calls and the ops left outside any delegate in the lowered graph."""
    graph = edge.exported_program().graph_module.graph
    delegated, leftover = 0, collections.Counter[str]()
    for node in graph.nodes:
        if node.op != "call_function":
            continue
        name = str(getattr(node.target, "__name__", node.target))
        if "executorch_call_delegate" in name:
            delegated += 1
        elif name not in ("getitem",):
            leftover[name] += 1
    return {"delegate_calls": delegated, "undelegated_ops": dict(leftover)}


def _tanh_gelu(x: torch.Tensor, approximate: str = "none") -> Any:
    """GELU's tanh approximation as the ops it is made of; exact GELU is left as it is."""
    if approximate != "tanh":
        return NotImplemented  # make_fx then keeps aten.gelu itself
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * (x * x * x))))


def spell_out_tanh_gelu(ep: torch.export.ExportedProgram) -> torch.export.ExportedProgram:
    """Write ``gelu(approximate="tanh")`` as x * 0.5 * (1 + tanh(...)) before lowering.

    Why: ExecuTorch 1.5.1's XNNPACK delegate takes ``aten.gelu`` and serializes it as XNNPACK's
    exact (erf) GELU whatever its ``approximate`` argument (fixed upstream by pytorch/executorch
    #22851, after this release). The two differ by up to 4.7e-4 per element, and Gemma 3 uses the
    tanh form: its fp32 .pte missed the 1e-3 logit parity gate by 30x (3.25e-2 at the first prompt
    position). Spelled out, the mul/add/tanh ops are delegated to XNNPACK and match PyTorch to
    ~6e-7. Drop this once the pinned ExecuTorch has the fix."""
    tanh = any(
        n.target is torch.ops.aten.gelu.default and (n.kwargs.get("approximate") or "none") == "tanh"
        for n in ep.graph.nodes
    )
    return ep.run_decompositions({torch.ops.aten.gelu.default: _tanh_gelu}) if tanh else ep


def example_inputs(cfg: ExportConfig, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    # Traced at 2 tokens: torch.export specialises a dimension whose example size is 1.
    seq = min(2, cfg.seq_len)
    ids = torch.randint(0, vocab_size, (cfg.batch_size, seq), generator=torch.Generator().manual_seed(0))
    return ids, torch.arange(seq)


class ExecuTorchExporter:
    name = "executorch"
    filename = "model.pte"

    def artifact_name(self, cfg: ExportConfig) -> str:
        return self.filename

    def export(self, model: PreTrainedModel, cfg: ExportConfig, out_dir: Path) -> ExportArtifact:
        try:
            from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
            from executorch.exir import ExecutorchBackendConfig, to_edge_transform_and_lower
        except ImportError as exc:
            raise RuntimeMissingError(f"ExecuTorch is not installed ({exc}); run `make setup`.") from exc
        t0 = time.perf_counter()
        # quantized: a copy; the caller's fp32 model stays the parity reference
        # a GPTQ-rounding scheme quantizes a rounded copy torchao maps to the same codes (in place: one
        # copy of the model, not two)
        source: Any = model
        if cfg.quantized_weights:
            rounded = rounded_for_export(model, cfg.quantize, cfg.calibration, cfg.quantize_head)
            source = quantize_torch(rounded, cfg.quantize, copy_model=rounded is model, head=cfg.quantize_head)
        left_fp32 = left_unquantized(model, cfg.quantize, cfg.quantize_head)
        if left_fp32:
            log.warning("%s leaves %d Linear module(s) in fp32 (input width not whole groups): %s",
                        cfg.quantize, len(left_fp32), ", ".join(left_fp32))  # fmt: skip
        if cfg.quantize_embedding:  # the lookup table: ExecuTorch's quantized embedding kernels
            source = source if source is not model else copy.deepcopy(model)
            quantize_embedding(source, cfg.quantize_embedding, self.name)
        why_not = unsupported_reason(model, cfg.cache_len) if cfg.llm_ops else "disabled"
        use_ops = why_not is None
        decoder: torch.nn.Module
        if use_ops:
            decoder = LlmOpsCacheDecoder(source, cfg.cache_len, cfg.seq_len, cfg.batch_size).eval()
        else:
            decoder = StaticCacheDecoder(source, cfg.cache_len, cfg.batch_size).eval()
            log.info("ExecuTorch program with generic attention over the cache (LLM kernels: %s)", why_not)
        ids, pos = example_inputs(cfg, model.config.vocab_size)
        dynamic = None
        if cfg.seq_len > 1:
            seq = torch.export.Dim("seq", min=1, max=cfg.seq_len)
            dynamic = ({1: seq}, {0: seq})
        layout = kv_layout(model)
        metadata = {
            "get_max_seq_len": cfg.seq_len,
            "get_max_context_len": cfg.cache_len,
            "get_vocab_size": int(model.config.vocab_size),
            "get_n_layers": layout.num_layers,
            "use_kv_cache": True,
            "enable_dynamic_shape": dynamic is not None,
        }
        try:
            with torch.no_grad():
                # strict (dynamo) tracing: the non-strict tracer fails on the cache's in-place
                # buffer updates with this torch (AOT "expected compiled_fn to be GraphModule").
                with llm_ops_attention(source) if use_ops else contextlib.nullcontext():
                    ep = torch.export.export(decoder, (ids, pos), dynamic_shapes=dynamic, strict=True)
                    ep = spell_out_tanh_gelu(ep)
                edge = to_edge_transform_and_lower(ep, partitioner=[XnnpackPartitioner()], constant_methods=metadata)
                details = _delegation(edge)
                # Re-inplace index_put -> index_put_: the cache update writes into the cache buffer
                # instead of into a planned copy of it (measured on SmolLM2 at a 1024-token
                # context: the copies added ~30 MiB to the run's peak).
                buffer = edge.to_executorch(ExecutorchBackendConfig(run_reinplace_pass=True)).buffer
        except Exception as exc:
            raise ExportError(export_error("ExecuTorch", model.config.model_type, exc)) from exc
        path = atomic_write_bytes(out_dir / self.filename, buffer)
        log.info("wrote %s (%.1f MiB, %d XNNPACK delegate calls)", path, len(buffer) / 2**20, details["delegate_calls"])
        details |= {
            "kv_cache": f"static, {cfg.cache_len} positions"
            + (f"; sliding-window layers a ring of {decoder.slots} slots" if use_ops and decoder.slots else ""),
            "attention": "llama::custom_sdpa + llama::update_cache (needs the LLM custom-ops kernels)"
            if use_ops
            else f"generic SDPA over the cache ({why_not})",
            "kv_heads": list(layout.kv_heads),
            "max_seq_len": cfg.seq_len,
            "metadata": metadata,
            "quantization": cfg.quantize or "none",
            "head_quantization": cfg.head_scheme or "none",
            "embedding_quantization": cfg.quantize_embedding or "none",
            "left_fp32": left_fp32,
        }
        return ExportArtifact(
            self.name, path, len(buffer), round(time.perf_counter() - t0, 2), (cfg.batch_size, cfg.seq_len), details
        )
