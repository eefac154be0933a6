"""`scripts/gpu_check.sh --rehearse`: the GPU measurement's exact command lines, on the CPU at toy sizes.

The GPU run is rare and short (a lent machine, minutes of budget), so an option renamed in one of its
scripts, or a JSON field the summary no longer finds, must fail here and not there. Nothing is timed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.runs import PROJECT_ROOT

SCRIPT = PROJECT_ROOT / "scripts" / "gpu_check.sh"


@pytest.mark.slow
def test_rehearsal_runs_every_step_and_fills_the_summary(tmp_path):
    out = tmp_path / "results"
    # python3 of this environment first; one OpenMP thread (a 2-core machine shared with other jobs)
    env = {**os.environ, "OUT": str(out), "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    proc = subprocess.run(["bash", str(SCRIPT), "--rehearse"], capture_output=True, text=True, env=env,
                          timeout=900, check=False)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    for step in ("check", "train_step", "gla_targets", "gla_targets_bf16", "precision"):
        assert f"== {step}: " in proc.stdout and (out / f"{step}.txt").is_file(), step
        assert (out / f"{step}.json").is_file(), (out / f"{step}.txt").read_text()[-3000:]

    summary = (out / "summary.md").read_text()
    assert summary.startswith("Rehearsal:")
    rows = [line for line in summary.splitlines() if line.startswith("| ")]
    assert not [row for row in rows if "MISSING" in row or "| NOT MET |" in row or "| MET |" in row]
    checks = [row for row in rows if row.startswith("| check: ")]
    assert len(checks) >= 8 and all(row.endswith("| PASS |") for row in checks)
    # every model-level target row, float32 and bf16, was measured (toy sizes standing for the paper's)
    model_rows = [row for row in rows if row.startswith(("| GLA fwd+bwd", "| whole-image forward"))]
    assert len(model_rows) == 10 and all("toy sizes" in row for row in model_rows), model_rows
    assert sum(row.endswith("| REHEARSAL |") for row in model_rows) == 5  # the float32 run; bf16 is information
    step_rows = [row for row in rows if row.startswith("| training step x2")]
    assert len(step_rows) == 2 and all("(eager)" in row and "ms (compiled)" in row for row in step_rows)
    assert sum(row.startswith("| val PSNR") for row in rows) == 2

    compiled = [r for r in json.loads((out / "train_step.json").read_text()) if r["case"] == "project-compiled"]
    assert {r["precision"] for r in compiled} == {"bf16-mixed", "32-true"}
