"""`scripts/profile_train_step.py` on the CPU at toy sizes: every section runs, the launch-configuration
sweep records every configuration it was asked for and leaves the kernel's configurations as it found
them. Timings are not asserted (they depend on the machine's load)."""

from __future__ import annotations

import copy
import json
import re

import pytest
import torch

from dlsn.models import chunk_attention as fused
from tests.helpers.runs import load_script


@pytest.mark.slow
@pytest.mark.long  # every section and the sweep in the interpreter: 7 minutes on 2 cores
def test_sections_run_and_the_sweep_restores_the_launch_configurations(tmp_path, capsys):
    if not fused.triton_available():
        pytest.skip("triton is not importable")
    configs, channel_blocks = copy.deepcopy(fused.LAUNCH_CONFIGS), dict(fused.FORWARD_CHANNEL_BLOCK)
    values_channel_blocks, modes = dict(fused.VALUES_CHANNEL_BLOCK), dict(fused.BACKWARD_MODE)
    script = load_script("profile_train_step")
    assert script.main(["--device", "cpu", "--small", "--sections", "gla", "gla_batch1", "backward_modes", "tune",
                        "--json", str(tmp_path / "tune.json")]) == 0
    printed = capsys.readouterr().out
    assert "## GLA forward+backward, batch 2, 6x6, bf16-mixed" in printed
    assert "## GLA forward+backward, batch 2, 6x6, 32-true (TF32)" in printed
    for name in ("this project", "published layout"):  # batch 1: host time and launches per step
        assert re.search(rf"## GLA forward\+backward, batch 1, 6x6, float32 \(TF32\), {re.escape(name)}: [\d.]+ ms "
                         r"\(median of 2\); host [\d.]+ ms to issue a step; \d+ kernels per step", printed), name
    for dtype in ("bfloat16", "float32"):  # the backward in each BACKWARD_MODE, at the current configurations
        assert re.search(rf"torch.{dtype}, from the attended values' and the confidences' gradients: "
                         r"two_kernels [\d.]+ ms; atomic [\d.]+ ms", printed), dtype
        # --small: each launch configuration in one variant (no query and values configurations paired)
        line = next(line for line in printed.splitlines() if line.startswith(f"torch.{dtype}, ")
                    and "two_kernels" in line)
        timed = [entry.rsplit(" ", 2)[0] for entry in line.split(": ", 1)[1].split("; ")]
        assert timed == list(fused.backward_variants(torch.device("cpu"), getattr(torch, dtype), combinations=False))
    swept = json.loads((tmp_path / "tune.json").read_text())
    # --small: rows 8 and 16, one warp count, one stage count, one channel block; two dtypes, the forward
    # and each backward mode's kernels (float32's atomic modes have no query kernel)
    kernels = [("forward", None), ("forward_weights", None)] + [(kernel, mode) for mode in ("two_kernels", "atomic") for kernel in ("queries", "keys")
                                     ] + [(kernel, mode) for mode in ("two_kernels+values", "atomic+values")
                                          for kernel in ("queries", "values", "keys_no_values")
                                          ] + [("queries", "stored_dS"), ("keys_from_dS", "stored_dS")] + [
                                              (kernel, "stored_dS+values")
                                              for kernel in ("queries", "values", "keys_from_dS_no_values")] + [
                                              (kernel, mode) for mode in ("stored_dS+matmul", "stored_dS+matmul+dP")
                                              for kernel in ("queries", "keys_from_dS_no_values")]
    assert sorted((r["dtype"], r["kernel"], r["backward_mode"] or "", r["rows"]) for r in swept) == sorted(
        (dtype, kernel, mode or "", rows) for dtype in ("torch.bfloat16", "torch.float32") for kernel, mode in kernels
        for rows in (8, 16) if not (dtype == "torch.float32" and kernel == "queries" and mode.startswith("atomic")))
    assert all(isinstance(r["ms"], float) and r["rows_used"] == r["rows"] for r in swept)
    assert fused.LAUNCH_CONFIGS == configs and fused.FORWARD_CHANNEL_BLOCK == channel_blocks
    assert fused.VALUES_CHANNEL_BLOCK == values_channel_blocks and fused.BACKWARD_MODE == modes


@pytest.mark.slow  # 11 s in the interpreter
def test_the_sweep_can_be_narrowed_to_one_precision_and_kernel(tmp_path):
    """``--dtypes float32 --kernels keys``: the float32 key kernel's configurations only, in each mode."""
    if not fused.triton_available():
        pytest.skip("triton is not importable")
    script = load_script("profile_train_step")
    assert script.main(["--device", "cpu", "--small", "--sections", "tune", "--dtypes", "float32",
                        "--kernels", "keys", "--json", str(tmp_path / "tune.json")]) == 0
    swept = json.loads((tmp_path / "tune.json").read_text())
    assert sorted((r["dtype"], r["kernel"], r["backward_mode"], r["rows"]) for r in swept) == [
        ("torch.float32", "keys", mode, rows) for mode in ("atomic", "two_kernels") for rows in (8, 16)]


@pytest.mark.slow  # 23 s in the interpreter
def test_the_values_kernels_channel_blocks_are_swept(tmp_path, monkeypatch):
    """``--kernels values --channel-blocks 8 16``: the values kernel runs with 8 and with all 16 value channels
    per program (the batch-16 96x96 row's largest kernel), each timed, and VALUES_CHANNEL_BLOCK is restored."""
    if not fused.triton_available():
        pytest.skip("triton is not importable")
    launched = []
    original_launch = fused._launch

    def recording_launch(function, name, *args, **kwargs):
        launched.append((name, kwargs["channel_block"], kwargs.get("config") or fused.LAUNCH_CONFIGS[90][name, "float32"]))
        return original_launch(function, name, *args, **kwargs)

    monkeypatch.setattr(fused, "_launch", recording_launch)
    saved = dict(fused.VALUES_CHANNEL_BLOCK)
    script = load_script("profile_train_step")
    assert script.main(["--device", "cpu", "--small", "--sections", "tune", "--dtypes", "float32", "--backward-modes",
                        "stored_dS+values", "--kernels", "values", "--channel-blocks", "8", "16",
                        "--json", str(tmp_path / "tune.json")]) == 0
    swept = json.loads((tmp_path / "tune.json").read_text())
    assert sorted((r["kernel"], r["backward_mode"], r["rows"], r["channel_block"]) for r in swept) == [
        ("values", "stored_dS+values", rows, channels) for rows in (8, 16) for channels in (8, 16)]
    assert all(isinstance(r["ms"], float) for r in swept)
    values_launches = {(channels, config[0]) for name, channels, config in launched if name == "values"}
    assert values_launches == {(8, 8), (16, 8), (8, 16), (16, 16)}
    assert fused.VALUES_CHANNEL_BLOCK == saved


@pytest.mark.parametrize(("mixes", "with_backward_modes"), [
    (True, False), pytest.param(False, False, marks=pytest.mark.slow),
    pytest.param(True, True, marks=[pytest.mark.slow, pytest.mark.long])],
    ids=["attend_and_mix size", "below it", "attend_and_mix size, backward modes too"])
def test_the_sweep_times_the_backward_that_training_runs_at_its_size(tmp_path, monkeypatch, capsys, mixes,
                                                                     with_backward_modes):
    """Float32 training at batch 16 attends and mixes the rounds in one node, whose backward kernels read the mixed
    output's gradient and the round weights (other specialisations, timed apart by the training step's choice):
    the sweep and the backward modes time those kernels where attends_and_mixes() holds (lowered here), the
    [N, T, L, C] gradient's elsewhere; bf16 never reads the mixed gradient."""
    if not fused.triton_available():
        pytest.skip("triton is not importable")
    weighted = []
    original_launch = fused._launch

    def recording_launch(function, name, *args, **kwargs):
        if not name.startswith("forward"):
            dtype = "float32" if args[2]["value_dtype"] == torch.float32 else "bf16"  # args: grid, tensors, sizes
            weighted.append((dtype, name, bool(kwargs.get("ROUND_WEIGHTED"))))
        return original_launch(function, name, *args, **kwargs)

    monkeypatch.setattr(fused, "_launch", recording_launch)
    monkeypatch.setattr(fused, "MIX_KERNEL_MIN_ELEMENTS", 0 if mixes else 2**62)
    script = load_script("profile_train_step")
    assert script.main(["--device", "cpu", "--small", "--sections", "tune", "--dtypes", "float32",
                        "--backward-modes", "stored_dS+values", "--kernels", "values", "--rows-options", "8",
                        "--channel-blocks", "16", "--json", str(tmp_path / "tune.json")]) == 0
    assert {(dtype, name) for dtype, name, _ in weighted} == {("float32", "queries"), ("float32", "values"),
                                                               ("float32", "keys_from_dS_no_values")}
    assert all(flag == mixes for *_, flag in weighted), weighted
    assert ("the backward from the mixed output's gradient" in capsys.readouterr().out) == mixes
    assert all(isinstance(r["ms"], float) for r in json.loads((tmp_path / "tune.json").read_text()))
    if not with_backward_modes:  # the backward modes: about a minute in the interpreter
        return
    weighted.clear()
    assert script.main(["--device", "cpu", "--small", "--sections", "backward_modes"]) == 0
    printed = capsys.readouterr().out
    assert {dtype for dtype, *_ in weighted} == {"bf16", "float32"}
    assert all(flag == (mixes and dtype == "float32") for dtype, _, flag in weighted), weighted
    assert ("torch.float32, from the mixed output's gradient" in printed) == mixes


def test_gla_forward_backward_issues_few_operations():
    """The batch-1 GLA rows are bound by the host issuing kernels: scripts/count_gla_operations.py counts what one
    fused-path forward+backward issues (105 before the rounds were mixed with one product and one sum and the
    keys normalised with a hand-written backward, 79 after; 87 since the fused attention and the match
    convolution are autograd.Functions in eager mode, whose inner operations the count sees, where the
    custom ops hid about ten; 73 since the rotations are orthonormalised by one kernel; 71 since the float32
    backward's delta is one kernel; 76 with the match convolution apart, as on a GPU; 74 since the embeddings
    are one autograd node; 73 since the score MLP's first layer is one addmm). A change that adds operations
    to the layer's training path shows here first."""
    if not fused.triton_available():
        pytest.skip("triton is not importable")
    script = load_script("count_gla_operations")
    counted = script.count()
    assert counted["launches"] == ["forward", "queries", "keys"]
    total = len(counted["forward"]) + len(counted["backward"])
    assert total <= 73, (total, counted)
    # eager mode: no custom op's dispatch on this path (the hashing is counted as its one kernel)
    assert not {"chunk_attention", "chunk_attention_backward", "conv2d_float32"} & set(counted["forward"] + counted["backward"])
    assert counted["forward"].count("bucket_codes") == 1
    assert counted["forward"].count("orthonormal_columns") == 1 and "linalg_cholesky_ex" not in counted["forward"]
    assert counted["backward"].count("delta") == 1
    # the three embeddings' convolutions: the match one apart in the forward, one convolution backward
    assert counted["forward"].count("convolution") == 2 and counted["backward"].count("convolution_backward") == 1
    assert fused._launch.__name__ == "_launch"  # put back
