"""The compiled training step (module.compile) against the eager one, and the training-step benchmark script."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from conftest import PROJECT_ROOT, TINY_TRAIN, last_value, read_csv_metrics, run_script


@pytest.mark.slow
def test_compiling_the_training_step_does_not_change_the_result(tmp_path):
    """Same seed, same data: validation PSNR within 0.01 dB and the same checkpoint layout."""
    runs = {}
    for compiled in (False, True):
        run_dir = tmp_path / f"compiled_{compiled}"
        run_script("train.py", run_dir, *TINY_TRAIN, "trainer.max_epochs=2", f"module.compile.enabled={compiled}")
        runs[compiled] = run_dir
    eager, compiled = (last_value(read_csv_metrics(runs[c]), "val/psnr") for c in (False, True))
    assert abs(eager - compiled) < 0.01, (eager, compiled)
    keys = [set(torch.load(runs[c] / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]) for c in (False, True)]
    assert keys[0] == keys[1]  # compiling adds no duplicate weights to checkpoints


def test_training_step_benchmark_prints_one_row_per_case(tmp_path):
    json_path = tmp_path / "step.json"
    command = [sys.executable, str(PROJECT_ROOT / "scripts" / "benchmark_train_step.py"), "--device", "cpu",
               "--cases", "project", "--precisions", "32-true", "--n-feats", "8", "--n-resgroups", "1",
               "--n-resblocks", "1", "--chunk-size", "16", "--n-hashes", "1", "--batch", "2", "--patch", "12",
               "--warmup", "1", "--steps", "4", "--json", str(json_path)]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| 32-true |")]
    assert len(rows) == 1 and rows[0].startswith("| 32-true | project |")
    import json

    (result,) = json.loads(json_path.read_text())
    assert result["case"] == "project" and result["steps"] == 4 and result["step_s"] > 0
