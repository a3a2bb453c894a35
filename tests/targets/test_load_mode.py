"""ExecuTorch's load mode (``executorch_load_mode``): validation loads the program as the profile says,
and a program loaded mapped and unlocked holds its gathered embedding table on disk, not resident."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from core.measure import MIB
from exporters import get_exporter
from exporters.base import ExportConfig
from targets.runner import mlock_allowed
from targets.validate import run_artifact
from tests.conftest import tiny_model

VOCAB, HIDDEN = 65536, 64  # a 16 MiB fp32 table: far above the runner's measurement noise


def test_without_mlock_refuses_locking_even_as_root() -> None:
    """The runner's ``--no-mlock`` drops the lock limit and CAP_IPC_LOCK before the program loads, so
    ExecuTorch's loader (mmap with UseMlockIgnoreErrors) leaves it unlocked whatever the privileges."""
    code = "from targets.runner import without_mlock; import sys; sys.exit(0 if without_mlock() else 1)"
    assert subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parents[2]).returncode == 0


@pytest.mark.slow
def test_mapped_program_keeps_its_table_on_disk(tmp_path: Path) -> None:
    model = tiny_model("llama", vocab_size=VOCAB, hidden_size=HIDDEN)
    art = get_exporter("executorch").export(model, ExportConfig(seq_len=8, max_cache_len=32), tmp_path / "et")
    ids = torch.randint(0, VOCAB, (1, 16), generator=torch.Generator().manual_seed(0)).numpy()
    peaks = {}
    for mapped in (False, True):
        measured, got = run_artifact(
            "executorch", art.path, ids, tmp_path / f"run-{mapped}", threads=1, new_tokens=2, chunk=8, mapped=mapped
        )
        assert got is not None, measured
        peaks[mapped] = measured
    table = VOCAB * HIDDEN * 4 / MIB
    # mapped, the table is paged in only where rows are looked up: never more resident than locked
    assert peaks[True]["model_peak_mib"] <= peaks[False]["model_peak_mib"] + 1.0
    if mlock_allowed(int(2 * table * MIB)):  # locked by the default load: the whole table was resident
        saved = peaks[False]["load_peak_mib"] - peaks[True]["load_peak_mib"]
        assert 0.8 * table <= saved <= 1.2 * table, (saved, table, peaks)


def test_an_infeasible_budget_names_the_mapped_load(tmp_path: Path) -> None:
    """Where mapping the program is what reaches the budget, the BudgetError names it, with what it saves."""
    from core.errors import BudgetError
    from core.methods import method_config
    from pipeline.feasibility import check_feasible, floor_estimate
    from targets.budget import model_shape
    from targets.profile import load_profile
    from tests.pipeline.test_pipeline import write_profile

    model = tiny_model("llama", vocab_size=VOCAB, hidden_size=HIDDEN)
    cfg = method_config("width")
    limits = {"method": "width", "headroom_mib": 0.0}
    loose = load_profile(write_profile(tmp_path, memory_budget_mib=500, runtimes=["executorch"], pruning=limits))
    shape = model_shape(model)
    resident = floor_estimate(model, shape, loose, cfg).bound_mib
    mapped = floor_estimate(model, shape, loose.model_copy(update={"executorch_load_mode": "mmap"}), cfg).bound_mib
    assert resident - mapped == pytest.approx(VOCAB * HIDDEN * 4 / MIB, rel=0.05)  # the table, less its margin share
    budget = int((resident + mapped) / 2)
    tight = load_profile(write_profile(tmp_path, memory_budget_mib=budget, runtimes=["executorch"], pruning=limits))
    with pytest.raises(BudgetError, match="executorch_load_mode: mmap"):
        check_feasible(model, tight, cfg)
    check_feasible(model, tight.model_copy(update={"executorch_load_mode": "mmap"}), cfg)  # and it fits so
