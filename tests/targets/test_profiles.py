"""Profile schema: every shipped profile loads; bad YAML fails with the file, the key and the fix."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from core.errors import ProfileError
from targets.profile import DeviceProfile, available_profiles, load_profile, profiles_dir
from tests.conftest import default_model_shape

SHIPPED = available_profiles()
# Every shipped profile must be listed here with whether the default model needs pruning to fit it
# in fp32 (or its pinned schemes); adding a profile file without adding it here fails
# test_every_profile_is_covered. With precision: auto, none needs pruning (int8 weights fit).
NEEDS_PRUNING_FOR_DEFAULT = {
    "android": True,
    "android-go": True,  # fp32 fits neither runtime (auto quantizes: 8da8w with an int8 table, int8w)
    "android-flagship": False,
    "rpi4": True,
    "rpi4-4gb": False,
    "rpi4-8gb": False,
    "rpi5": False,
    "jetson-orin-nano": False,
}


def test_every_profile_is_covered() -> None:
    assert set(SHIPPED) == set(NEEDS_PRUNING_FOR_DEFAULT)
    assert {"android", "android-go", "android-flagship", "rpi4", "rpi4-4gb", "rpi4-8gb", "rpi5"} <= set(SHIPPED)


@pytest.mark.parametrize("name", SHIPPED)
def test_budget_model_agrees_on_which_profiles_prune_the_default(name: str) -> None:
    """The table above is what the memory model predicts for the dense default model."""
    from pipeline.fit import most_compressed
    from targets.budget import estimate_all, worst

    profile = load_profile(name)
    target = profile.memory_budget_mib - profile.pruning.headroom_mib
    assert profile.precision == "auto"  # the shipped default: precision chosen with the pruning
    shape = default_model_shape()
    need = worst(estimate_all(shape, profile)).bound_mib > target
    assert need == NEEDS_PRUNING_FOR_DEFAULT[name]
    # quantized as far as auto may go, every shipped profile holds the default model unpruned
    assert worst(estimate_all(shape, most_compressed(profile, shape))).bound_mib <= target


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_profile_loads(name: str) -> None:
    p = load_profile(name)
    assert p.name == name
    assert 0 < p.memory_budget_mib < p.ram_mib
    assert p.prefill_tokens <= p.context_length
    assert p.runtimes


@pytest.mark.parametrize("name", SHIPPED)
def test_every_number_has_a_source_comment(name: str) -> None:
    """Each top-level numeric key carries a YAML comment saying where it comes from."""
    for line in (profiles_dir() / f"{name}.yaml").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key.strip() in ("ram_mib", "memory_budget_mib", "context_length", "threads", "cores", "prefill_tokens"):
            assert "#" in rest, f"{name}.yaml: '{key.strip()}' has no comment saying where the number comes from"


def _base() -> dict:
    return yaml.safe_load((profiles_dir() / "android.yaml").read_text())


def _write(tmp_path: Path, data: dict | str, name: str = "dev") -> Path:
    p = tmp_path / f"{name}.yaml"
    if isinstance(data, dict):
        data = {**data, "name": data.get("name", name)}
        p.write_text(yaml.safe_dump(data))
    else:
        p.write_text(data)
    return p


def test_round_trip_through_yaml(tmp_path: Path) -> None:
    p = load_profile(_write(tmp_path, {**_base(), "name": "dev"}))
    assert isinstance(p, DeviceProfile) and p.memory_budget_mib == 768


@pytest.mark.parametrize(
    ("mutate", "expect"),
    [
        (lambda d: d.update(memory_budgit_mib=1), "unknown key 'memory_budgit_mib'"),
        (lambda d: d["cpu"].update(simd="neon"), "unknown key 'cpu.simd'"),
        (lambda d: d.update(memory_budget_mib="lots"), "memory_budget_mib"),
        (lambda d: d.update(memory_budget_mib=-5), "memory_budget_mib"),
        (lambda d: d.update(memory_budget_mib=10**9), "must be below ram_mib"),
        (lambda d: d.update(threads=2.5), "threads"),
        (lambda d: d.update(runtimes=["tflite"]), "runtimes.0"),
        (lambda d: d.update(runtimes=[]), "runtimes"),
        (lambda d: d.update(prefill_tokens=4096), "cannot exceed context_length"),
        (lambda d: d.pop("context_length"), "missing required key 'context_length'"),
        (lambda d: d.update(precision="int3"), "precision"),
        (lambda d: d.update(quantize={"onnxruntime": "8da4w"}), "not a onnxruntime scheme"),
        (lambda d: d.update(quantize={"executorch": "int2"}), "quantize.executorch"),
        (lambda d: d.update(runtimes=["executorch"], quantize={"onnxruntime": "int8"}), "not in runtimes"),
        (lambda d: d.update(quantize_embedding={"onnxruntime": "int8"}), "use one of: none"),
        (lambda d: d.update(quantize_embedding={"executorch": "int2"}), "quantize_embedding.executorch"),
        (lambda d: d.update(quantize_head={"onnxruntime": "8da4w"}), "use one of: int8w, int4w, int4w-b128, fp32"),
        # a head-only row is no blocks' scheme: the blocks' list is given
        (lambda d: d.update(quantize={"onnxruntime": "int4w-b128"}), "use one of int8, int8w, int4w"),
        (lambda d: d.update(executorch_load_mode="lazy"), "executorch_load_mode"),
        (lambda d: d.update(quantize_head={"onnxruntime": "int2"}), "quantize_head.onnxruntime"),
        (lambda d: d.update(runtimes=["executorch"], quantize_head={"onnxruntime": "int4w"}), "not in runtimes"),
        (
            lambda d: d.update(
                onnx_format="genai", quantize={"onnxruntime": "int4w"}, quantize_head={"onnxruntime": "fp32"}
            ),
            "builder stores the lm_head in the linear weights' scheme",
        ),
        (lambda d: d.update(decode_tokens=2000), "cannot exceed context_length"),
        (lambda d: d.update(onnx_format="tflite"), "onnx_format"),
        (lambda d: d["pruning"].update(max_removed_layer_ratio=1.5), "pruning.max_removed_layer_ratio"),
        (lambda d: d.update(name="other"), "must equal the file stem"),
    ],
)
def test_bad_profile_is_rejected_with_key(tmp_path: Path, mutate, expect: str) -> None:
    data = _base()
    data["name"] = "dev"
    mutate(data)
    path = _write(tmp_path, data)
    with pytest.raises(ProfileError) as err:
        load_profile(path)
    assert expect in str(err.value)
    assert str(path) in str(err.value)


def test_malformed_yaml(tmp_path: Path) -> None:
    with pytest.raises(ProfileError, match="not valid YAML"):
        load_profile(_write(tmp_path, "name: dev\n  bad: [indent"))


def test_python_tag_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ProfileError, match="not valid YAML"):
        load_profile(_write(tmp_path, "name: !!python/object/apply:os.system ['echo pwned']\n"))


def test_non_mapping_yaml(tmp_path: Path) -> None:
    with pytest.raises(ProfileError, match="mapping"):
        load_profile(_write(tmp_path, "- just\n- a list\n"))


def test_unknown_target_lists_valid_ones() -> None:
    with pytest.raises(ProfileError) as err:
        load_profile("toaster")
    assert "android" in str(err.value) and "rpi5" in str(err.value)


@pytest.mark.slow
@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_profile_runs_the_pipeline(
    name: str, tmp_path: Path, tokenizer, wiki_valid: Path, wiki_test: Path
) -> None:
    """`make export TARGET=<name>` on a tiny model: every stage runs with the profile as shipped
    (its context, chunk, threads, quantization), and every fp32 and memory gate passes.

    Quantized profiles' quality gates are judged on real models only: a random tiny model has
    near-uniform logits, whose top-1 flips under any quantization."""
    from core.errors import GateError
    from pipeline.data import DataConfig
    from pipeline.run import EvalConfig, RunConfig, run_pipeline
    from tests.conftest import tiny_model

    profile = load_profile(name)
    model_dir = tmp_path / "tiny"
    # two blocks: what is tested is the profile's plumbing, and ExecuTorch's export time grows with depth
    tiny_model("llama", num_hidden_layers=2, max_position_embeddings=profile.context_length).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    cfg = RunConfig(
        target=name,
        model=str(model_dir),
        out_dir=tmp_path / "out",
        calib=DataConfig(source=str(wiki_valid), num_samples=2, seq_len=32),
        eval=EvalConfig(source=str(wiki_test), num_samples=2, seq_len=profile.prefill_tokens),  # one prompt chunk
    )
    try:
        run_pipeline(cfg)
    except GateError:
        pass  # judged below, gate by gate
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    gates = {g["name"]: g for g in report["validation"]["gates"]}
    for rt in profile.runtimes:
        assert gates[f"memory[{rt}]"]["passed"], gates[f"memory[{rt}]"]["detail"]
        chosen = report["profile"]
        if rt in chosen["quantize"] or chosen.get("quantize_head", {}).get(rt, "fp32") != "fp32":  # pinned or auto
            assert f"agreement[{rt}]" in gates
        else:
            assert gates[f"parity[{rt}]"]["passed"] and gates[f"generation[{rt}]"]["passed"], gates
    assert report["profile"]["name"] == name and report["profile"]["context_length"] == profile.context_length
    # the runners never oversubscribe this host: a profile asking for more threads is capped, and says so
    from core.cpus import available_cpus

    here = available_cpus().count
    for r in report["validation"]["runtimes"]:
        assert r["measured"]["threads"] == min(profile.threads, here)
    assert (f"{profile.threads} threads ran as {here}" in report["validation"]["threads_note"]) == (
        profile.threads > here
    )
    assert (tmp_path / "out" / "report.html").is_file()
