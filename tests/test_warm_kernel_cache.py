"""`scripts/warm_kernel_cache.py` launches the kernels that gpu_check's later steps launch (so that they find
them compiled): here, in Triton's interpreter at toy sizes, which kernels one task launches."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from dlsn.models import chunk_attention as fused

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def _load_script():
    sys.path.insert(0, str(SCRIPTS))  # the script imports check_fused_gla from beside it
    try:
        spec = importlib.util.spec_from_file_location("warm_kernel_cache", SCRIPTS / "warm_kernel_cache.py")
        script = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(script)
    finally:
        sys.path.remove(str(SCRIPTS))
    return script


@pytest.mark.parametrize("dtype", [torch.float32, pytest.param(torch.bfloat16, marks=pytest.mark.slow)])
def test_a_float32_task_also_launches_the_kernels_reading_the_mixed_gradient(monkeypatch, dtype):
    """Float32 training at batch 16 mixes the rounds in the attention's node (attend_and_mix), whose backward
    kernels read the mixed gradient and the round weights: specialisations of their own, warmed by the
    float32 tasks (once, at the first size); bf16 never runs them. The mixing threshold is put back."""
    if not fused.triton_available():
        pytest.skip("triton is not importable")
    script = _load_script()
    launched = []
    original = fused._launch

    def recording(function, name, *args, **constants):
        launched.append((name, constants.get("ROUND_WEIGHTED")))
        return original(function, name, *args, **constants)

    monkeypatch.setattr(fused, "_launch", recording)
    threshold, precision = fused.MIX_KERNEL_MIN_ELEMENTS, torch.get_float32_matmul_precision()
    try:
        script.run_task(("GLA forward+backward", dtype, "two_kernels", "cpu", "small"))
    finally:
        torch.set_float32_matmul_precision(precision)  # the task sets the precision GLA runs with
    sizes = len(script.GLA_PROBLEMS["small"][2])
    unweighted = [("forward", None), ("queries", False), ("keys", False)]
    weighted = [("forward", None), ("queries", True), ("keys", True)]
    assert launched == (unweighted + weighted + unweighted * (sizes - 1) if dtype == torch.float32
                        else unweighted * sizes)
    assert fused.MIX_KERNEL_MIN_ELEMENTS == threshold
