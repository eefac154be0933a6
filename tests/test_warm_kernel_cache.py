"""`scripts/warm_kernel_cache.py` launches the kernels that gpu_check's later steps launch (so that they find
them compiled): here, in Triton's interpreter at toy sizes, which kernels one task launches."""

from __future__ import annotations

import importlib.util
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
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
    float32 tasks (once, at the first size); bf16 never runs them. The second float32 task (beside the others,
    not the first, which runs alone) also runs each forward the float32 timed choice may pick. The mixing
    threshold and the forward mode are put back."""
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
        sizes = len(script.GLA_PROBLEMS["small"][2])
        unweighted = [("forward", None), ("queries", False), ("keys", False)]
        weighted = [("forward", None), ("queries", True), ("keys", True)]
        assert launched == (unweighted + weighted + unweighted * (sizes - 1) if dtype == torch.float32
                            else unweighted * sizes)
        assert fused.MIX_KERNEL_MIN_ELEMENTS == threshold
        if dtype == torch.float32:
            launched.clear()
            script.run_task(("GLA forward+backward", dtype, "atomic", "cpu", "small"))
            assert [name for name, _ in launched].count("forward_weights") == 1
            assert set(fused.FORWARD_MODE.values()) == {"timed"}
    finally:
        torch.set_float32_matmul_precision(precision)  # the task sets the precision GLA runs with


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


def _recording_launches(monkeypatch) -> set[tuple]:
    """Kernel launches recorded, not run (their output tensors zeroed instead: no self-check fails on them):
    what decides Triton's compilation besides the tensors' shapes, which the tasks of a group share."""
    launched = set()

    def recording(function, name, grid_of_rows, tensors, sizes, *, channel_block=None, config=None, **constants):
        generation = fused._generation(tensors[0].device)
        config = config or fused.LAUNCH_CONFIGS[generation][name, fused._precision_class(sizes["value_dtype"])]
        launched.add((name, config, channel_block, sizes["value_dtype"], sizes["precision"],
                      tuple(sorted(constants.items()))))
        for tensor in tensors:
            if tensor.is_floating_point():
                tensor.data.zero_()  # .data: unseen by autograd, as a kernel's writes

    def recording_fixed(function, grid, device, *arguments, num_warps, num_stages=None, **constants):
        launched.add((function.__name__, num_warps, num_stages, tuple(sorted(constants.items()))))
        for argument in arguments:
            if torch.is_tensor(argument) and argument.is_floating_point():
                argument.data.zero_()

    monkeypatch.setattr(fused, "_launch", recording)
    monkeypatch.setattr(fused, "_launch_fixed", recording_fixed)
    for key in list(fused.SELF_CHECK_TOLERANCE):
        monkeypatch.setitem(fused.SELF_CHECK_TOLERANCE, key, float("inf"))
    return launched


def _launched_kernels(monkeypatch, script, tasks) -> set[tuple]:
    launched = _recording_launches(monkeypatch)
    precision = torch.get_float32_matmul_precision()
    try:
        for task in tasks:
            script.run_task(task)
    finally:
        torch.set_float32_matmul_precision(precision)  # the tasks set the precision GLA runs with
    return launched


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_tasks_launch_every_kernel_that_every_backward_variant_launches(monkeypatch, dtype):
    """Each task compiles every kernel it launches (also one that another task compiles at that moment), so the
    script runs the fewest variants that launch them all: not the pairs of a query-kernel and a values-kernel
    configuration, whose kernels run with the same specialisations in the variants with one configuration
    each. The later steps' timed choices and checks run every variant: they must find all of its kernels."""
    if not fused.triton_available():
        pytest.skip("triton is not importable")
    script = _load_script()
    cpu = torch.device("cpu")
    tasks = [task[2] for task in script.tasks(cpu, small=True)
             if task[0] == "GLA forward+backward" and task[1] == dtype]
    every_variant = list(fused.backward_variants(cpu, dtype))
    assert tasks == list(fused.backward_variants(cpu, dtype, combinations=False))
    if dtype == torch.float32:
        assert len(tasks) < len(every_variant)  # the pairs are left out

    def task(detail):
        return ("GLA forward+backward", dtype, detail, "cpu", "small")

    warmed = _launched_kernels(monkeypatch, script, map(task, tasks))
    assert warmed == _launched_kernels(monkeypatch, script, map(task, every_variant))
    # the recording tells configurations apart: each values-kernel configuration is a specialisation of its own
    precision = fused._precision_class(dtype)
    timed = fused.TIMED_VALUES_CONFIGS[90].get(precision, ())
    assert {kernel[1] for kernel in warmed if kernel[0] == "values"} == {
        fused.LAUNCH_CONFIGS[90]["values", precision], *(config[:3] for config in timed)}


@pytest.mark.parametrize("dtype, precision", [(torch.float32, "highest"), (torch.float32, "high"),
                                              (torch.bfloat16, "highest")])
def test_the_self_check_tasks_launch_every_kernel_of_the_self_check(monkeypatch, dtype, precision):
    """Every process that uses the fused kernel on a GPU runs the whole self-check first (in float32, 32 distinct
    kernels, compiled one after the other): the script compiles them as one task per backward variant."""
    if not fused.triton_available():
        pytest.skip("triton is not importable")
    script = _load_script()
    cpu = torch.device("cpu")
    tasks = [task for task in script.tasks(cpu, small=True)
             if task.kind == "self-check" and task.dtype == dtype and task.precision == precision]
    assert [task.detail for task in tasks] == list(fused.backward_variants(cpu, dtype, combinations=False))
    one_task = _launched_kernels(monkeypatch, script, tasks[1:2])
    checked_at, self_check = [], fused.self_check  # the precision each task checks with (the CPU runs "ieee")
    monkeypatch.setattr(fused, "self_check", lambda *args, **kwargs: (
        checked_at.append(torch.get_float32_matmul_precision()), self_check(*args, **kwargs)))
    warmed = _launched_kernels(monkeypatch, script, tasks)
    assert checked_at == [precision] * len(tasks)
    saved = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision(precision)
        whole = _recording_launches(monkeypatch)
        self_check(cpu, dtype)  # as at a process's first use: every variant, the pairs too
    finally:
        torch.set_float32_matmul_precision(saved)
    assert warmed == whole
    assert len(one_task) < len(whole)


def test_a_self_check_of_unknown_variants_says_which():
    with pytest.raises(ValueError, match=r"no backward variant \['fastest'\].*expected some of \['two_kernels'"):
        fused.self_check(torch.device("cpu"), torch.bfloat16, variants=["two_kernels", "fastest"])


def test_each_group_runs_its_first_task_before_the_others(monkeypatch):
    """The rest of a group (a precision's paper-layer variants; a self-check's) starts once its first task has
    ended, whether it failed or not, and compiles only its own kernels then; the weight-gradient tasks belong
    to no group. Every task runs once."""
    if not fused.triton_available():
        pytest.skip("triton is not importable")  # no weight-gradient tasks without it
    script = _load_script()
    todo = script.tasks(torch.device("cpu"), small=True)
    events, lock = [], threading.Lock()
    first_of_group = {}
    for task in todo:
        first_of_group.setdefault(script.group(task) or task, task)
    leaders = set(first_of_group.values())

    def fake_run(task):
        with lock:
            events.append(("start", task))
        time.sleep(0.2 if task in leaders else 0.0)
        with lock:
            events.append(("end", task))
        if task == todo[0]:
            raise RuntimeError("compilation failed")
        return 0.0

    monkeypatch.setattr(script, "run_task", fake_run)
    with ThreadPoolExecutor(8) as pool:
        failed = script.run_in_parallel(todo, pool)
    assert failed == 1
    assert sorted(map(repr, (task for kind, task in events if kind == "start"))) == sorted(map(repr, todo))
    for task in todo:
        leader = first_of_group[script.group(task) or task]
        if task != leader:
            assert events.index(("start", task)) > events.index(("end", leader)), task
    assert {script.group(task) for task in leaders} == {script.group(task) for task in todo}
    weight_gradients = [task for task in todo if task.kind == "weight gradient"]
    assert weight_gradients and leaders.issuperset(weight_gradients)
