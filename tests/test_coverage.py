"""Every registered architecture, pruning method, runtime and quantization scheme has its tiny test
case: a row added to a table without one fails here (as optimum's test_all_models_tested does)."""

from __future__ import annotations

from core.arch import ARCHS
from core.methods import METHOD_TABLE
from core.runtimes import RUNTIME_TABLE
from core.schemes import SCHEME_TABLE
from tests.conftest import TINY_CONFIGS
from tests.exporters.test_exporters import RUNTIME_CASES
from tests.exporters.test_quantize import HEAD_CASES, SCHEME_CASES
from tests.pipeline.test_methods import METHOD_CASES


def test_every_architecture_has_a_tiny_config() -> None:
    assert set(TINY_CONFIGS) == set(ARCHS)


def test_refused_architectures_say_why() -> None:
    """Gemma 2 was registered without a tiny case; its tiny case showed its ONNX decode broken past
    the sliding window, so it is refused with that reason instead of exported wrong."""
    import pytest

    from core.arch import UNSUPPORTED, arch_for
    from core.errors import ModelLoadError

    assert not set(UNSUPPORTED) & set(ARCHS)
    with pytest.raises(ModelLoadError, match=r"gemma2.*sliding window.*supports: gemma, gemma3_text"):
        arch_for("gemma2")


def test_every_method_has_a_tiny_case() -> None:
    assert set(METHOD_CASES) == set(METHOD_TABLE)


def test_every_runtime_has_a_tiny_case() -> None:
    assert set(RUNTIME_CASES) == set(RUNTIME_TABLE)


def test_every_scheme_has_a_tiny_case_on_its_runtime() -> None:
    """Block schemes have a whole-model case; a head-only row its lm_head case (HEAD_CASES)."""
    assert {name: runtime for name, (runtime, _) in SCHEME_CASES.items()} == {
        name: spec.runtime for name, spec in SCHEME_TABLE.items() if not spec.head_only
    }
    heads = {head: runtime for runtime, _, head in HEAD_CASES}
    assert all(heads.get(name) == spec.runtime for name, spec in SCHEME_TABLE.items() if spec.head_only)


def test_every_scheme_is_simulated_for_precision_auto() -> None:
    """precision: auto prices a scheme by its PyTorch simulation (pipeline/fit/simulate.py); the
    tiny export case of each scheme checks that the simulation loses what the artifact loses."""
    from pipeline.fit.simulate import SIMULATIONS

    assert set(SIMULATIONS) == set(SCHEME_TABLE)
