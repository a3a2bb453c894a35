"""ONNX Runtime GenAI export: onnxruntime-genai's own model builder, hooked for pruned shapes.

The builder (``python -m onnxruntime_genai.models.builder``, a well-kept library of the field) writes
the graph apps run through onnxruntime-genai's Generator: fused contrib ops (GroupQueryAttention with
rotary inside and a past/present buffer shared at ``max_length``, SkipSimplifiedLayerNormalization,
a fused QKV MatMul, MatMulNBits for int8/int4 weights), ``genai_config.json`` and the tokenizer
files. It reads every width from the global config, so a pruned model (per-layer query heads, KV
heads and MLP widths) would be built wrong. Four hooks of its ``Model`` class fix that, without a
fork:

- ``load_weights`` returns the in-memory pruned model instead of reading a checkpoint;
- ``make_layer`` sets the layer's own head counts and MLP width before building it (the attention
  op's ``num_heads`` / ``kv_num_heads``, the QKV split, the MLP's shapes) and restores them after;
- ``make_key_value_cache_shape`` declares each layer's own KV head count on its past/present
  inputs: onnxruntime-genai sizes each layer's cache from them (it logs "per-layer KV shape
  variation"), so layers that lost KV groups hold smaller caches;
- ``make_value`` renames the symbolic axes the builder derives from the global head counts
  (``sequence_length * num_key_value_heads``) in a layer with other counts: onnxruntime's memory
  planner takes equal names for equal sizes (a pruned Gemma 3's k_norm failed "Shape mismatch
  attempting to re-use buffer" before).

Measured on a tiny pruned Llama (a block removed, a KV group fewer in one layer, a narrower MLP in
another): logits within 2e-7 of PyTorch in an ORT session, and the Generator's greedy tokens equal.
Rewriting torch.onnx's dynamo graph into the same contrib ops was the other way the issue named;
the builder already emits them, checks them on every release and writes the config GenAI needs, so
prunefit only supplies the shapes it changed.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from transformers import PreTrainedModel

from core.arch import attention_heads, decoder_layers, head_dim, mlp_width, tied_head
from core.errors import ExportError, RuntimeMissingError
from core.schemes import genai_shares_quantized_table
from exporters.base import ExportArtifact, ExportConfig, export_error

log = logging.getLogger(__name__)

DIRNAME = "genai"  # the folder an app loads: og.Model(<out>/genai)
# prunefit's architectures -> (the builder's class, the HF architecture name its config dispatch uses)
BUILDERS: dict[str, tuple[str, str]] = {
    "llama": ("LlamaModel", "LlamaForCausalLM"),
    "mistral": ("MistralModel", "MistralForCausalLM"),
    "qwen2": ("QwenModel", "Qwen2ForCausalLM"),
    "qwen3": ("Qwen3Model", "Qwen3ForCausalLM"),
    "gemma": ("GemmaModel", "GemmaForCausalLM"),
    "gemma3_text": ("Gemma3Model", "Gemma3ForCausalLM"),
    "phi3": ("Phi3MiniModel", "Phi3ForCausalLM"),
}
# prunefit's onnxruntime weight schemes -> the builder's precision (MatMulNBits, symmetric blocks of 32)
PRECISIONS = {None: "fp32", "int8w": "int8", "int4w": "int4"}


def layer_shapes(model: PreTrainedModel) -> list[tuple[int, int, int]]:
    """(query heads, KV heads, MLP width) of each decoder block, from the live modules."""
    hd = head_dim(model.config)
    return [(*attention_heads(layer.self_attn, hd), mlp_width(layer.mlp)) for layer in decoder_layers(model)]


def unsupported_reason(model: PreTrainedModel, cfg: ExportConfig) -> str | None:
    """What of ``model`` / ``cfg`` the GenAI format cannot represent, or None."""
    model_type = model.config.model_type
    if model_type not in BUILDERS:
        return f"architecture {model_type} (the builder path covers {', '.join(sorted(BUILDERS))})"
    if cfg.quantize not in PRECISIONS:
        return f"weight scheme {cfg.quantize} (GenAI export takes {', '.join(str(k) for k in PRECISIONS if k)})"
    if cfg.head_scheme != cfg.quantize:
        blocks = cfg.quantize or "fp32"
        return f"an lm_head in {cfg.quantize_head} apart from the blocks' {blocks} (the builder takes one scheme)"
    if cfg.quantize_embedding:
        return "a quantized embedding table (not wired to the builder's Gather quantization yet)"
    for i, (q, kv, _) in enumerate(layer_shapes(model)):
        if kv == 0 or q % kv:
            return f"layer {i}: {q} query heads over {kv} KV heads (GroupQueryAttention needs whole groups)"
    return None


def _hooked(base: type, model: PreTrainedModel, positions: int) -> type:
    """The builder class ``base`` with prunefit's hooks (module docstring)."""
    shapes = layer_shapes(model)
    hd = head_dim(model.config)

    class Pruned(base):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            # The rotary cos/sin tables are built for the model's whole context (Gemma 3 270M: four
            # 32768 x 128 fp32 tables, 64 MiB); the Generator never reads past search.max_length (the
            # profile's context, _finish_config), so they are built that long. Phi-3's long-RoPE pair
            # of tables switches at its original context and is left as the builder makes it.
            if "multi_cache" not in self.rope_attrs:
                self.rope_attrs["cache_length"] = min(int(self.rope_attrs["cache_length"]), positions)

        def load_weights(self, input_path: str) -> Any:
            return model

        def make_key_value_cache_shape(self, layer_id: int, shape: list[Any]) -> list[Any]:
            shape = super().make_key_value_cache_shape(layer_id, shape)
            return [shape[0], shapes[layer_id][1], *shape[2:]]

        def make_value(self, name: str, dtype: Any = None, shape: Any = None) -> Any:
            # The builder names some axes by the global head counts ("sequence_length *
            # num_key_value_heads", q_norm/k_norm); equal names must be equal sizes to onnxruntime's
            # planner, so a layer with other counts gets names of its own.
            if isinstance(shape, list) and self.layer_heads is not None:
                q, kv = self.layer_heads
                shape = [
                    d.replace("num_attention_heads", f"num_attention_heads_{q}").replace(
                        "num_key_value_heads", f"num_key_value_heads_{kv}"
                    )
                    if isinstance(d, str) else d
                    for d in shape
                ]  # fmt: skip
            return super().make_value(name, dtype, shape)

        layer_heads: tuple[int, int] | None = None

        def make_layer(self, layer_id: int, layer: Any) -> None:
            q, kv, width = shapes[layer_id]
            self.layer_heads = (q, kv)
            names = ("num_attn_heads", "num_kv_heads", "intermediate_size", "q_size", "kv_size")
            saved = {n: getattr(self, n) for n in names}
            self.num_attn_heads, self.num_kv_heads, self.intermediate_size = q, kv, width
            self.q_size, self.kv_size = q * hd, kv * hd
            try:
                super().make_layer(layer_id, layer)
            finally:
                for n, v in saved.items():
                    setattr(self, n, v)
                self.layer_heads = None

    return Pruned


class GenAIExporter:
    """Writes ``<out>/genai/``: model.onnx (+ .data), genai_config.json, the tokenizer files."""

    name = "onnxruntime"
    filename = f"{DIRNAME}/model.onnx"

    def artifact_name(self, cfg: ExportConfig) -> str:
        return self.filename

    def export(self, model: PreTrainedModel, cfg: ExportConfig, out_dir: Path) -> ExportArtifact:
        try:
            from onnxruntime_genai.models import builders
            from onnxruntime_genai.models.builder import parse_extra_options, set_io_dtype, set_onnx_dtype
        except ImportError as exc:
            raise RuntimeMissingError(
                f"onnxruntime-genai is not installed ({exc}); run `make setup` (onnx_format: genai needs it)."
            ) from exc
        if why := unsupported_reason(model, cfg):
            raise ExportError(f"The GenAI format cannot represent {why}; use onnx_format: onnx for this model.")
        if cfg.tokenizer_dir is None:
            raise ExportError("GenAI export needs the tokenizer files (ExportConfig.tokenizer_dir).")
        t0 = time.perf_counter()
        class_name, architecture = BUILDERS[model.config.model_type]
        precision = PRECISIONS[cfg.quantize]
        final = out_dir / DIRNAME
        out_dir.mkdir(parents=True, exist_ok=True)
        try:
            with tempfile.TemporaryDirectory(dir=out_dir, prefix=".genai-") as tmp:
                src, dst = Path(tmp) / "src", Path(tmp) / DIRNAME
                self._source(model, cfg, src, architecture)
                dst.mkdir()
                options = ["block_size=32", "accuracy_level=4"] if precision != "fp32" else []
                with _quiet():
                    opts = parse_extra_options(None, str(src), str(dst), precision, "cpu", str(Path(tmp) / "cache"),
                                               options)  # fmt: skip
                    opts.pop("_effective_builder_config", None)
                    hf = opts.pop("hf_details")
                    config = _flat_rope(hf["hf_config"])
                    builder = _hooked(getattr(builders, class_name), model, cfg.cache_len)(
                        config, set_io_dtype(precision, "cpu", opts), set_onnx_dtype(precision, opts), "cpu",
                        str(Path(tmp) / "cache"), opts,
                    )  # fmt: skip
                    # create_model's steps, with the hooked class: graph, save, genai_config, tokenizer
                    builder.make_model(str(src))
                    builder.save_model(str(dst))
                    builder.make_genai_config(config, hf["extra_kwargs"], str(dst))
                    builder.save_processing(hf["hf_name"], hf["extra_kwargs"], str(dst))
                _finish_config(dst / "genai_config.json", cfg.cache_len, model.config.model_type)
                import onnx

                # a structural check only: onnx.checker does not know the contrib ops (com.microsoft)
                graph = onnx.load(str(dst / "model.onnx"), load_external_data=False).graph
                if not graph.node or not (dst / "genai_config.json").is_file():
                    wrote = sorted(f.name for f in dst.iterdir())
                    raise ExportError(f"onnxruntime-genai's builder wrote an incomplete folder: {wrote}")
                for f in dst.iterdir():
                    with open(f, "rb") as fh:
                        os.fsync(fh.fileno())
                if final.exists():
                    shutil.rmtree(final)
                os.replace(dst, final)
        except (ExportError, RuntimeMissingError):
            raise
        except Exception as exc:
            raise ExportError(export_error("ONNX Runtime GenAI", model.config.model_type, exc)) from exc
        path = final / "model.onnx"
        size = sum(f.stat().st_size for f in final.iterdir() if f.name.startswith("model.onnx"))
        log.info("wrote %s (%.1f MiB, onnxruntime-genai builder, %s)", final, size / 2**20, precision)
        details = {
            "format": "genai (onnxruntime-genai builder: GroupQueryAttention, shared past/present buffer)",
            "builder_precision": precision,
            "kv_cache": f"past/present shared, allocated at search.max_length {cfg.cache_len}",
            "kv_heads": [kv for _, kv, _ in layer_shapes(model)],
            "quantization": cfg.quantize or "none",
            # int4: the embedding gathers the tied lm_head's codes (GatherBlockQuantized), one table
            "embedding_quantization": (
                "int4, shared with the lm_head (GatherBlockQuantized)"
                if genai_shares_quantized_table(cfg.quantize) and tied_head(model)
                else "none"
            ),
            "files": sorted(f.name for f in final.iterdir()),
        }
        return ExportArtifact(self.name, path, size, round(time.perf_counter() - t0, 2), None, details)

    @staticmethod
    def _source(model: PreTrainedModel, cfg: ExportConfig, src: Path, architecture: str) -> None:
        """What the builder reads from disk besides the weights: the config (with the architecture
        name its dispatch and genai_config use) and the tokenizer files (copied into the output)."""
        assert cfg.tokenizer_dir is not None
        src.mkdir(parents=True)
        config = model.config.__class__.from_dict(model.config.to_dict())
        config.architectures = [architecture]
        config.save_pretrained(src)
        for f in Path(cfg.tokenizer_dir).iterdir():
            if f.name.startswith(("tokenizer", "special_tokens", "generation_config")) or f.suffix == ".model":
                shutil.copy2(f, src / f.name)


def _flat_rope(config: Any) -> Any:
    """transformers 5 nests Gemma 3's RoPE per layer type (``rope_parameters[layer_type]``); the
    builder (0.18) reads the older flat form: ``rope_parameters`` / ``rope_theta`` for full attention,
    ``rope_local_base_freq`` for the sliding layers."""
    nested = getattr(config, "rope_parameters", None)
    if isinstance(nested, dict) and "full_attention" in nested:
        full = dict(nested["full_attention"])
        config.rope_local_base_freq = nested.get("sliding_attention", full)["rope_theta"]
        config.rope_parameters, config.rope_theta = full, full["rope_theta"]
    return config


def _finish_config(path: Path, positions: int, model_type: str) -> None:
    """Two fields of the builder's genai_config.json, set for the device:

    - ``search.max_length``: the Generator allocates its shared past/present buffer at it, so it is
      the profile's context, not the model's (the builder writes max_position_embeddings: 8192 for
      SmolLM2, 32768 for Gemma 3 270M);
    - ``model.type``: the builder names a text-only Gemma 3 ``gemma3``, which onnxruntime-genai 0.18
      loads as the multimodal package ("model path is a directory") and refuses; ``gemma3_text`` is
      its decoder-only type."""
    config = json.loads(path.read_text())
    config["search"]["max_length"] = min(positions, int(config["model"]["context_length"]))
    if model_type == "gemma3_text":
        config["model"]["type"] = "gemma3_text"
    path.write_text(json.dumps(config, indent=4))


@contextlib.contextmanager
def _quiet() -> Any:
    """The builder prints a line per layer and tensor; keep it out of prunefit's output (debug log)."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
        yield
    log.debug("onnxruntime-genai builder:\n%s", buf.getvalue())
