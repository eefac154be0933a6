"""`scripts/benchmark_gla.py` runs and prints one row per case (tiny sizes, so seconds only)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "benchmark_gla.py"


def test_benchmark_prints_time_memory_and_breakdown_per_case():
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--sizes", "32", "--repeats", "1", "--no-train-step", "--breakdown"],
        capture_output=True, text=True, timeout=300, check=True,
    )
    rows = [line.split() for line in result.stdout.splitlines() if line.startswith("gla_")]
    assert [row[:2] for row in rows] == [["gla_forward", "32x32"], ["gla_forward_backward", "32x32"]]
    for row in rows:
        median_s, peak_mb, convolution_s, matmul_s, _other_s = map(float, row[2:])
        assert median_s > 0 and peak_mb > 100  # RSS includes Python and torch
        assert convolution_s > 0 and matmul_s >= 0  # printed to 1 ms
        # Per-step shares of the same work: together at most the step time (plus profiler overhead).
        assert convolution_s + matmul_s <= 1.5 * median_s + 1e-3
