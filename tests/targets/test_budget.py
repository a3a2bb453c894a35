"""Budget model arithmetic on known shapes."""

from __future__ import annotations

import pytest

from core.runtimes import RUNTIME_TABLE
from core.schemes import runtime_cost
from targets.budget import (
    MIB,
    activation_bytes,
    estimate,
    kv_cache_bytes,
    logits_bytes,
    model_shape,
    weight_terms,
    weights_bytes,
)
from targets.profile import load_profile
from tests.conftest import tiny_model


def test_shape_of_tiny_llama() -> None:
    m = tiny_model("llama")  # hidden 64, 4 layers, 4 heads / 2 KV heads (head_dim 16), MLP 128, vocab 512, tied
    s = model_shape(m)
    assert s.tied and len(s.layers) == 4
    layer = s.layers[0]
    assert (layer.num_heads, layer.num_kv_heads, layer.head_dim, layer.intermediate_size) == (4, 2, 16, 128)
    # q 64x64 + k 64x32 + v 64x32 + o 64x64 + MLP 3x64x128 + two norms of 64
    assert layer.params == 64 * 64 * 2 + 64 * 32 * 2 + 3 * 64 * 128 + 2 * 64
    assert s.total_params == sum(p.numel() for p in m.parameters())


def test_weights_count_tied_head_per_runtime() -> None:
    s = model_shape(tiny_model("llama"))
    ort = weights_bytes(s, "onnxruntime", "fp32")
    et = weights_bytes(s, "executorch", "fp32")
    assert ort == s.total_params * 4
    assert et - ort == 512 * 64 * 4  # ExecuTorch stores the tied lm_head a second time


def test_untied_model_counts_head_once_everywhere() -> None:
    s = model_shape(tiny_model("mistral"))
    assert not s.tied
    assert weights_bytes(s, "onnxruntime", "fp32") == weights_bytes(s, "executorch", "fp32") == s.total_params * 4


def test_kv_cache_formula() -> None:
    s = model_shape(tiny_model("llama"))
    # 2 (K and V) x 4 layers x 2 KV heads x 16 head_dim x 1024 tokens x batch 2 x 4 bytes
    assert kv_cache_bytes(s, 1024, 2, "fp32") == 2 * 4 * 2 * 16 * 1024 * 2 * 4


def test_removing_layers_shrinks_every_term_but_logits() -> None:
    s = model_shape(tiny_model("llama"))
    smaller = s.without_layers({0, 2})
    assert len(smaller.layers) == 2
    assert (
        weights_bytes(s, "onnxruntime", "fp32") - weights_bytes(smaller, "onnxruntime", "fp32")
        == 2 * s.layers[0].params * 4
    )
    assert kv_cache_bytes(smaller, 100, 1, "fp32") == kv_cache_bytes(s, 100, 1, "fp32") // 2


def test_activation_terms() -> None:
    s = model_shape(tiny_model("llama"))
    t, ctx = 32, 128
    expected = 4 * (3 * t * 64 + max(t * (4 + 4) * 16 + 2 * 4 * t * ctx, 3 * t * 128) + t * 512)
    assert activation_bytes(s, t, ctx, 1) == expected


def test_estimate_totals_and_overrides() -> None:
    p = load_profile("android")
    s = model_shape(tiny_model("llama"))
    e = estimate(s, p, "executorch")
    cost = RUNTIME_TABLE["executorch"].cost
    assert e.overhead_mib == pytest.approx(p.runtime_overhead_mib["executorch"] + cost.session_mib)
    transient = cost.gemm_transient_ratio * e.block_weights_mib + cost.head_transient_ratio * e.head_weights_mib
    assert e.load_transient_mib == pytest.approx(transient)
    packed = cost.gemm_resident_ratio * e.block_weights_mib + cost.head_resident_ratio * e.head_weights_mib
    assert e.packed_mib == pytest.approx(packed)
    # the transients' bases are parts of the weights: blocks + the (separately stored) lm_head
    assert e.block_weights_mib > 0 and e.block_weights_mib + e.head_weights_mib < e.weights_mib
    # ExecuTorch's planned memory (static cache, a chunk's activations) is resident from load on: in both phases
    load, run = transient + e.kv_cache_mib + e.activations_mib, e.kv_cache_mib + e.activations_mib + packed
    assert e.total_mib == pytest.approx(e.weights_mib + e.overhead_mib + max(load, run))
    assert e.weights_mib == weights_bytes(s, "executorch", "fp32") / MIB
    assert e.fits  # a tiny model fits a phone
    assert e.to_dict()["fits"] is True


def test_fitting_holds_the_prediction_plus_the_calibrated_margin_to_the_budget() -> None:
    """``bound_mib`` adds the constants' ``prediction_margin`` to the model's part (not the runtime
    library, which the device measures): what fitting calls fitting is the worst case the calibration
    saw. A budget between the prediction and the bound does not fit."""
    p = load_profile("android")
    s = model_shape(tiny_model("llama"))
    margins = {}
    for rt in ("executorch", "onnxruntime"):
        e = estimate(s, p, rt)
        scheme, head = p.quantize.get(rt), p.head_scheme(rt)
        margin = max(runtime_cost(rt, scheme or head).prediction_margin, runtime_cost(rt, head).prediction_margin)
        margins[rt] = margin
        library = p.runtime_overhead_mib[rt]
        assert e.margin_mib == pytest.approx(margin * (e.total_mib - library))
        assert e.bound_mib == pytest.approx(e.total_mib + e.margin_mib)
        if margin > 0:  # ExecuTorch fp32's is 0: its constants over-predict every real point (memory_calibration.md)
            assert e.to_dict()["bound_mib"] > e.total_mib
            between = p.model_copy(update={"memory_budget_mib": (e.total_mib + e.bound_mib) / 2})
            assert not estimate(s, between, rt).fits
    assert margins["onnxruntime"] > 0.02  # the calibration's worst under-prediction of onnxruntime fp32


def test_mapped_embedding_that_is_only_gathered_is_not_resident() -> None:
    """onnxruntime maps its weights: an embedding read whole as the tied lm_head is resident, one
    that is only gathered from (untied model, or int8w's own quantized head) is not."""
    from targets.budget import weight_terms

    # int8w unties the head (its own quantized weight); executorch 8da8w
    p = load_profile("android-go").with_quantize({"onnxruntime": "int8w", "executorch": "8da8w"})
    tied = model_shape(tiny_model("llama"))
    embed = 512 * 64 * 4 / MIB
    assert estimate(tied, p, "onnxruntime").weights_mapped_mib == pytest.approx(embed)
    # ExecuTorch maps its program only where the profile loads it so (android-go: LOAD_MODE_MMAP);
    # XNNPACK packs the lm_head into its own memory, so what stays mapped is the gathered table
    assert p.executorch_load_mode == "mmap"
    mapped = estimate(tied, p, "executorch")
    assert mapped.weights_mapped_mib == pytest.approx(embed)
    locked = estimate(tied, p.model_copy(update={"executorch_load_mode": "file"}), "executorch")
    assert locked.weights_mapped_mib == 0.0 and locked.weights_mib == pytest.approx(mapped.weights_mib + embed)
    assert locked.total_mib == pytest.approx(mapped.total_mib + embed)
    fp32 = load_profile("android")
    assert estimate(tied, fp32, "onnxruntime").weights_mapped_mib == 0.0  # read whole as the lm_head
    untied = model_shape(tiny_model("mistral"))
    assert estimate(untied, fp32, "onnxruntime").weights_mapped_mib == pytest.approx(untied.embed_params * 4 / MIB)
    # int8w stores the tied head apart, quantized: stored bytes grow by it, the transient reads it
    terms = weight_terms(tied, "onnxruntime", "fp32", "int8w")
    assert terms.head == pytest.approx(512 * 64 * (1 + 4 / 32)) == terms.head_read
    assert runtime_cost("onnxruntime", "int8w") is not runtime_cost("onnxruntime")
    # XNNPACK's qd8 GEMMs keep packed copies of the quantized head: their own constants, the blocks'
    # terms shared by both schemes, the head's each its own (an int4 head packs differently)
    qd8, q4 = runtime_cost("executorch", "8da8w"), runtime_cost("executorch", "8da4w")
    assert qd8 is not RUNTIME_TABLE["executorch"].cost and q4.gemm_transient_ratio == qd8.gemm_transient_ratio
    assert q4.head_resident_ratio != qd8.head_resident_ratio


def test_sliding_window_layers_are_counted_as_the_exported_caches_hold_them() -> None:
    """Issue 21.4: the memory model counts each layer's cache as the runtime holds it. Both exporters'
    sliding-window caches roll (tests/exporters: the ONNX past is window - 1, the ExecuTorch ring
    window - 1 + chunk slots, both exact against PyTorch past the window), so a sliding layer is
    charged window - 1 + one call's tokens, a full layer the context; a window at least as long as
    the context rolls nothing."""
    types = ["sliding_attention", "full_attention", "sliding_attention", "sliding_attention"]
    s = model_shape(tiny_model("gemma3_text", layer_types=types))  # sliding_window 16
    assert [layer.window for layer in s.layers] == [16, None, 16, 16]
    per_position = 2 * 2 * 16 * 4  # K and V x 2 KV heads x head_dim 16 x 4 bytes
    assert kv_cache_bytes(s, 256, 1, "fp32", rolling_chunk=8) == per_position * (3 * (15 + 8) + 256)
    assert kv_cache_bytes(s, 256, 1, "fp32") == per_position * 4 * 256
    assert kv_cache_bytes(s, 16, 1, "fp32", rolling_chunk=8) == per_position * 4 * 16  # window = context
    assert kv_cache_bytes(s, 20, 1, "fp32", rolling_chunk=8) == per_position * 4 * 20  # 15 + 8 > 20
    assert all(spec.kv_windowed for spec in RUNTIME_TABLE.values())
    p = load_profile("android")  # context 1024
    chunk = p.prefill_tokens
    for rt in ("onnxruntime", "executorch"):
        copies = RUNTIME_TABLE[rt].cost.kv_copies
        positions = 3 * (15 + chunk) + 1024
        assert estimate(s, p, rt).kv_cache_mib == pytest.approx(copies * per_position * positions / MIB)
    # a llama has no sliding layers: nothing changes
    assert all(layer.window is None for layer in model_shape(tiny_model("llama")).layers)


def test_peak_is_the_larger_phase_load_or_full_context_run() -> None:
    """Issue 20: loading's repacking transients are freed before the first token and the KV cache only
    becomes resident as positions are written, so the two phases do not add up; at a long context the
    run (KV cache as the runtime holds it + a chunk's activations) sets the peak, at a short one the load."""
    s = model_shape(tiny_model("llama"))
    p = load_profile("android")
    for rt in ("onnxruntime", "executorch"):
        short, full = estimate(s, p, rt, 16), estimate(s, p, rt)
        assert full.positions == p.context_length and short.positions == 16
        for e in (short, full):
            # ExecuTorch's planned memory (the static cache, a chunk's activations) is resident from load on
            load = e.load_transient_mib + (e.kv_cache_mib + e.activations_mib if rt == "executorch" else 0.0)
            # onnxruntime's memory pattern holds a repeated chunk's logits a second time; ExecuTorch plans them once
            logits = logits_bytes(s, min(p.prefill_tokens, e.positions), 1) / MIB
            again = (2.0 if rt == "onnxruntime" else 1.0) - 1.0
            run = e.kv_cache_mib + e.activations_mib + again * logits + e.packed_mib
            assert e.total_mib == pytest.approx(e.weights_mib + e.overhead_mib + max(load, run))
            assert e.phase == ("load" if load > run else "run")
        assert full.total_mib >= short.total_mib
        copies = RUNTIME_TABLE[rt].cost.kv_copies
        assert full.kv_cache_mib == pytest.approx(copies * kv_cache_bytes(s, p.context_length, 1, "fp32") / MIB)
    # onnxruntime holds its past/present cache more than once at full context; ExecuTorch's static one once
    assert RUNTIME_TABLE["onnxruntime"].cost.kv_copies > 2.0
    assert RUNTIME_TABLE["executorch"].cost.kv_copies == pytest.approx(1.0, abs=0.15)


def test_genai_folder_is_counted_as_onnxruntime_genai_holds_it() -> None:
    """Issue 18: a GenAI folder's Generator holds one shared past/present buffer per layer, allocated
    at max_length when it is created (one copy, from load on, where a plain session holds 2.3-2.6),
    and loads its weights: a tied fp32 table twice (the lm_head's MatMul weight and the transposed
    copy the embedding gathers from), a quantized one once (shared by both ops)."""
    s = model_shape(tiny_model("llama"))  # tied, vocab 512 x hidden 64
    p = load_profile("android").model_copy(
        update={"runtimes": ["onnxruntime"], "quantize": {}, "quantize_embedding": {}}
    )
    genai = p.model_copy(update={"onnx_format": "genai"})
    plain, shared = estimate(s, p, "onnxruntime"), estimate(s, genai, "onnxruntime")
    assert plain.kv_copies == RUNTIME_TABLE["onnxruntime"].cost.kv_copies and not plain.kv_at_load
    assert shared.kv_copies == 1.0 and shared.kv_at_load
    assert shared.kv_cache_mib == pytest.approx(plain.kv_cache_mib / plain.kv_copies)
    table = 512 * 64 * 4 / MIB
    assert shared.weights_mib - plain.weights_mib == pytest.approx(table, rel=1e-3)  # + the transposed copy
    q = genai.model_copy(update={"quantize": {"onnxruntime": "int4w"}})
    terms = weight_terms(s, "onnxruntime", "fp32", "int4w", None, "genai")
    assert terms.embedding == 0 and terms.head == terms.head_read == 512 * 64 * (0.5 + 4 / 32)
    plain_q = p.model_copy(update={"quantize": {"onnxruntime": "int4w"}})
    # the shared quantized head's packed copy (core.runtimes.GENAI_QUANTIZED_HEAD_RESIDENT)
    assert estimate(s, q, "onnxruntime").packed_mib > estimate(s, plain_q, "onnxruntime").packed_mib


def test_lm_head_apart_takes_its_own_bytes_and_packing() -> None:
    """quantize_head: the head's bytes are its own scheme's, its load transient and packed copy its
    own scheme's constants, the blocks' terms unchanged; fp32 keeps a tied head reading the table."""

    shape = model_shape(tiny_model("llama"))
    base = load_profile("android-go").with_quantize({"onnxruntime": "int8w"})
    apart = base.with_quantize({"onnxruntime": "int8w"}, None, {"onnxruntime": "int4w"})
    same, mixed = estimate(shape, base, "onnxruntime"), estimate(shape, apart, "onnxruntime")
    assert mixed.block_weights_mib == same.block_weights_mib
    assert mixed.head_weights_mib == pytest.approx(same.head_weights_mib * (0.5 + 4 / 32) / (1 + 4 / 32))
    int4 = runtime_cost("onnxruntime", "int4w")
    int8 = runtime_cost("onnxruntime", "int8w")
    assert mixed.load_transient_mib == pytest.approx(
        int8.gemm_transient_ratio * mixed.block_weights_mib + int4.head_transient_ratio * mixed.head_weights_mib
    )
    assert mixed.packed_mib == pytest.approx(
        int8.gemm_resident_ratio * mixed.block_weights_mib + int4.head_resident_ratio * mixed.head_weights_mib
    )
    fp32_head = base.with_quantize({"onnxruntime": "int8w"}, None, {"onnxruntime": "fp32"})
    kept = estimate(shape, fp32_head, "onnxruntime")
    assert kept.weights_mapped_mib == 0.0  # the tied table is read whole as the head again
    assert kept.head_weights_mib == pytest.approx(shape.lm_head_params * 4 / MIB)
    assert base.head_scheme("onnxruntime") == "int8w" and fp32_head.head_scheme("onnxruntime") is None
