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


def test_the_weight_gradient_tasks_launch_each_configuration_the_timed_choice_offers(monkeypatch):
    """One task per configuration of conv_weight_grad.CONFIGS; each launches it at every size, with the shapes of
    GLA's stacked embeddings (match, value and score channels as one convolution)."""
    from dlsn.models import conv_weight_grad

    if not fused.triton_available():
        pytest.skip("triton is not importable")
    script = _load_script()
    tasks = [task for task in script.tasks(torch.device("cpu"), small=True) if task[0] == "weight gradient"]
    assert [task[2] for task in tasks] == [conv_weight_grad.config_name(config) for config in conv_weight_grad.CONFIGS]
    launched = []
    monkeypatch.setattr(conv_weight_grad, "weight_grad", lambda x, grad_y, config, precision: launched.append(
        (tuple(x.shape), tuple(grad_y.shape), config, precision)))
    script.run_task(tasks[0])
    channels, _, sizes = script.GLA_PROBLEMS["small"]
    stacked = channels // 4 + 2 * channels  # match, value, score
    assert launched == [((batch, channels, size, size), (batch, stacked, size, size), conv_weight_grad.CONFIGS[0],
                         "ieee") for batch, size in sizes]
