"""What the tests share: paths, the tiny training settings, and running train.py / eval.py as subprocesses."""

from __future__ import annotations

import csv
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

PROJECT_ROOT = Path(__file__).resolve().parents[2]
TESTS_DIR = PROJECT_ROOT / "tests"
SHARED_DIR = Path(os.environ.get("DLSN_TEST_SHARED", PROJECT_ROOT.parent / "shared"))
BENCHMARK_DIR = Path(os.environ.get("DLSN_TEST_BENCHMARKS", SHARED_DIR / "benchmarks"))
OFFICIAL_FIXTURES = SHARED_DIR / "fixtures" / "official_dlsn"

# A DLSN small enough for a training step in about a second, on tiny patches, with two checkpoints'
# worth of steps; no W&B, CSV logs to read metrics back.
TINY_TRAIN = [
    "model=dlsn_small",
    "model.n_feats=8",
    "model.n_resgroups=1",
    "model.n_resblocks=1",
    "model.chunk_size=16",
    "model.n_hashes=1",
    "data.patch_size=12",
    "data.batch_size=2",
    "data.iters_per_epoch=3",
    "data.num_workers=0",
    "module.optimizer.lr=1e-4",
    "trainer.max_epochs=1",
    "trainer.accelerator=cpu",
    "trainer.log_every_n_steps=1",
    "logger=csv",
    "extras.print_config=false",
    "compare_bicubic=false",
]


def load_script(name: str):
    """``scripts/<name>.py`` imported as a module (a fresh one each call), to call its functions in-process."""
    spec = importlib.util.spec_from_file_location(name, PROJECT_ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses resolve their annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def subprocess_env(wandb_mode: str = "disabled", **extra: str) -> dict[str, str]:
    """Environment of a train.py/eval.py subprocess: W&B offline or disabled, and the repository importable
    so that a run can be given a test callback (``+callbacks.probe._target_=tests.helpers.probes.RecordTraining``)."""
    python_path = [*filter(None, [os.environ.get("PYTHONPATH")]), str(PROJECT_ROOT)]
    env = {**os.environ, "WANDB_MODE": wandb_mode, "WANDB_SILENT": "true", "PYTHONWARNINGS": "ignore",
           "PYTHONPATH": os.pathsep.join(python_path), **extra}
    env.pop("LOCAL_RANK", None)  # never inherit a rank from an outer launcher
    return env


def run_script(script: str, run_dir: Path, *overrides: str, expect_success: bool = True, wandb_mode: str = "disabled",
               timeout: float = 900) -> subprocess.CompletedProcess:
    """Run train.py / eval.py in a subprocess with Hydra's output in ``run_dir``."""
    cmd = [sys.executable, str(PROJECT_ROOT / script), f"hydra.run.dir={run_dir}", *overrides]
    env = subprocess_env(wandb_mode)
    proc = subprocess.run(cmd, cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if expect_success and proc.returncode != 0:
        raise AssertionError(f"{script} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def read_csv_metrics(run_dir: Path) -> list[dict[str, str]]:
    """Rows of the CSVLogger's metrics.csv of a run."""
    files = sorted(run_dir.glob("csv/version_*/metrics.csv"))
    assert files, f"no metrics.csv under {run_dir}"
    with open(files[-1], newline="") as handle:
        return list(csv.DictReader(handle))


def last_value(rows: list[dict[str, str]], key: str) -> float:
    values = [float(r[key]) for r in rows if r.get(key) not in (None, "")]
    assert values, f"{key} was never logged"
    return values[-1]


def requires_official_fixtures():
    """Skip mark for tests that compare against ../shared/fixtures/official_dlsn."""
    return pytest.mark.skipif(not (OFFICIAL_FIXTURES / "dlsn_tiny_x2.pt").is_file(),
                              reason=f"official DLSN fixtures not found at {OFFICIAL_FIXTURES} (set DLSN_TEST_SHARED)")
