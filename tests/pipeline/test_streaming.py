"""Streamed (block-at-a-time) pruning of a checkpoint: same result as in memory, and it runs under a
memory cap smaller than the model."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM

from core.errors import ConfigError
from core.methods import method_config
from pipeline.checkpoint import prune_checkpoint
from pipeline.prune import prune_to_budget
from pipeline.rewrite import load_pruned
from targets import confine
from tests.conftest import GQA_WIDE, tiny_model
from tests.pipeline.test_prune import profile

WIDE = dict(GQA_WIDE, num_hidden_layers=6)


def calib(n: int = 8, t: int = 32) -> torch.Tensor:
    return torch.randint(0, 512, (n, t), generator=torch.Generator().manual_seed(4))


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma3_text"])
def test_streamed_equals_in_memory(arch: str, tmp_path: Path, make_model_dir) -> None:
    src = make_model_dir(arch, **WIDE)
    cfg = method_config(method="comp", width_multiple=8, target_decoder_ratio=0.3, blocks=True)
    in_memory = tiny_model(arch, **WIDE)
    plan_mem = prune_to_budget(in_memory, calib(), profile(1000), cfg)
    plan_str = prune_checkpoint(src, calib(), profile(1000), cfg, tmp_path / "out")
    assert plan_str.params_after == plan_mem.params_after
    assert [s.removed for s in plan_str.steps] == [s.removed for s in plan_mem.steps]
    streamed = load_pruned(tmp_path / "out")
    ids = calib(2, 16)
    a = in_memory(ids, use_cache=False).logits
    b = streamed(ids, use_cache=False).logits
    assert float((a - b).abs().max()) < 1e-4
    assert (tmp_path / "out" / "model.safetensors.index.json").is_file()
    assert (tmp_path / "out" / "tokenizer.json").is_file()
    assert not (tmp_path / "out" / "staging").exists()


def test_streaming_rejects_non_layerwise_method(tmp_path: Path, make_model_dir) -> None:
    src = make_model_dir("llama", **WIDE)
    with pytest.raises(ConfigError, match="comp"):
        prune_checkpoint(src, calib(), profile(1000), method_config(method="depth"), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def _write_big_checkpoint(d: Path, tokenizer) -> int:
    """A Llama checkpoint of ~1.4 GiB fp32, written block by block (never whole in memory)."""
    config = AutoConfig.for_model(
        "llama", hidden_size=1536, intermediate_size=1536, num_hidden_layers=28, num_attention_heads=12,
        num_key_value_heads=4, vocab_size=512, max_position_embeddings=2048, tie_word_embeddings=True,
    )  # fmt: skip
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    d.mkdir()
    gen = torch.Generator().manual_seed(0)
    shapes = {k: v.shape for k, v in skeleton.state_dict().items() if k != "lm_head.weight"}
    groups: dict[str, dict[str, tuple[int, ...]]] = {}
    for key, shape in shapes.items():
        parts = key.split(".")
        group = ".".join(parts[:3]) if parts[1] == "layers" else "rest"
        groups.setdefault(group, {})[key] = tuple(shape)
    weight_map, total = {}, 0
    for n, members in enumerate(groups.values()):
        name = f"model-{n:05d}.safetensors"
        tensors = {
            k: (torch.ones(s) if k.endswith("norm.weight") else torch.randn(*s, generator=gen) * 0.02)
            for k, s in members.items()
        }
        save_file(tensors, str(d / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))
        total += sum(t.numel() * 4 for t in tensors.values())
    (d / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map})
    )
    config.save_pretrained(d)
    tokenizer.save_pretrained(d)
    return total


@pytest.mark.slow
def test_prunes_a_model_larger_than_its_memory_cap(tmp_path: Path, tokenizer, wiki_valid: Path) -> None:
    ok, why = confine.available()
    if not ok:
        pytest.skip(f"no memory cgroup to confine the pruning process: {why}")
    src = tmp_path / "big"
    model_bytes = _write_big_checkpoint(src, tokenizer)
    cap_mib = 900
    assert model_bytes / 2**20 > cap_mib + 400  # the fp32 weights alone are far over the cap
    prof = tmp_path / "cap.yaml"
    prof.write_text(
        yaml.safe_dump(
            dict(
                name="cap",
                device="test",
                cpu={"arch": "x86_64", "cores": 2},
                ram_mib=8192,
                memory_budget_mib=4096,
                context_length=256,
                prefill_tokens=32,
                runtimes=["onnxruntime"],
                threads=2,
                width_multiple=128,
            )
        )
    )
    text = tmp_path / "calib.txt"
    text.write_text(wiki_valid.read_text(encoding="utf-8")[:50_000], encoding="utf-8")
    out = tmp_path / "pruned"

    def cmd(dest: Path) -> list[str]:
        return [
            sys.executable, "-m", "pipeline.cli", "prune", "--model", str(src), "--target", str(prof), "--ratio",
            "0.2", "--calib", str(text), "--num-samples", "8", "--seq-len", "64", "--out", str(dest), "-q",
        ]  # fmt: skip

    run = confine.run_confined(cmd(out), cap_mib, timeout=900)
    assert run.returncode == 0 and not run.oom_killed, run.stderr[-3000:]
    summary = json.loads(run.stdout.strip().splitlines()[-1])
    assert run.peak_mib <= cap_mib
    assert summary["peak_rss_mib"] < cap_mib
    # --ratio counts decoder-block parameters; the embeddings (0.2% here) stay
    assert 0.19 <= 1 - summary["params_after"] / summary["params_before"] < 0.3
    pruned = load_pruned(out)
    ids = torch.randint(0, 512, (1, 16))
    assert torch.isfinite(pruned(ids, use_cache=False).logits).all()

    # the same job under a cap it cannot live with is killed by the kernel, and leaves no model behind
    starved = confine.run_confined(cmd(tmp_path / "starved"), 300, timeout=600)
    assert starved.returncode != 0 and starved.oom_killed
    assert not (tmp_path / "starved").exists()  # no half-written model


def test_confine_kills_over_limit_process() -> None:
    ok, why = confine.available()
    if not ok:
        pytest.skip(why)
    over = confine.run_confined([sys.executable, "-c", "b = bytearray(200 * 2**20); print(len(b))"], 120)
    assert over.returncode != 0 and over.oom_killed
    under = confine.run_confined([sys.executable, "-c", "b = bytearray(20 * 2**20); print(len(b))"], 120)
    assert under.returncode == 0 and not under.oom_killed and 20 <= under.peak_mib <= 120
